"""Sinusoid tasks, the training loop (resume, logs) and the experiment end to end."""

import csv
import json
import math
import time

import pytest
import torch

from mamlkit import config
from mamlkit.experiments import load_config, sinusoid
from mamlkit.tasks import SinusoidTasks
from mamlkit.training import AdamUpdate, RunExistsError, Trainer, mean_ci


def small_cfg(**overrides):
    sets = {
        "train.iterations": 40,
        "train.checkpoint_every": 20,
        "train.log_every": 10,
        "train.meta_batch_size": 5,
        "maml.compile": False,
        "eval.num_tasks": 20,
        "eval.tune_tasks": 10,
        "eval.steps": 3,
        "eval.tune_lrs": [0.001, 0.01],
        **overrides,
    }
    return load_config("sinusoid", [f"{k}={v}" for k, v in sets.items()])


def test_sinusoid_tasks_follow_the_distribution():
    tasks = SinusoidTasks()
    g = torch.Generator().manual_seed(0)
    amp, phase = tasks.sample_params(4000, g)
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= phase.min() and phase.max() <= math.pi
    assert abs(amp.mean().item() - 2.55) < 0.1 and abs(phase.mean().item() - math.pi / 2) < 0.1
    b = tasks.batch(7, 5, 3, g)
    assert b.support_inputs.shape == (7, 5, 1) and b.query_targets.shape == (7, 3, 1)
    assert b.support_inputs.abs().max() <= 5.0
    # Support and query points of a task lie on the same sinusoid: fit A and phi from 8 points.
    x = torch.cat([b.support_inputs, b.query_inputs], 1)[0, :, 0].double()
    y = torch.cat([b.support_targets, b.query_targets], 1)[0, :, 0].double()
    coef = torch.linalg.lstsq(torch.stack([torch.sin(x), torch.cos(x)], 1), y[:, None]).solution
    torch.testing.assert_close(torch.stack([torch.sin(x), torch.cos(x)], 1) @ coef, y[:, None], atol=1e-5, rtol=1e-5)


def test_task_stream_is_deterministic_for_a_seed():
    tasks = SinusoidTasks()
    a = tasks.batch(3, 4, 4, torch.Generator().manual_seed(5))
    b = tasks.batch(3, 4, 4, torch.Generator().manual_seed(5))
    c = tasks.batch(3, 4, 4, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.support_inputs, c.support_inputs)


def test_oracle_inputs_carry_the_task():
    tasks = SinusoidTasks(oracle=True)
    b = tasks.batch(2, 3, 3, torch.Generator().manual_seed(0))
    assert b.support_inputs.shape == (2, 3, 3)
    x, amp, phase = b.support_inputs[..., 0], b.support_inputs[..., 1], b.support_inputs[..., 2]
    torch.testing.assert_close(b.support_targets[..., 0], amp * torch.sin(x - phase))
    assert torch.equal(amp[:, 0], amp[:, 1])


def test_mean_ci():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, ci = mean_ci(values)
    assert mean.item() == pytest.approx(2.5)
    assert ci.item() == pytest.approx(1.96 * values.std().item() / 2)
    mean, ci = mean_ci(torch.tensor([3.0]))  # one value: no interval, not a zero-width one
    assert mean.item() == 3.0 and math.isnan(ci.item())


class LinearLearner(torch.nn.Module):
    """A learner whose meta-gradient is the batch itself: the update's arithmetic shows exactly."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def meta_backward(self, batch):
        loss = (self.w * batch).sum()
        loss.backward()
        return loss.detach()


def scaled_noise(g: torch.Generator) -> torch.Tensor:
    return torch.randn(4, generator=g) * torch.tensor([0.01, 0.5, 5.0, 50.0])


def test_adam_update_clips_each_gradient_element():
    def weights_after(grad_clip):
        learner = LinearLearner()
        update = AdamUpdate(learner, scaled_noise, meta_lr=0.1, grad_clip=grad_clip)
        g = torch.Generator().manual_seed(0)
        for _ in range(5):
            update.step(g)
        return learner.w.detach().clone()

    # The same steps by hand: Adam on each gradient clamped to [-1, 1].
    w = torch.nn.Parameter(torch.zeros(4))
    adam = torch.optim.Adam([w], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        w.grad = scaled_noise(g).clamp(-1, 1)
        adam.step()
    torch.testing.assert_close(weights_after(1.0), w.detach())
    assert not torch.allclose(weights_after(None), w.detach())  # unclipped takes other steps


def test_best_checkpoint_holds_the_best_validated_weights_across_a_resume(tmp_path):
    scores = iter([0.3, 0.7, 0.5, 0.6])

    def trainer(iterations):
        learner = LinearLearner()
        return Trainer(
            tmp_path,
            learner,
            AdamUpdate(learner, scaled_noise, meta_lr=0.1),
            torch.Generator().manual_seed(0),
            iterations=iterations,
            checkpoint_every=1,
            log_every=1,
            keep_every=1,
            validate=lambda: {"acc": next(scores)},
            validate_every=1,
            select_on="acc",
        )

    trainer(3).fit(progress=False)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    second = torch.load(tmp_path / "checkpoint-2.pt", weights_only=False)
    assert best["iteration"] == 2 and best["acc"] == 0.7
    assert torch.equal(best["learner"]["w"], second["learner"]["w"])
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not torch.equal(best["learner"]["w"], last["learner"]["w"])
    # Resumed, a score below the best so far (0.6 < 0.7) leaves best.pt alone.
    trainer(4).fit(resume=True, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["iteration"] == 4
    assert torch.load(tmp_path / "best.pt", weights_only=False)["iteration"] == 2
    assert next(scores, None) is None  # every iteration was validated


def test_test_tasks_are_nested_over_k_and_the_same_for_every_model():
    cfg = small_cfg()
    five = sinusoid.test_tasks(cfg, "maml", 6, 5, seed=3)
    ten = sinusoid.test_tasks(cfg, "pretrained", 6, 10, seed=3)
    assert torch.equal(ten.support_inputs[:, :5], five.support_inputs)  # K=5 is the first 5 of K=10's
    assert torch.equal(ten.support_targets[:, :5], five.support_targets)
    assert torch.equal(ten.query_inputs, five.query_inputs) and torch.equal(ten.query_targets, five.query_targets)
    other = sinusoid.test_tasks(cfg, "maml", 6, 5, seed=4)
    assert not torch.equal(other.query_targets, five.query_targets)


def test_pretrained_step_size_is_chosen_on_held_out_tasks_and_never_a_diverged_one():
    cfg = small_cfg(**{"eval.tune_lrs": "[0.001,0.01,0.1]"})
    seen = []

    class Stub:  # query MSE after 0..steps steps for each step size: 0.1 diverges, 0.01 is best
        def adaptation_curve(self, batch, steps, lr):
            seen.append(batch)
            per_step = {0.001: 1.0, 0.01: 0.5, 0.1: float("nan")}[lr]
            return {"loss": torch.full((batch.query_inputs.shape[0], steps + 1), per_step)}

    lr, scores = sinusoid._tune_lr(Stub(), cfg, "pretrained", 5)
    assert lr == 0.01 and scores["0.1"] == float("inf")
    test = sinusoid.test_tasks(cfg, "pretrained", cfg.eval.num_tasks, 5, cfg.eval.seed)
    assert len(seen[0].query_inputs) == cfg.eval.tune_tasks
    assert not torch.equal(seen[0].support_targets[:1], test.support_targets[:1])  # never the test tasks


def diverging_mse(tasks=10, steps=10):
    """Query MSE after 0..steps steps: 0.5, but task 0 blows up after 6 steps and task 1 at step 5 only."""
    mse = torch.full((tasks, steps + 1), 0.5)
    mse[0, 6:] = float("inf")
    mse[1, 5] = 200.0  # far above any sinusoid's variance
    mse[2, :] = 1.5  # poor but finite: not diverged
    return mse


def results_of(shots: dict, models=("maml",), num_tasks=10) -> dict:
    return {
        "eval": {"num_tasks": num_tasks, "tune_lrs": [0.01, 0.1], "tune_tasks": 20},
        "models": {
            kind: {"iterations": 1, "shots": {k: {"lr": 0.01, **r} for k, r in shots.items()}} for kind in models
        },
    }


def test_diverged_tasks_are_left_out_of_the_mean_and_counted():
    s = sinusoid.summarise(diverging_mse())
    assert s["diverged"] == [0] * 5 + [1] * 6 and s["diverged_tasks"] == 2
    assert s["mse"][1] == pytest.approx((9 * 0.5 + 1.5) / 10)
    assert s["mse"][5] == pytest.approx((8 * 0.5 + 1.5) / 9)  # task 1's 200 left out at step 5 only
    assert s["mse"][10] == pytest.approx((8 * 0.5 + 1.5) / 9)
    assert all(math.isfinite(v) for v in s["mse"] + s["ci95"])
    assert s["median"][10] == 0.5


def test_table_shows_the_mean_of_the_others_and_the_diverged_count_never_inf():
    fine = sinusoid.summarise(torch.full((10, 11), 0.25))
    table = sinusoid.format_table(results_of({"5": sinusoid.summarise(diverging_mse()), "10": fine}))
    rows = [line for line in table.splitlines() if line.startswith("| MAML")]
    cells = [c.strip() for c in rows[0].split("|")[4:-1]]  # after 0, 1, 5 and 10 steps
    assert cells[0] == "0.600 ± 0.196" and "diverged" not in cells[1]
    assert cells[2].endswith("(1 diverged)") and cells[3] == "0.611 ± 0.218 (1 diverged)"
    assert "inf" not in table and "nan" not in table and "†" not in table
    assert "diverged" not in rows[1] and "has diverged: the mean leaves it out" in table


def test_a_step_where_every_task_diverged_has_no_mean_and_eval_json_stays_strict(tmp_path):
    from mamlkit.training.runs import write_eval

    mse = torch.full((4, 3), 0.5)
    mse[:, 2] = float("nan")
    mse[:3, 1] = float("inf")
    s = sinusoid.summarise(mse)
    results = results_of({"5": s}, num_tasks=4)
    table = sinusoid.format_table(results, steps_shown=(0, 1, 2))
    assert "| 0.500 ± 0.000 | 0.500 (3 diverged) | – (4 diverged) |" in table and "nan" not in table
    write_eval(tmp_path, results, table)
    saved = json.loads((tmp_path / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    shot = saved["models"]["maml"]["shots"]["5"]
    assert shot["mse"][2] is None and shot["median"][1:] == [None, None] and shot["diverged"] == [0, 3, 4]


def test_the_oracle_sentence_only_when_an_oracle_ran():
    shots = {"5": sinusoid.summarise(torch.full((10, 11), 0.25))}
    assert "oracle" not in sinusoid.format_table(results_of(shots, ("maml", "pretrained"))).lower()
    with_oracle = sinusoid.format_table(results_of(shots, ("maml", "pretrained", "oracle")))
    assert "the oracle takes no steps" in with_oracle and "pretrained baseline's step size" in with_oracle


def test_mse_plot_stays_at_the_unadapted_scale_and_names_the_diverged_tasks():
    mse = diverging_mse()
    mse[3:, 4:] = 50.0  # a curve that climbs far above the unadapted error (finite, not diverged)
    results = results_of({"5": sinusoid.summarise(diverging_mse()), "10": sinusoid.summarise(mse)})
    fig = sinusoid.mse_figure(results)
    for ax in fig.axes:
        assert ax.get_ylim() == pytest.approx((0, 1.15 * 0.6))
        (label,) = [t.get_text() for t in ax.get_legend().get_texts()]
        assert label == "MAML (2 of 10 tasks diverged)"
    markers = [ln for ln in fig.axes[1].get_lines() if ln.get_marker() == "^"]  # the points above the axis
    assert len(markers) == 1 and list(markers[0].get_xdata()) == list(range(4, 11))


def test_resume_continues_exactly(tmp_path):
    """A run killed after its first checkpoint and resumed ends where an uninterrupted run does."""
    # A fixed strategy: "auto" measures on the first batch, and on a loaded machine a resumed run
    # can choose the other one, whose float rounding differs.
    cfg = small_cfg(models="[maml]", **{"maml.strategy": "vmap"})

    def trainer(run_dir, sample=None, time_limit=0.0):
        torch.manual_seed(0)
        learner = sinusoid.make_learner(cfg, "maml")
        tasks = sinusoid.make_tasks(cfg, "maml")
        return Trainer(
            run_dir,
            learner,
            AdamUpdate(learner, sample or sinusoid.make_sampler(cfg, "maml", tasks), meta_lr=1e-3),
            torch.Generator().manual_seed(1),
            iterations=40,
            checkpoint_every=20,
            log_every=10,
            deadline=time.monotonic() + time_limit if time_limit else float("inf"),
        )

    straight = trainer(tmp_path / "straight")
    assert straight.fit(progress=False)

    calls = {"n": 0}
    real = sinusoid.make_sampler(cfg, "maml", sinusoid.make_tasks(cfg, "maml"))

    def dies_at_30(g):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt  # like a kill between checkpoints
        return real(g)

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "killed", dies_at_30).fit(progress=False)
    with pytest.raises(RunExistsError):
        trainer(tmp_path / "killed").fit(progress=False)
    resumed = trainer(tmp_path / "killed")
    assert resumed.fit(resume=True, progress=False)
    assert resumed.iteration == 40
    for a, b in zip(straight.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    with open(tmp_path / "killed" / "metrics.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [10, 20, 30, 40]

    # A time limit stops like a signal does: checkpoint saved, and --resume ends at the same place.
    timed = trainer(tmp_path / "timed", time_limit=1e-9)
    assert not timed.fit(progress=False)
    assert timed.iteration == 1 and timed.checkpoint_path.exists()
    resumed = trainer(tmp_path / "timed")
    assert resumed.fit(resume=True, progress=False) and resumed.iteration == 40
    for a, b in zip(straight.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(config.ConfigError, match=r"unknown key 'train.iteratons'.*iterations"):
        load_config("sinusoid", ["train.iteratons=5"])
    with pytest.raises(config.ConfigError, match=r"maml.inner_lr: -1.0 out of range"):
        load_config("sinusoid", ["maml.inner_lr=-1"])
    with pytest.raises(config.ConfigError, match=r"maml.strategy: 'fast' not allowed; choose from"):
        load_config("sinusoid", ["maml.strategy=fast"])
    with pytest.raises(config.ConfigError, match=r"train.iterations: expected an integer"):
        load_config("sinusoid", ["train.iterations=many"])
    with pytest.raises(config.ConfigError, match=r"unknown preset 'nope'"):
        load_config("nope")
    with pytest.raises(config.ConfigError, match=r"task.amplitude: expected \[low, high\]"):
        load_config("sinusoid", ["task.amplitude=[5, 1]"])
    cfg = load_config("sinusoid", ["train.iterations=12", "maml.adapt=['2.*']"])
    assert cfg.train.iterations == 12 and cfg.maml.adapt == ["2.*"] and cfg.maml.inner_lr == 0.01


def test_maml_section_is_the_engines_options():
    """The ``maml:`` section holds exactly MAML's keyword options with the engine's defaults, so a
    config builds MAML whole (nothing copied by hand, nothing dropped)."""
    import dataclasses
    import inspect

    from mamlkit import MAML
    from mamlkit.experiments import build_maml

    engine = inspect.signature(MAML).parameters
    for f in dataclasses.fields(config.MAMLConfig):
        assert f.name in engine and engine[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert f.default == engine[f.name].default, f.name
    cfg = load_config("sinusoid", ["maml.inner_lr=0.3", "maml.inner_steps=2", "maml.first_order=true"])
    maml = build_maml(torch.nn.Linear(1, 1), torch.nn.functional.mse_loss, cfg.maml)
    assert (maml.inner_lr, maml.inner_steps, maml.first_order) == (0.3, 2, True)


def test_legacy_checkpoint_resumes_with_its_adam_state(tmp_path):
    """Checkpoints written before the update piece kept Adam's state as "optimizer": resuming one
    continues exactly as resuming a current one does."""
    cfg = small_cfg(models="[maml]", **{"maml.strategy": "vmap"})  # no timing-dependent choice

    def trainer(run_dir, iterations):
        torch.manual_seed(0)
        learner = sinusoid.make_learner(cfg, "maml")
        sample = sinusoid.make_sampler(cfg, "maml", sinusoid.make_tasks(cfg, "maml"))
        return Trainer(
            run_dir,
            learner,
            AdamUpdate(learner, sample, meta_lr=1e-2),
            torch.Generator().manual_seed(1),
            iterations=iterations,
            checkpoint_every=5,
            log_every=5,
        )

    for name in ("current", "legacy"):
        assert trainer(tmp_path / name, 10).fit(progress=False)
    path = tmp_path / "legacy" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["optimizer"] = state.pop("update")
    torch.save(state, path)
    finished = [trainer(tmp_path / name, 20) for name in ("current", "legacy")]
    assert all(t.fit(resume=True, progress=False) for t in finished)
    for a, b in zip(finished[0].learner.parameters(), finished[1].learner.parameters()):
        assert torch.equal(a, b)


def test_user_yaml_works_like_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("experiment: sinusoid\ntrain:\n  iterations: 7\n")
    assert load_config(str(path)).train.iterations == 7
    path.write_text("experiment: sinusoid\ntrain:\n  iterations: 0\n")
    with pytest.raises(config.ConfigError, match="train.iterations: 0 out of range"):
        load_config(str(path))


def test_maml_learns_and_beats_pretrained(tmp_path):
    """Short end-to-end run: MAML's meta-loss falls and one step beats the pretrained baseline."""
    cfg = small_cfg(
        **{
            "train.iterations": 2000,
            "train.log_every": 100,
            "train.checkpoint_every": 2000,
            "train.meta_lr": 0.003,
            "train.meta_batch_size": 10,
            "maml.strategy": "vmap",
            "models": "[maml, pretrained, oracle]",
            "eval.num_tasks": 100,
            "eval.shots": "[10]",
            "eval.steps": 5,
        }
    )
    assert sinusoid.train(cfg, tmp_path, progress=False)
    with open(tmp_path / "maml" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]
    results = sinusoid.evaluate(tmp_path)
    mse = {k: v["shots"]["10"]["mse"] for k, v in results["models"].items()}
    assert mse["maml"][1] < 0.5 * mse["maml"][0]  # one step helps a lot
    assert mse["maml"][1] < mse["pretrained"][1]
    assert mse["oracle"][0] < mse["maml"][1]  # the oracle knows the task
    assert json.loads((tmp_path / "eval.json").read_text())["models"]["maml"]["iterations"] == 2000
    assert "| MAML | 10 |" in (tmp_path / "eval.md").read_text()
    for png in sinusoid.plot(tmp_path):
        assert png.stat().st_size > 10_000


def test_cli_refuses_a_bad_config_before_anything_runs(tmp_path, capsys):
    from mamlkit import cli

    out = tmp_path / "run"
    assert cli.main(["train", "sinusoid", "--out", str(out), "--set", "maml.inner_steps=-1"]) == 2
    assert "maml.inner_steps: -1 out of range" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["presets"]) == 0
    assert "omniglot-5way-1shot" in capsys.readouterr().out
    assert cli.main(["eval", str(tmp_path / "nothing")]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


def test_cli_train_refuses_to_overwrite_and_resumes(tmp_path, capsys):
    from mamlkit import cli

    out = str(tmp_path / "run")
    args = [
        "train",
        "sinusoid",
        "--out",
        out,
        "--quiet",
        "--set",
        "models=[maml]",
        "--set",
        "maml.compile=false",
        "--set",
        "train.iterations=20",
        "--set",
        "train.log_every=10",
        "--set",
        "train.checkpoint_every=10",
    ]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(args[:-2] + ["--set", "train.iterations=30", "--resume"]) == 0
    with open(tmp_path / "run" / "maml" / "metrics.csv") as f:
        assert [int(r["iteration"]) for r in csv.DictReader(f)] == [10, 20, 30]
    # A refused second run leaves the first run's config as it was.
    assert "iterations: 30" in (tmp_path / "run" / "config.yaml").read_text()
    assert cli.main(args[:-2] + ["--set", "train.iterations=99"]) == 2
    assert "iterations: 30" in (tmp_path / "run" / "config.yaml").read_text()
