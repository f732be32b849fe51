"""Every script in examples/ runs with --quick and shows what its docstring says (adaptation helps).

The scripts run as ``__main__`` (``runpy``, their own ``sys.argv``) one after another in one fresh
Python process, not one process each: each would otherwise spend ~2.5 s importing torch and
torch._dynamo (which the engine's first call loads), too much for the quick test tier.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["custom_model.py", "anil.py", "save_load_adapt.py", "image_folder.py", "custom_rl_task.py"]
TIMEOUT = 300  # seconds for all of them: each takes one or two on a busy 2-core machine

DRIVER = """
import contextlib, io, json, runpy, sys, traceback
results = {}
for path, *args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        sys.argv = [path, *args]
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[path.rsplit("/", 1)[-1]] = [code, out.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``({script: (exit code, output)}, the folder they ran in)``."""
    out = tmp_path_factory.mktemp("examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MAMLKIT_CACHE_DIR": str(out / "cache")}
    extra = {"save_load_adapt.py": ["--out", str(out / "saved")]}
    commands = [[str(EXAMPLES / name), "--quick", *extra.get(name, [])] for name in SCRIPTS]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), out


def result(runs, name: str) -> list[dict[str, str]]:
    """The ``RESULT key=value ...`` lines the script printed, after checking that it exited 0."""
    code, output = runs[0][name]
    assert code == 0, f"{name} exited {code}:\n{output}"
    rows = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in output.splitlines() if line.startswith("RESULT ")]
    assert rows, f"{name} printed no RESULT line:\n{output}"
    return rows


def test_every_example_is_listed_and_documented():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)
    readme = (EXAMPLES / "README.md").read_text()
    for name in SCRIPTS:
        text = (EXAMPLES / name).read_text()
        assert text.startswith('"""') and "--quick" in text, f"{name}: a docstring and a --quick flag"
        assert name in readme, f"examples/README.md does not list {name}"


def test_custom_model_adapts(runs):
    (row,) = result(runs, "custom_model.py")
    assert float(row["after"]) < 0.5 * float(row["before"])


def test_anil_and_maml_both_adapt(runs):
    rows = result(runs, "anil.py")
    _, output = runs[0]["anil.py"]
    assert len(rows) == 2
    assert "anil: adapts 41 of 1761 parameters (head.weight, head.bias)" in output
    assert "maml: adapts 1761 of 1761 parameters" in output
    for row in rows:
        assert float(row["after"]) < float(row["before"])


def test_saved_model_loads_identical_and_adapts(runs):
    (row,) = result(runs, "save_load_adapt.py")
    assert row["identical"] == "True" and float(row["after"]) < float(row["before"])
    saved = runs[1] / "saved"
    assert (saved / "maml.pt").stat().st_size > 0 and (saved / "model.pt").stat().st_size > 0


def test_image_folder_beats_chance_after_adaptation(runs):
    (row,) = result(runs, "image_folder.py")
    assert float(row["before"]) < 40 and float(row["after"]) > 60  # 5-way: chance is 20%


def test_custom_rl_task_adapts(runs):
    pytest.importorskip("gymnasium")
    (row,) = result(runs, "custom_rl_task.py")
    assert float(row["after"]) > float(row["before"])  # a higher return after one policy-gradient step
