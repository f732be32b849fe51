"""Faults and bad input: no run is lost or silently mixed, and every refusal is a sentence.

Real processes and signals where it matters (a kill mid-run, a second writer)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamlkit import cli

FAST = ["--quiet", "--set", "models=[maml]", "--set", "maml.strategy=vmap", "--set", "train.threads=1"]


def train(tmp_path, *args) -> int:
    return cli.main(["train", "sinusoid", "--out", str(tmp_path / "run"), *FAST, *args])


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamlkit", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False)["learner"]


# -- divergence ------------------------------------------------------------------------------------


def test_divergence_stops_keeps_the_last_finite_checkpoint_and_exits_nonzero(tmp_path, capsys):
    code = train(
        tmp_path, "--set", "train.meta_lr=1e6", "--set", "train.checkpoint_every=1", "--set", "train.iterations=50"
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "at iteration" in err and "not finite" in err and "train.meta_lr=1e+06" in err and "nonfinite=skip" in err
    state = torch.load(tmp_path / "run/maml/checkpoint.pt", weights_only=False)
    assert 1 <= state["iteration"] < 50
    assert all(torch.isfinite(v).all() for v in state["learner"].values())


def test_divergence_can_skip_batches_instead(tmp_path, monkeypatch):
    from mamlkit.engine import NonFinite
    from mamlkit.training import AdamUpdate

    raised = []  # every batch the update refused, to compare with the count in the log
    step = AdamUpdate.step

    def counting_step(self, generator):
        try:
            return step(self, generator)
        except NonFinite:
            raised.append(1)
            raise

    monkeypatch.setattr(AdamUpdate, "step", counting_step)
    args = ["--set", "train.meta_lr=1e6", "--set", "train.iterations=20", "--set", "train.log_every=10"]
    assert train(tmp_path, *args, "--set", "train.nonfinite=skip") == 0
    rows = (tmp_path / "run/maml/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    skipped = [float(r.split(",")[header.index("skipped")] or 0) for r in rows[1:]]
    assert len(raised) >= 10 and sum(skipped) == len(raised)  # counted, not hidden
    state = torch.load(tmp_path / "run/maml/checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["learner"].values())


@pytest.mark.parametrize("value", ["nan", "inf", "-.inf"])
def test_config_refuses_non_finite_numbers(tmp_path, capsys, value):
    assert train(tmp_path, "--set", f"maml.inner_lr={value}") == 2
    assert "maml.inner_lr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- resume ----------------------------------------------------------------------------------------


def test_resume_refuses_changes_to_the_experiment_and_writes_nothing(tmp_path, capsys):
    assert train(tmp_path, "--set", "train.iterations=10") == 0
    config = (tmp_path / "run/config.yaml").read_bytes()
    assert train(tmp_path, "--resume", "--set", "maml.inner_lr=0.5", "--set", "train.meta_batch_size=3") == 2
    err = capsys.readouterr().err
    assert "maml.inner_lr: 0.01 -> 0.5" in err and "train.meta_batch_size: 25 -> 3" in err and "--out" in err
    assert (tmp_path / "run/config.yaml").read_bytes() == config
    # What cannot change what is learned may change, and the run's log says so.
    assert train(tmp_path, "--resume", "--set", "train.iterations=20", "--set", "train.log_every=5") == 0
    log = (tmp_path / "run/run.log").read_text()
    assert "started" in log and "resumed, changing train.iterations: 10 -> 20; train.log_every: 100 -> 5" in log


def test_resume_of_a_directory_without_a_run_says_so(tmp_path, capsys):
    assert train(tmp_path, "--resume") == 2
    assert "holds no run to resume" in capsys.readouterr().err


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "run"
    bad = ["train", "omniglot-5way-1shot", "--out", str(out), "--quiet", "--set", f"data.root={tmp_path / 'nowhere'}"]
    assert cli.main(bad) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert train(tmp_path, "--set", "train.iterations=5") == 0  # the same --out starts now


def test_cuda_without_a_gpu_is_a_sentence(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert train(tmp_path, "--set", "train.device=cuda") == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_malformed_run_config_names_the_file_and_line(tmp_path, capsys):
    """With a checkpoint, the run's settings are recovered from it (with a note naming the file and
    the line); without one, config.yaml is the only record and the resume is refused."""
    assert train(tmp_path, "--set", "train.iterations=5") == 0
    good = (tmp_path / "run/config.yaml").read_text()
    (tmp_path / "run/config.yaml").write_text("experiment: sinusoid\ntrain: [1, 2\n")
    capsys.readouterr()
    assert train(tmp_path, "--resume", "--set", "train.iterations=6") == 0
    out = capsys.readouterr().out
    assert "config.yaml cannot be read" in out and "line 2" in out and "checkpoint.pt" in out
    assert (tmp_path / "run/config.yaml").read_text() == good.replace("iterations: 5", "iterations: 6")

    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh/config.yaml").write_text("experiment: sinusoid\ntrain: [1, 2\n")
    assert cli.main(["train", "sinusoid", "--out", str(tmp_path / "fresh"), *FAST, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml" in err and "line" in err


# -- kills, locks ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    args = ["train", "sinusoid", *FAST, "--set", "train.checkpoint_every=50", "--set", "train.log_every=50"]
    straight = start([*args, "--out", "straight", "--set", "train.iterations=300"], tmp_path)
    assert straight.wait(timeout=600) == 0, straight.communicate()[0]
    killed = start([*args, "--out", "killed", "--set", "train.iterations=100000"], tmp_path)
    wait_for(tmp_path / "killed/maml/checkpoint.pt", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    done = torch.load(tmp_path / "killed/maml/checkpoint.pt", weights_only=False)["iteration"]
    assert done < 300, "killed too late to test a resume"
    resumed = start([*args, "--out", "killed", "--resume", "--set", "train.iterations=300"], tmp_path)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resuming from iteration {done}" in out, out
    a, b = weights(tmp_path / "straight/maml/checkpoint.pt"), weights(tmp_path / "killed/maml/checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed").rglob("*.tmp"))  # no temporary checkpoint left behind
    rows = [r.split(",")[0] for r in (tmp_path / "killed/maml/metrics.csv").read_text().splitlines()[1:]]
    assert rows == sorted(set(rows), key=int)  # each row once, in order, across the kill


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    args = ["train", "sinusoid", *FAST, "--out", "run", "--set", "train.checkpoint_every=20"]
    first = start([*args, "--set", "train.iterations=100000"], tmp_path)
    wait_for(tmp_path / "run/maml/checkpoint.pt", first)
    second = start([*args, "--resume"], tmp_path)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and f"in use by process {first.pid}" in out, out
    # Evaluating a run that is still training is allowed, and says so.
    evaluation = start(
        ["eval", "run", "--set", "eval.num_tasks=5", "--set", "eval.shots=[5]", "--name", "mid"], tmp_path
    )
    out, _ = evaluation.communicate(timeout=300)
    assert evaluation.returncode == 0 and f"is still training (process {first.pid}" in out, out
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    third = start([*args, "--resume", "--set", "train.iterations=40"], tmp_path)
    out, _ = third.communicate(timeout=600)
    assert third.returncode == 0, out


def test_models_trained_apart_with_only_are_those_of_the_whole_run(tmp_path, capsys):
    three = ["--set", "models=[maml,pretrained,oracle]", "--set", "train.iterations=30"]
    whole = ["train", "sinusoid", *FAST, *three, "--out", str(tmp_path / "whole")]
    assert cli.main(whole) == 0
    apart = ["train", "sinusoid", *FAST, *three, "--out", str(tmp_path / "apart")]
    assert cli.main([*apart, "--only", "oracle"]) == 0
    assert not (tmp_path / "apart/maml").exists()
    assert cli.main([*apart, "--resume", "--only", "pretrained,maml"]) == 0
    for kind in ("maml", "pretrained", "oracle"):  # each seeded by its place in models, not in --only
        a, b = (
            weights(tmp_path / "whole" / kind / "checkpoint.pt"),
            weights(tmp_path / "apart" / kind / "checkpoint.pt"),
        )
        assert all(torch.equal(a[k], b[k]) for k in a), kind
    assert "(training oracle only)" in (tmp_path / "apart/run.log").read_text()
    capsys.readouterr()
    assert cli.main([*apart, "--resume", "--only", "maml,bogus"]) == 2
    err = capsys.readouterr().err
    assert "--only: bogus not among this run's models (maml, pretrained, oracle)" in err, err


@pytest.mark.slow
def test_a_second_process_trains_the_runs_other_models_beside_the_first(tmp_path):
    args = ["train", "sinusoid", *FAST, "--out", "run", "--set", "models=[maml,pretrained]"]
    first = start([*args, "--only", "maml", "--set", "train.iterations=100000"], tmp_path)
    try:
        wait_for(tmp_path / "run/maml/checkpoint.pt", first)
        for clash in ([], ["--only", "maml"]):  # the whole run, or maml again: maml is taken
            second = start([*args, "--resume", *clash], tmp_path)
            out, _ = second.communicate(timeout=120)
            assert second.returncode == 2 and f"run/maml is in use by process {first.pid}" in out, out
            assert "beside it with --only" in out
        beside = start([*args, "--resume", "--only", "pretrained", "--set", "train.iterations=30"], tmp_path)
        out, _ = beside.communicate(timeout=600)
        assert beside.returncode == 0 and first.poll() is None, out
        # Its changed setting is the run's from now on, and it says so.
        assert f"note: process {first.pid}" in out and "train.iterations" in out, out
        assert torch.load(tmp_path / "run/pretrained/checkpoint.pt", weights_only=False)["iteration"] == 30
        evaluation = start(["eval", "run", "--set", "eval.num_tasks=5", "--set", "eval.shots=[5]"], tmp_path)
        out, _ = evaluation.communicate(timeout=300)
        assert evaluation.returncode == 0 and f"is still training (process {first.pid}" in out, out
    finally:
        first.kill()
        first.wait(timeout=60)


def test_a_run_held_whole_refuses_only_and_a_failed_start_beside_another_leaves_its_files(
    tmp_path, monkeypatch, capsys
):
    hold = (  # a process holding the whole run, as a few-shot run (or an older mamlkit) does
        "import sys, time; from pathlib import Path; from mamlkit.training import runs; "
        "runs.lock(Path(sys.argv[1]), shared=sys.argv[2] == 'shared'); "
        "[runs.lock(Path(sys.argv[1]) / m) for m in sys.argv[3:]]; print('held', flush=True); time.sleep(600)"
    )

    def holding(*args: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", hold, str(tmp_path / "run"), *args], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout.readline().strip() == "held"
        return p

    args = ["train", "sinusoid", "--out", str(tmp_path / "run"), *FAST, "--set", "models=[maml,pretrained]"]
    assert cli.main([*args, "--set", "train.iterations=2"]) == 0
    whole = holding("exclusive")
    try:
        assert cli.main([*args, "--resume", "--only", "pretrained"]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {whole.pid} " in err and "--only" not in err.split("; ", 1)[1], err
        from mamlkit.training import runs

        assert runs.holder(tmp_path / "run").startswith(f"process {whole.pid} ")
    finally:
        whole.kill()
        whole.wait(timeout=60)
    # A fresh start that fails before its first checkpoint, while another process trains a model of
    # the run: what the run holds stays (it is the other process's too).
    fresh = tmp_path / "fresh"
    other = subprocess.Popen(
        [sys.executable, "-c", hold, str(fresh), "shared", "pretrained"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "held"
        (fresh / "pretrained/metrics.csv").write_text("iteration,loss\n")
        from mamlkit.experiments import sinusoid

        def fail(*args, **kwargs):
            raise RuntimeError("the model could not be built")

        monkeypatch.setattr(sinusoid, "make_learner", fail)
        args = ["train", "sinusoid", "--out", str(fresh), *FAST, "--set", "models=[maml,pretrained]"]
        assert cli.main([*args, "--only", "maml"]) == 2
        assert (fresh / "config.yaml").exists() and (fresh / "pretrained/metrics.csv").read_text() == "iteration,loss\n"
    finally:
        other.kill()
        other.wait(timeout=60)


def test_only_names_some_of_the_runs_models(tmp_path, capsys):
    for only, message in (
        ("", "--only: no model named; name some of this run's models (maml)"),
        ("oracle", "--only: oracle not among this run's models (maml)"),
    ):
        assert train(tmp_path / only, "--only", only) == 2
        assert message in capsys.readouterr().err
    assert train(tmp_path, "--set", "models=[maml,maml]") == 2
    assert "models: maml listed more than once" in capsys.readouterr().err


# -- evaluation ---------------------------------------------------------------------------------------


def test_devices_are_checked_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, "--set", "train.iterations=2", "--set", "eval.num_tasks=3") == 0
    assert cli.main(["train", "sinusoid", "--out", str(tmp_path / "gpu"), *FAST, "--set", "train.device=gpu"]) == 2
    assert "train.device: 'gpu' is not a torch device; use cpu, cuda, cuda:N or auto" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a torch device" in capsys.readouterr().err
    assert cli.main(["eval", str(out), "--device", "auto", "--set", "eval.num_tasks=3", "--name", "auto"]) == 0
    assert (out / "eval-auto.json").exists()
    assert cli.main(["eval", str(out), "--device", "gpu"]) == 2
    assert "--device: 'gpu' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["eval", str(out), "--device", "cuda"]) == 2
        assert "--device=cuda but no CUDA GPU is visible; use cpu or auto" in capsys.readouterr().err
        saved = out / "config.yaml"
        saved.write_text(saved.read_text().replace("device: cpu", "device: cuda"))
        assert cli.main(["eval", str(out)]) == 2
        assert "trained on cuda, and no CUDA GPU is visible here; add --device cpu" in capsys.readouterr().err
        assert cli.main(["eval", str(out), "--device", "cpu", "--set", "eval.num_tasks=3"]) == 0


def test_a_config_file_must_say_what_it_is(tmp_path, capsys):
    """An empty file, or one without ``base:`` or ``experiment:``, is refused instead of running
    the sinusoid defaults; on --resume, a config argument the run was not made from is named."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    bare = tmp_path / "bare.yaml"
    bare.write_text("train:\n  iterations: 5\n")
    for path in (empty, bare):
        assert cli.main(["train", str(path), "--out", str(tmp_path / path.stem), "--quiet"]) == 2
        assert "names no experiment: start it with `base: PRESET`" in capsys.readouterr().err
        assert not (tmp_path / path.stem).exists()
    assert train(tmp_path, "--set", "train.iterations=2") == 0
    capsys.readouterr()
    args = ["train", "rl-navigation2d-tiny", "--out", str(tmp_path / "run"), "--resume", "--quiet"]
    assert cli.main([*args, "--set", "train.iterations=3"]) == 0
    said = capsys.readouterr().out
    assert "is a sinusoid run, not made from 'rl-navigation2d-tiny'" in said and "resuming from iteration 2" in said
    assert torch.load(tmp_path / "run/maml/checkpoint.pt", weights_only=False)["iteration"] == 3
    same = ["train", "sinusoid", "--out", str(tmp_path / "run"), "--resume", *FAST]
    assert cli.main([*same, "--set", "train.iterations=3"]) == 0  # what it was made from: nothing to say
    assert "note:" not in capsys.readouterr().out
    assert cli.main(same) == 0  # without the --set it started with: the run keeps its 3 iterations
    said = capsys.readouterr().out
    assert "differs from 'sinusoid' (train.iterations: 3 here, 70000 in sinusoid)" in said, said
    assert "maml: already trained, 3 of 3 iterations; nothing to do" in said, said


@pytest.mark.slow
def test_eval_refuses_to_drop_a_model_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "sinusoid",
                "--out",
                str(out),
                "--quiet",
                "--set",
                "models=[maml,oracle]",
                "--set",
                "train.iterations=5",
                "--set",
                "eval.num_tasks=5",
                "--set",
                "eval.shots=[5]",
            ]
        )
        == 0
    )
    (out / "oracle/checkpoint.pt").unlink()
    assert cli.main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert "['oracle'] have no checkpoint" in err and "--models maml" in err
    assert not (out / "eval.json").exists()
    assert cli.main(["eval", str(out), "--models", "maml"]) == 0
    assert '"oracle"' not in (out / "eval.json").read_text()


def test_corrupt_eval_json_names_the_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, "--set", "train.iterations=5") == 0
    (out / "eval.json").write_text("{not json")
    assert cli.main(["plot", str(out)]) == 2
    assert "eval.json is not valid JSON" in capsys.readouterr().err


def test_named_evaluation_keeps_the_default_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tmp_path, "--set", "train.iterations=5", "--set", "eval.num_tasks=5", "--set", "eval.shots=[5]") == 0
    assert cli.main(["eval", str(out)]) == 0
    default = (out / "eval.json").read_bytes()
    assert cli.main(["eval", str(out), "--name", "k10", "--set", "eval.shots=[10]"]) == 0
    assert (out / "eval.json").read_bytes() == default
    assert list(json.loads((out / "eval-k10.json").read_text())["models"]["maml"]["shots"]) == ["10"]
    assert "| MAML | 10 |" in (out / "eval-k10.md").read_text()
    capsys.readouterr()
    # A name that is not a plain file stem fails before the evaluation, and nothing is written.
    assert cli.main(["eval", str(out), "--name", "../elsewhere"]) == 2
    assert "--name '../elsewhere'" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("eval*")) == ["eval-k10.json", "eval-k10.md", "eval.json", "eval.md"]


def test_damaged_metrics_csv_is_named_on_resume(tmp_path, capsys):
    assert train(tmp_path, "--set", "train.iterations=10", "--set", "train.log_every=5") == 0
    (tmp_path / "run/maml/metrics.csv").write_text("iteration,loss\n5,zz\n10,0.3\n")
    assert train(tmp_path, "--resume", "--set", "train.iterations=20") == 2
    err = capsys.readouterr().err
    assert "metrics.csv is damaged: line 2 has 'zz' as loss" in err and "checkpoints are intact" in err
    (tmp_path / "run/maml/metrics.csv").write_text("iteration,loss\n5,0.3\n10,zz\n")
    assert train(tmp_path, "--resume", "--set", "train.iterations=20") == 2
    err = capsys.readouterr().err
    assert "damaged at its end (1 row from line 3 (has 'zz' as loss))" in err and "ends at iteration 5" in err


def test_corrupt_checkpoint_advice_fits_the_command(tmp_path, capsys):
    assert train(tmp_path, "--set", "train.iterations=5") == 0
    (tmp_path / "run/maml/checkpoint.pt").write_bytes(b"not a checkpoint")
    assert train(tmp_path, "--resume", "--set", "train.iterations=10") == 2
    err = capsys.readouterr().err
    assert "unreadable" in err and "restart maml from iteration 0" in err


def test_eval_tables_show_only_steps_that_were_run(tmp_path):
    out = tmp_path / "run"
    args = ["--set", "models=[maml,oracle]", "--set", "train.iterations=5", "--set", "eval.num_tasks=5"]
    assert cli.main(["train", "sinusoid", "--out", str(out), "--quiet", *args, "--set", "eval.shots=[5]"]) == 0
    assert cli.main(["eval", str(out), "--set", "eval.steps=1"]) == 0
    rows = {line.split("|")[1].strip(): line for line in (out / "eval.md").read_text().splitlines() if "| 5 |" in line}
    maml_cells = [c.strip() for c in rows["MAML"].split("|")[4:-1]]
    assert maml_cells[2:] == ["–", "–"] and "±" in maml_cells[1]  # 5 and 10 steps were not run
    oracle = [c.strip() for c in rows["oracle"].split("|")[1:-1]]
    assert oracle[2] == "–" and oracle[4:] == ["–", "–", "–"]  # no step size, no steps


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("mamlkit ")


@pytest.mark.slow
def test_ctrl_c_during_eval_is_a_line_not_a_traceback(tmp_path):
    args = ["train", "sinusoid", *FAST, "--out", "run", "--set", "train.iterations=5"]
    assert start(args, tmp_path).wait(timeout=300) == 0
    # Many short evaluations (40 of 20,000 tasks): Python regains control often to see the signal.
    log = tmp_path / "eval.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamlkit", "eval", "run", "--set", "eval.num_tasks=20000"]
    with log.open("w") as out:
        # SIGINT as a terminal delivers it: a shell's background job (a CI runner's, say) starts its
        # children with SIGINT ignored, and Python then keeps ignoring it.
        ev = subprocess.Popen(
            [*cmd, "--set", f"eval.shots={[5] * 40}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=out,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 300
        while "eval:" not in log.read_text():  # inside the evaluation, past the imports
            assert ev.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1)
        ev.send_signal(signal.SIGINT)
        ev.wait(timeout=120)
    text = log.read_text()
    assert ev.returncode == 130 and "interrupted" in text and "Traceback" not in text, text
    assert not (tmp_path / "run/eval.json").exists()


def test_missing_mujoco_is_a_sentence(tmp_path, capsys, monkeypatch):
    error = pytest.importorskip("gymnasium.error")
    from mamlkit import experiments

    def no_mujoco(name):
        raise error.DependencyNotInstalled('MuJoCo is not installed, run `pip install "gymnasium[mujoco]"`')

    monkeypatch.setattr(experiments, "get", no_mujoco)
    assert cli.main(["train", "rl-halfcheetah-vel", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "MuJoCo is not installed" in err and "mamlkit[mujoco]" in err


def test_compiling_says_so(tmp_path, capsys):
    from mamlkit.training import AdamUpdate, Trainer

    class Learner(torch.nn.Module):  # stands for a MAML with compile=True
        compiles = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def meta_backward(self, batch):
            loss = (self.w * batch).sum()
            loss.backward()
            return loss.detach()

    learner = Learner()
    update = AdamUpdate(learner, lambda g: torch.ones(1), meta_lr=0.1)
    Trainer(tmp_path, learner, update, torch.Generator(), iterations=2, checkpoint_every=2, log_every=1).fit()
    assert "compiling the meta-batch computation" in capsys.readouterr().out


def test_metric_rows_keep_their_columns_whatever_the_key_order(tmp_path):
    from mamlkit.training.metrics import MetricLog, read_metrics

    log = MetricLog(tmp_path, tensorboard=False)
    log.log(5, skipped=7.0, loss=1.0)
    log.log(10, loss=2.0, skipped=3.0)  # the same columns, another order
    log.log(15, loss=4.0)  # one missing
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(r["loss"], r.get("skipped")) for r in rows] == [(1.0, 7.0), (2.0, 3.0), (4.0, None)]


def test_large_finite_gradients_are_not_called_divergence():
    from mamlkit.training.loop import all_finite

    assert all_finite([torch.full((1000,), 1e18), torch.full((4,), 3e19)])  # an L2 norm would overflow
    assert not all_finite([torch.tensor([1.0, float("nan")])]) and not all_finite([torch.tensor([float("inf")])])


def test_a_task_stream_saved_on_another_device_is_reseeded_not_a_crash():
    from mamlkit.training import checkpoint as ckpt

    g = torch.Generator().manual_seed(0)
    state = ckpt.rng_state(g)
    state["tasks"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    assert not ckpt.set_rng_state(state, g, reseed=42)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(42)))
