"""A run's record checked as a whole on resume and evaluation: config.yaml against the configs its
checkpoints were trained with, the metric log's rows, each checkpoint's schema and its fit to the
model; and stops at any moment before training leave nothing that blocks the same command."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamlkit import cli
from mamlkit.training.metrics import read_metrics

FAST = [
    "--quiet", "--set", "models=[maml]", "--set", "maml.strategy=vmap", "--set", "maml.compile=false",
    "--set", "train.threads=1", "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
]  # fmt: skip
EVAL = ["--set", "eval.num_tasks=3", "--set", "eval.shots=[5]", "--set", "eval.steps=1", "--set", "eval.tune_tasks=2"]


def train(out: Path, *args) -> int:
    return cli.main(["train", "sinusoid", "--out", str(out), *FAST, *args])


def evaluate(out: Path) -> int:
    return cli.main(["eval", str(out), *EVAL])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-iteration run with a non-default architecture, evaluated; copied by each test."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train(out, "--set", "train.iterations=4", "--set", "model.hidden=[20]") == 0
    assert evaluate(out) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_a_config_cut_short_is_recovered_from_the_checkpoint(run, capsys):
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text[: text.index("model:")])  # sections from `model:` on are lost
    assert train(run, "--resume", "--set", "train.iterations=6") == 0
    out = capsys.readouterr().out
    assert "config.yaml lacks settings (eval, maml, model, task, train; cut short?)" in out and "checkpoint.pt" in out
    assert (run / "config.yaml").read_text() == text.replace("iterations: 4", "iterations: 6")
    state = torch.load(run / "maml/checkpoint.pt", weights_only=False)
    assert state["iteration"] == 6 and state["learner"]["model.0.weight"].shape == (20, 1)  # the run's model


def test_a_config_that_differs_from_the_checkpoints_is_refused(run, capsys):
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("inner_lr: 0.01", "inner_lr: 0.05"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for command in (lambda: train(run, "--resume", "--set", "train.iterations=6"), lambda: evaluate(run)):
        assert command() == 2
        err = capsys.readouterr().err
        assert "does not match the config that" in err and "maml.inner_lr: 0.05 in config.yaml, 0.01" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_eval_refuses_a_checkpoint_of_another_run(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert train(other, "--set", "train.iterations=2") == 0  # hidden [40, 40]
    shutil.copy(other / "maml/checkpoint.pt", run / "maml/checkpoint.pt")
    eval_json = (run / "eval.json").read_text()
    capsys.readouterr()
    assert evaluate(run) == 2
    err = capsys.readouterr().err
    assert "does not match the config that" in err and "model.hidden: [20] in config.yaml, [40, 40]" in err
    assert (run / "eval.json").read_text() == eval_json


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.pop("rng"), "has no 'rng'"),
        (lambda s: s.update(iteration="4"), "its 'iteration' is a str, not a int"),
        (lambda s: s.update(learner=[1, 2]), "its 'learner' is a list"),
        (lambda s: s["learner"].update({"model.0.weight": "w"}), "are not tensors"),
        (lambda s: s["learner"].pop("model.0.bias"), "does not fit the model"),
        (lambda s: s["learner"].update({"model.0.weight": torch.zeros(3, 1)}), "does not fit the model"),
        (lambda s: s.update(update={"state": {}, "param_groups": []}), "outer optimiser's state does not fit"),
        (lambda s: s["rng"].update(python="x"), "random-number state is damaged"),
    ],
)
def test_a_damaged_checkpoint_is_a_sentence_naming_it(run, capsys, damage, message):
    path = run / "maml/checkpoint.pt"
    state = torch.load(path, weights_only=False)
    damage(state)
    torch.save(state, path)
    resumed = train(run, "--resume", "--set", "train.iterations=6")
    err = capsys.readouterr().err
    assert resumed == 2 and message in err and str(path) in err, err
    if not any(m in message for m in ("rng", "random-number", "optimiser")):  # what evaluation reads is damaged
        assert evaluate(run) == 2
        err = capsys.readouterr().err
        assert message in err and str(path) in err, err


def test_a_row_cut_mid_line_is_cut_back_not_kept(run, capsys):
    log = run / "maml/metrics.csv"
    rows = read_metrics(log)
    with open(log, "a") as f:
        f.write("1")  # what a kill leaves of a row such as "10,0.53,..."
    assert train(run, "--resume", "--set", "train.iterations=6") == 0
    assert "damaged at its end" in capsys.readouterr().out
    now = read_metrics(log)
    assert [r["iteration"] for r in now] == [1, 2, 3, 4, 5, 6] and now[:4] == rows


def test_a_log_that_lost_rows_is_refused(run, capsys):
    log = run / "maml/metrics.csv"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))  # the header and iteration 1
    assert train(run, "--resume", "--set", "train.iterations=6") == 2
    err = capsys.readouterr().err
    assert "ends at iteration 1 but the checkpoint is of iteration 4" in err and "move it aside" in err


def _start(args: list[str], cwd: Path, slow_start: bool = False) -> subprocess.Popen:
    """``mamlkit`` in a process of its own; ``slow_start`` holds it for a minute after the run's
    files are written and before training, as loading a large dataset would."""
    code = "import sys; from mamlkit.cli import main; sys.exit(main(sys.argv[1:]))"
    if slow_start:
        code = (
            "import time, mamlkit.training.loop as L; fit = L.Trainer.fit; "
            "L.Trainer.fit = lambda self, *a, **k: (time.sleep(60), fit(self, *a, **k))[1]; " + code
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=cwd, env=env, **pipe)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
@pytest.mark.slow
def test_a_stop_before_the_first_iteration_leaves_nothing_that_blocks_the_command(tmp_path, sig):
    args = ["train", "sinusoid", "--out", "run", *FAST, "--set", "train.iterations=3"]
    proc = _start(args, tmp_path, slow_start=True)
    _wait_for(tmp_path / "run/config.yaml", proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), out
    assert "Traceback" not in out
    if sig != signal.SIGKILL:  # a stop cleans up; a kill leaves the start's files to the next command
        assert not (tmp_path / "run/config.yaml").exists()
    again = _start(args, tmp_path)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert [r["iteration"] for r in read_metrics(tmp_path / "run/maml/metrics.csv")] == [1, 2, 3]


# -- generated faults ------------------------------------------------------------------------------

FILES = ["config.yaml", "maml/checkpoint.pt", "maml/metrics.csv", "run.log", "eval.json", "eval.md"]
VALUES = st.one_of(
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "[]", "[1,", "{", "null", "true", "abc", "-1", "0", "1e400", "[0]", "{a: 1}", "'x'"]),
)
KEYS = st.sampled_from(
    ["train.iterations", "train.threads", "train.seed", "train.log_every", "train.checkpoint_every", "eval.steps",
     "eval.shots", "eval.num_tasks", "maml.inner_lr", "model.hidden", "train.meta_batch_size", "task.k_support",
     "train.time_limit", "trian.iterations", "eval.tune_lrs", "maml.adapt", "train.device", "train"]
)  # fmt: skip


def _damage(path: Path, how: str, at: float, junk: bytes) -> None:
    data = path.read_bytes()
    cut = int(len(data) * at)
    path.write_bytes(
        {
            "truncate": data[:cut],
            "flip": data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :] if cut < len(data) else data,
            "garbage": junk,
            "append": data + junk,
            "empty": b"",
        }[how]
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    file=st.sampled_from([*FILES, None]),
    how=st.sampled_from(["truncate", "flip", "garbage", "append", "empty", "delete"]),
    at=st.floats(0, 1, exclude_max=True),
    junk=st.binary(max_size=40),
    sets=st.lists(st.tuples(KEYS, VALUES), max_size=2),
    command=st.sampled_from(["resume", "eval", "plot"]),
)
@pytest.mark.slow
def test_any_damage_or_setting_ends_in_a_clean_exit_and_keeps_the_rest(
    trained, tmp_path, file, how, at, junk, sets, command
):
    """Generated damage to one file of a run and generated ``--set`` values: every command exits with
    0 or a sentence (2), never a traceback, and the files it did not damage are intact, unless
    the command succeeded and so rewrote them as it should."""
    case = tmp_path / f"case-{time.monotonic_ns()}"
    shutil.copytree(trained, case)
    if file is not None:
        if how == "delete":
            (case / file).unlink()
        else:
            _damage(case / file, how, at, junk)
    before = {p: p.read_bytes() for p in case.rglob("*") if p.is_file() and "tb" not in p.parts}
    overrides = [x for k, v in sets for x in ("--set", f"{k}={v}")]
    if command == "resume":
        code = train(case, "--resume", "--set", "train.iterations=5", *overrides)
    elif command == "eval":
        code = cli.main(["eval", str(case), *EVAL, *[f"--set=eval.{o.split('.', 1)[-1]}" for o in overrides[1::2]]])
    else:
        code = cli.main(["plot", str(case)])
    assert code in (0, 2)
    if code == 2:  # refused or failed: nothing it did not damage was changed
        after = {p: p.read_bytes() for p in case.rglob("*") if p.is_file() and "tb" not in p.parts}
        changed = [p.name for p in before if p.name not in ("run.log", ".lock") and after.get(p) != before[p]]
        assert not changed
    shutil.rmtree(case)


def test_plot_draws_a_named_evaluation_and_says_when_there_is_none(run, capsys):
    """`plot --name NAME` draws eval-NAME.json into plots/eval-NAME/; a missing named evaluation is
    refused with the command that makes it; a run not yet evaluated gets its training curves and a note."""
    assert cli.main(["plot", str(run), "--name", "three"]) == 2
    err = capsys.readouterr().err
    assert "eval-three.json not found" in err and "mamlkit eval" in err and "--name three" in err
    assert cli.main(["eval", str(run), *EVAL, "--name", "three", "--set", "eval.steps=3"]) == 0
    assert cli.main(["plot", str(run), "--name", "three"]) == 0
    assert (run / "plots/eval-three/mse_vs_steps.png").exists() and (run / "plots/eval-three/fits.png").exists()
    (run / "eval.json").unlink()
    capsys.readouterr()
    assert cli.main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert "has no eval.json" in out and "training_loss.png" in out and "mse_vs_steps" not in out


def test_a_long_evaluation_on_a_cpu_says_how_to_shorten_it(monkeypatch, tmp_path, capsys):
    from mamlkit.experiments import fewshot

    monkeypatch.setattr(cli.runs, "run_config", lambda run_dir, build: {"experiment": "fewshot", "eval": {}})
    monkeypatch.setattr(fewshot, "evaluate", lambda *a, **k: (tmp_path / "eval.md").write_text("table"))
    assert cli.main(["eval", str(tmp_path), "--device", "cpu", "--set", "eval.num_tasks=600"]) == 0
    assert "--set eval.num_tasks=N" in capsys.readouterr().out
    assert cli.main(["eval", str(tmp_path), "--device", "cpu", "--set", "eval.num_tasks=10"]) == 0
    assert "eval.num_tasks=N" not in capsys.readouterr().out


def test_weights_and_biases_logs_beside_the_csv_and_a_resume_continues_its_run(tmp_path, monkeypatch, capsys):
    """train.wandb=PROJECT logs every metric row to W&B too (a stand-in module here), and a resume
    continues the same W&B run; without wandb installed the start is refused with the install."""
    import importlib.util
    import types

    calls = []

    class FakeRun:
        def log(self, row, step):
            calls.append(("log", step, row["loss"]))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["project"], kwargs["id"], kwargs["resume"]))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init, fake.util = init, types.SimpleNamespace(generate_id=lambda: "run-1")
    fake.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert train(out, "--set", "train.iterations=2", "--set", "train.wandb=proj") == 0
    assert train(out, "--resume", "--set", "train.iterations=4") == 0
    rows = [(r["iteration"], r["loss"]) for r in read_metrics(out / "maml/metrics.csv")]
    assert [c for c in calls if c[0] == "init"] == [("init", "proj", "run-1", "allow")] * 2
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == rows
    assert calls.count(("finish",)) == 2 and (out / "maml/wandb-id").read_text() == "run-1"

    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    assert train(tmp_path / "other", "--set", "train.wandb=proj") == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_a_resume_and_an_evaluation_read_each_checkpoints_weights_once(run, monkeypatch):
    """The configs and schemas checked before a command map the checkpoint; only the command that
    uses the weights reads them (a resume read every checkpoint three times, an evaluation of a run
    with several models once per model per model)."""
    reads: list[str] = []
    real = torch.load

    def counting(path, *args, **kwargs):
        if not kwargs.get("mmap"):
            reads.append(Path(path).name if isinstance(path, str | Path) else "?")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    assert train(run, "--resume", "--set", "train.iterations=6") == 0
    assert reads == ["checkpoint.pt"], reads
    reads.clear()
    assert evaluate(run) == 0
    assert reads.count("checkpoint.pt") + reads.count("best.pt") == 1, reads


def test_a_resume_keeps_the_strategy_auto_chose(tmp_path, monkeypatch):
    """`auto` times the strategies, and timing can rank them differently from one start to the
    next; each rounds differently, so a resume that chose anew would not continue its run. The
    checkpoint records the choice and a resume keeps it, even where timing would now pick the other."""
    from mamlkit.engine import maml as engine

    def timing_favours(strategy):
        return lambda run, candidates, *a, **k: {s: (0.5 if s == strategy else 1.0) for s in candidates}

    auto = ["--set", "maml.strategy=auto", "--set", "train.checkpoint_every=2"]
    whole, half = tmp_path / "whole", tmp_path / "half"
    monkeypatch.setattr(engine, "fastest", timing_favours("vmap"))
    monkeypatch.setattr(engine, "_MEASURED", {})
    assert train(whole, *auto, "--set", "train.iterations=4") == 0
    assert train(half, *auto, "--set", "train.iterations=2") == 0
    assert torch.load(half / "maml/checkpoint.pt", weights_only=False)["strategy"] == "vmap"

    monkeypatch.setattr(engine, "fastest", timing_favours("loop"))  # a new start, where timing disagrees
    monkeypatch.setattr(engine, "_MEASURED", {})  # as in a new process
    assert train(half, *auto, "--resume", "--set", "train.iterations=4") == 0
    a = torch.load(whole / "maml/checkpoint.pt", weights_only=False)
    b = torch.load(half / "maml/checkpoint.pt", weights_only=False)
    assert b["strategy"] == "vmap"
    assert all(torch.equal(a["learner"][k], b["learner"][k]) for k in a["learner"])


@pytest.mark.parametrize("written", ["on a GPU", "before the device was recorded, on a GPU", "before, here"])
def test_a_resume_on_another_device_chooses_the_strategy_anew(tmp_path, monkeypatch, capsys, written):
    """A strategy chosen on one device type says nothing about another (a CPU's choice of the loop,
    kept on a GPU, was slower there and would not compile in minutes): the checkpoint records where
    `auto` chose, and a resume on another device chooses anew. Checkpoints from before the device was
    recorded count as from another device when their task stream cannot continue here (it was drawn
    on another), and keep their strategy otherwise."""
    from mamlkit.engine import maml as engine

    def timing_favours(strategy):
        return lambda run, candidates, *a, **k: {s: (0.5 if s == strategy else 1.0) for s in candidates}

    auto = ["--set", "maml.strategy=auto", "--set", "train.checkpoint_every=2"]
    monkeypatch.setattr(engine, "fastest", timing_favours("vmap"))
    monkeypatch.setattr(engine, "_MEASURED", {})
    assert train(tmp_path, *auto, "--set", "train.iterations=2") == 0
    path = tmp_path / "maml/checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert (state["strategy"], state["strategy_device"]) == ("vmap", "cpu")
    if written == "on a GPU":
        state["strategy_device"] = "cuda"
    else:  # an older checkpoint: no device recorded
        del state["strategy_device"]
        if written.endswith("on a GPU"):  # a task stream this CPU cannot continue
            state["rng"]["tasks"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(state, path)

    monkeypatch.setattr(engine, "fastest", timing_favours("loop"))
    monkeypatch.setattr(engine, "_MEASURED", {})
    capsys.readouterr()
    assert train(tmp_path, *auto, "--resume", "--set", "train.iterations=4") == 0
    out = capsys.readouterr().out
    state = torch.load(path, weights_only=False)
    if written == "before, here":
        assert "chooses anew" not in out
        assert (state["strategy"], state["strategy_device"]) == ("vmap", "cpu")
        return
    where = "a cuda device" if written == "on a GPU" else "another device"
    assert f"the strategy 'vmap' was chosen on {where}; 'auto' chooses anew on this one" in out
    assert (state["strategy"], state["strategy_device"]) == ("loop", "cpu")


@pytest.mark.slow
def test_cuda_graphs_off_cuda_are_said_to_do_nothing(tmp_path, capsys):
    """maml.cuda_graphs on a CPU compiles as asked but captures no graph; a run resumed from a GPU
    keeps the setting, so the run says it does nothing here rather than leave it silent."""
    args = ["--set", "maml.compile=true", "--set", "maml.cuda_graphs=true", "--set", "train.iterations=1"]
    assert train(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert "maml.cuda_graphs does nothing on a cpu device" in out
    assert train(tmp_path / "plain", "--set", "maml.compile=true", "--set", "train.iterations=1") == 0
    assert "does nothing" not in capsys.readouterr().out
