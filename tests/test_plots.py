"""The figures' axes say what they show, in the units of the tables beside them."""

import json

import pytest

from mamlkit import cli, compare, plots
from mamlkit.experiments import fewshot, load_config, sinusoid
from mamlkit.training import runs


@pytest.fixture
def figures(monkeypatch):
    """The figures the experiments save, by file name, instead of their PNGs."""
    saved = {}

    def keep(fig, path):
        saved[path.name] = fig
        return path

    monkeypatch.setattr(plots, "save", keep)
    return saved


def test_fewshot_validation_accuracy_is_plotted_in_percent(tmp_path, figures):
    (tmp_path / "metrics.csv").write_text("iteration,loss,val_acc\n10,1.2,0.5\n20,0.9,0.625\n")
    fewshot.plot(tmp_path)
    (ax,) = figures["val_acc.png"].axes
    assert ax.get_ylabel() == "validation accuracy (%)"
    assert list(ax.get_lines()[0].get_ydata()) == [50.0, 62.5]
    assert "cross-entropy" in figures["training_loss.png"].axes[0].get_ylabel()


def test_sinusoid_figures_label_their_axes_and_name_each_loss(tmp_path, figures):
    sets = {
        "train.iterations": 4,
        "train.checkpoint_every": 4,
        "train.log_every": 2,
        "train.meta_batch_size": 2,
        "train.threads": 1,
        "maml.compile": False,
        "models": "[maml, pretrained]",
        "eval.num_tasks": 4,
        "eval.tune_tasks": 2,
        "eval.steps": 2,
        "eval.shots": "[5]",
    }
    cfg = load_config("sinusoid", [f"{k}={v}" for k, v in sets.items()])
    assert sinusoid.train(cfg, tmp_path, progress=False)
    sinusoid.evaluate(tmp_path, progress=False)
    sinusoid.plot(tmp_path)
    for ax in figures["fits.png"].axes:
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "y")
    (ax,) = figures["training_loss.png"].axes
    assert ax.get_ylabel() == "training MSE"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["MAML: query MSE after the inner steps", "pretrained: MSE, no inner step"]


def _run(path, rows, inner_steps=1, acc=None):
    """A run directory: ``metrics.csv`` from ``rows`` (iteration, its_per_s, val_acc or None), and an
    ``eval.json`` whose paper-protocol accuracy after s steps is ``acc[s]`` (± s / 10)."""
    path.mkdir()
    lines = ["iteration,loss,its_per_s,val_acc"]
    lines += [f"{it},1.0,{speed},{'' if val is None else val}" for it, speed, val in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    (path / "config.yaml").write_text(f"experiment: fewshot\nmaml:\n  inner_steps: {inner_steps}\n")
    if acc:
        protocols = {"paper": {"acc": acc, "ci95": [s / 10 for s in range(len(acc))]}}
        (path / "eval.json").write_text(json.dumps({"protocols": protocols}))
    return path


def test_compare_draws_each_run_against_iterations_and_training_time(tmp_path, figures):
    a = _run(tmp_path / "a", [(100, 10.0, None), (200, 5.0, 0.5), (300, 2.0, 0.75), (400, 4.0, 0.7)], 1, [20, 70, 71])
    b = _run(tmp_path / "b", [(200, 1.0, 0.4), (400, 2.0, 0.9)], 2, [20, 60, 80])
    written = compare.compare([a, b], tmp_path / "out", labels=["MAML", "ANIL"])
    by_iteration, by_time = figures["val_acc.png"].axes
    maml, anil = by_iteration.get_lines()
    assert list(maml.get_xdata()) == [200, 300, 400] and list(maml.get_ydata()) == [50.0, 75.0, 70.0]
    # hours: 100 its at 10/s, then 100 at 5/s, 100 at 2/s, 100 at 4/s
    seconds = [100 / 10 + 100 / 5, 100 / 10 + 100 / 5 + 100 / 2, 100 / 10 + 100 / 5 + 100 / 2 + 100 / 4]
    assert by_time.get_lines()[0].get_xdata() == pytest.approx([s / 3600 for s in seconds])
    assert by_time.get_lines()[1].get_xdata() == pytest.approx([200 / 3600, 300 / 3600])
    assert "training time" in by_time.get_xlabel() and by_iteration.get_ylabel() == "val_acc (%)"
    assert [line.get_label() for line in (maml, anil)] == ["MAML", "ANIL"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert tmp_path / "out" / "compare.md" in written
    # each run's best validation figure with its iteration, and the test accuracy after its own inner steps
    assert "| MAML |" in table and "75.00 (300)" in table and "71.00 ± 0.20 (2 steps)" not in table
    assert "70.00 ± 0.10 (1 step)" in table and "80.00 ± 0.20 (2 steps)" in table and "90.00 (400)" in table
    compare.compare([a, b], tmp_path / "out", steps=2)  # every run after the same number of steps
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "71.00 ± 0.20 (2 steps)" in table and "80.00 ± 0.20 (2 steps)" in table
    compare.compare([a, b], tmp_path / "out", steps=5)
    assert (tmp_path / "out" / "compare.md").read_text().count("– (evaluated to 2 steps)") == 2


def test_compare_says_when_a_run_changed_device_so_its_time_adds_two_machines(tmp_path, figures):
    moved = _run(tmp_path / "moved", [(100, 90.0, 0.5), (200, 2.0, 0.6)], 5, [20, 60, 80])
    kept = _run(tmp_path / "kept", [(100, 3.0, 0.4), (200, 3.0, 0.5)], 1, [20, 60])
    runs.log_event(moved, "started")
    runs.log_event(moved, "resumed, changing " + runs.describe_changes({"train.device": ("cuda", "cpu")}))
    runs.log_event(kept, "resumed, changing " + runs.describe_changes({"train.time_limit": (60.0, 600.0)}))
    compare.compare([moved, kept], tmp_path / "out", labels=["MAML++", "MAML"])
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "MAML++ trained on cuda, then cpu" in table and "compare it by iterations" in table
    assert "MAML trained on" not in table
    _, by_time = figures["val_acc.png"].axes
    assert [line.get_label() for line in by_time.get_lines()] == ["MAML++ (cuda, then cpu)", "MAML"]
    assert runs.devices(kept, "cuda") == ["cuda"]


def test_compare_refuses_what_it_cannot_compare_with_the_fix(tmp_path, capsys):
    run = _run(tmp_path / "run", [(100, 1.0, 0.5)])
    (tmp_path / "rl" / "maml").mkdir(parents=True)
    (tmp_path / "rl" / "maml" / "metrics.csv").write_text("iteration,return\n1,2.0\n")
    cases = [
        ([str(run), "--key", "return"], "logs no 'return': choose a column it has with --key"),
        ([str(run), "--labels", "a,b"], "--labels gives 2 labels for 1 runs"),
        ([str(tmp_path / "rl")], "compare RUN/maml"),
        ([str(tmp_path / "missing")], "is not a run directory"),
    ]
    for args, message in cases:
        assert cli.main(["compare", *args, "--out", str(tmp_path / "out")]) != 0
        assert message in capsys.readouterr().err
