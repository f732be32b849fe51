"""The figures' axes say what they show, in the units of the tables beside them."""

import pytest

from mamlkit import plots
from mamlkit.experiments import fewshot, load_config, sinusoid


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
