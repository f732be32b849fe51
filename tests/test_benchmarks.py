"""Every benchmark script runs, at tiny sizes, in its own process: none can rot unnoticed again.

The figures are not checked (they are machine timings); that each script gets through its whole
path and prints its table is.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real processes, many of them: the full suite only

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"
TINY_RL = "--set train.meta_batch_size=2 --set train.trajectories=2 --set env.horizon=5"
PEERS = "--windows 1 --window-seconds 0.01 --warmup 1 --threads 1 --only"

# script and arguments at tiny sizes -> text its output must hold
RUNS = {
    f"peers_speed.py {PEERS} mamlkit-vmap,mamlkit-loop": "| mamlkit vmap (eager) |",  # the peers: a test below
    "strategy_agreement.py --workload sinusoid": "vmap torch.float64: relative error",
    "fewshot_speed.py --presets omniglot-5way-1shot --strategies vmap --windows 1 --per-window 1 "
    f"--data {OMNIGLOT} --set train.meta_batch_size=2": "| omniglot-5way-1shot | 2, 1 | vmap |",
    "inner_memory.py --steps 1 --meta-batch 1 --n-way 2": "| 1 | ",
    "trpo_strategies.py --tasks 2 --trajectories 2 --horizon 5 --products 1": "the two strategies' products agree",
    f"rl_speed.py --seconds 0.05 --iterations 1 --threads 1 {TINY_RL}": "MAML first-order, 2 tasks x 2 trajectories",
    f"rl_breakdown.py {TINY_RL} --set env.sim_threads=1": "| sampling |",
    "rl_random_returns.py --tasks 1 --horizon 3": "| mamlkit/AntDir-v0 |",
    "rl_batched_sampler.py --tasks 2 --trajectories 2 --horizon 3 --sim-threads 1 --repeats 1 --gym-steps 3 "
    "--shared": "| ant_vel | batched",
    "rl_batched_sampler.py --sim --tasks 1 --trajectories 2 --sim-threads 1 --repeats 1 "
    "--sim-steps 2": "| ant_vel | mj_step",
    "rl_batched_sampler.py --policy --tasks 2 --trajectories 2 --repeats 1": "| ant (d=105) | shared, one call |",
}


def run(script: str, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>`` on one thread, as a user would run it (from another folder)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180
    )


def test_every_script_has_a_smoke_run():
    scripts = {p.name for p in BENCH.glob("*.py")} - {"report.py"}  # report.py is the scripts' shared helper
    assert scripts == {command.split()[0] for command in RUNS}


@pytest.mark.parametrize("command", list(RUNS), ids=lambda c: " ".join(c.split()[:2]))
def test_benchmark_runs_at_tiny_sizes(command, tmp_path):
    script, *args = command.split()
    if script == "fewshot_speed.py" and not OMNIGLOT.is_dir():
        pytest.skip(f"Omniglot archives not found at {OMNIGLOT}")
    out = run(script, args, tmp_path, MAMLKIT_CACHE_DIR=str(tmp_path / "cache"))  # fewshot_speed's cache
    expected = RUNS[command]
    assert out.returncode == 0, out.stderr[-3000:]
    assert expected in out.stdout, out.stdout[-3000:]
    assert "Traceback" not in out.stderr


def test_peers_that_are_not_installed_are_rows_and_write_updates_the_section(tmp_path):
    """What ``make bench`` runs, with a Markdown file to update in place."""
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- sinusoid-speed:start -->\nOLD FIGURES\n<!-- sinusoid-speed:end -->\n\nafter\n")
    args = [*PEERS.split(), "torch-loop,learn2learn,higher,torchopt", "--write", str(md)]
    out = run("peers_speed.py", args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = md.read_text()
    assert "OLD FIGURES" not in text and text.endswith("after\n") and "| plain PyTorch loop |" in text
    for name in ("learn2learn 0.2.0", "higher", "torchopt (MetaSGD)"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert "not installed" in row or "✓" in row  # skipped when absent, checked when present


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_shell_scripts_parse_and_call_scripts_that_exist(script):
    path = BENCH / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    for called in re.findall(r"benchmarks/(\w+\.py)", path.read_text()):
        assert (BENCH / called).is_file(), called
