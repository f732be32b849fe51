"""torchrun: several processes reproduce one (to float summation order), runs resume across
process counts, and a rank that dies ends the run resumably. Real processes on gloo."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlkit import distributed

pytestmark = pytest.mark.slow  # real processes, many of them: the full suite only

SINUSOID = [
    "sinusoid",
    "--quiet",
    "--set",
    "models=[maml]",
    "--set",
    "maml.strategy=vmap",  # no timing-dependent choice between ranks
    "--set",
    "train.meta_batch_size=5",  # 3 + 2 tasks on two ranks: an uneven split
    "--set",
    "train.log_every=10",
    "--set",
    "train.checkpoint_every=10",
]


def mamlkit(args: list[str], procs: int = 1, cwd: Path | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), "-m", "mamlkit", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run(args: list[str], procs: int = 1, cwd: Path | None = None) -> str:
    p = mamlkit(args, procs, cwd)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    return out


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["learner"]


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def start_until_checkpoint(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """Two ranks training into ``tmp_path/run``, returned once the first checkpoint is written."""
    p = mamlkit(args, procs=2, cwd=tmp_path, start_new_session=True)
    checkpoint = tmp_path / "run/maml/checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), p.communicate()[0]
    return p, checkpoint


def test_shard_splits_evenly_and_refuses_empty_ranks(monkeypatch):
    for world, n in [(2, 5), (3, 7), (4, 4), (1, 3)]:
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        parts = []
        for r in range(world):
            monkeypatch.setattr(distributed, "rank", lambda r=r: r)
            parts.append(distributed.shard(n))
        sizes = [p.stop - p.start for p in parts]
        assert parts[0].start == 0 and parts[-1].stop == n and sum(sizes) == n
        assert all(a.stop == b.start for a, b in zip(parts, parts[1:])) and max(sizes) - min(sizes) <= 1
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="3 tasks cannot be split over 4 processes"):
        distributed.shard(3)


def test_two_processes_reproduce_one_and_resume_across_counts(tmp_path):
    one = run(["train", *SINUSOID, "--out", "one", "--set", "train.iterations=30"], cwd=tmp_path)
    two = run(["train", *SINUSOID, "--out", "two", "--set", "train.iterations=30"], procs=2, cwd=tmp_path)
    assert "2 processes" in two and two.count("trained:") == 1, two  # rank 0 alone reports
    assert "trained:" in one
    assert_close(weights(tmp_path / "one/maml/checkpoint.pt"), weights(tmp_path / "two/maml/checkpoint.pt"))
    # One metric log, written by rank 0, with the whole batch's loss.
    rows = (tmp_path / "two/maml/metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["iteration", "10", "20", "30"]

    # Started with 2 processes for 20 iterations, resumed with 1 to 30: where one process ends.
    run(["train", *SINUSOID, "--out", "mixed", "--set", "train.iterations=20"], procs=2, cwd=tmp_path)
    run(["train", *SINUSOID, "--out", "mixed", "--resume", "--set", "train.iterations=30"], cwd=tmp_path)
    assert_close(weights(tmp_path / "one/maml/checkpoint.pt"), weights(tmp_path / "mixed/maml/checkpoint.pt"))


def test_a_rank_that_dies_ends_the_run_and_it_resumes(tmp_path):
    args = ["train", *SINUSOID, "--out", "run", "--set", "train.iterations=100000", "--set", "train.threads=1"]
    p, checkpoint = start_until_checkpoint(args, tmp_path)
    # The worker processes are torchrun's children; kill the one with the highest pid (a rank).
    children = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2, children
    os.kill(int(max(children, key=int)), signal.SIGKILL)
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "Signal 9 (SIGKILL)" in out or "exitcode  : -9" in out, out[-3000:]
    done = torch.load(checkpoint, weights_only=False)["iteration"]
    assert done >= 10
    resumed = run(
        ["train", *SINUSOID, "--out", "run", "--resume", "--set", f"train.iterations={done + 10}"], cwd=tmp_path
    )
    assert "trained:" in resumed
    assert torch.load(checkpoint, weights_only=False)["iteration"] == done + 10


def test_ctrl_c_to_torchrun_saves_the_iteration_the_ranks_stopped_at(tmp_path):
    """SIGINT to the torchrun launcher alone (as Ctrl-C in its terminal): it passes the signal to
    the ranks, which stop after the same iteration; rank 0 saves it, not only the last periodic
    checkpoint, and the run resumes from there."""
    args = ["train", *SINUSOID, "--out", "run", "--set", "train.iterations=100000", "--set", "train.threads=1"]
    p, checkpoint = start_until_checkpoint(args, tmp_path)
    time.sleep(1.0)
    os.kill(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    stops = re.findall(r"stopped at iteration (\d+); checkpoint saved", out)
    assert len(stops) == 1, out[-3000:]  # rank 0 alone reports
    saved = torch.load(checkpoint, weights_only=False)["iteration"]
    assert saved == int(stops[0])
    resumed = run(
        ["train", *SINUSOID, "--out", "run", "--resume", "--set", f"train.iterations={saved + 5}"], cwd=tmp_path
    )
    assert f"resuming from iteration {saved}" in resumed and "trained:" in resumed


def test_two_processes_reproduce_one_for_meta_rl(tmp_path):
    """2D navigation with TRPO meta-updates: each rank samples its share of the tasks from their
    own seeds; the TRPO step (gradient, KL products, line search) is summed over ranks."""
    args = ["train", "rl-navigation2d-tiny", "--quiet", "--set", "models=[maml,pretrained]"]
    args += ["--set", "train.iterations=3", "--set", "train.meta_batch_size=3"]  # 2 + 1 tasks
    run([*args, "--out", "one"], cwd=tmp_path)
    two = run([*args, "--out", "two"], procs=2, cwd=tmp_path)
    assert two.count("trained:") == 1
    for kind in ("maml", "pretrained"):
        assert_close(weights(tmp_path / f"one/{kind}/checkpoint.pt"), weights(tmp_path / f"two/{kind}/checkpoint.pt"))
    one_log = (tmp_path / "one/maml/metrics.csv").read_text().splitlines()
    two_log = (tmp_path / "two/maml/metrics.csv").read_text().splitlines()
    col = one_log[0].split(",").index("return_post")
    assert len(one_log) == len(two_log) == 4  # a header and 3 iterations each
    for a, b in zip(one_log[1:], two_log[1:]):  # the logged returns are the whole meta-batch's
        assert float(a.split(",")[col]) == pytest.approx(float(b.split(",")[col]), rel=1e-5)


def test_a_failure_on_rank_0_alone_reaches_every_rank(tmp_path):
    """Rank 0 reads the checkpoint; when it cannot, every rank stops with the same message at once
    instead of the others waiting in a collective."""
    run(["train", *SINUSOID, "--out", "run", "--set", "train.iterations=10"], cwd=tmp_path)
    (tmp_path / "run/maml/checkpoint.pt").write_bytes(b"not a checkpoint")
    p = mamlkit(["train", *SINUSOID, "--out", "run", "--resume", "--set", "train.iterations=20"], 2, tmp_path)
    # A rank left waiting in a collective would hang until the process group's timeout (minutes).
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and out.count("unreadable") >= 2, out[-3000:]  # both ranks say why
