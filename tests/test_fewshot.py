"""Few-shot classification: the paper's networks under the engine, and the experiment end to end."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamlkit import MAML, TaskBatch, cli, config
from mamlkit.experiments import fewshot, load_config
from mamlkit.experiments.fewshot import load_split
from mamlkit.models import ADAPT_ALL_BUT_NORM, Conv4, MLPNet

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def fd_check(maml, batch, eps=1e-6, per_tensor=4):
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()
    params = [p for p in maml.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            flat, got = p.view(-1), p.grad.reshape(-1)
            for i in range(0, flat.numel(), max(1, flat.numel() // per_tensor)):  # a spread of elements
                old = flat[i].item()
                flat[i] = old + eps
                up = maml.meta_loss(batch).item()
                flat[i] = old - eps
                down = maml.meta_loss(batch).item()
                flat[i] = old
                assert got[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def image_batch(tasks, n_way, k, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tasks, 2 * n_way * k, channels, size, size, generator=g, dtype=torch.float64)
    y = torch.arange(n_way).repeat_interleave(k).repeat(tasks, 2).view(tasks, -1)
    half = n_way * k
    return TaskBatch(x[:, :half], y[:, :half], x[:, half:], y[:, half:])


@pytest.mark.parametrize("pool", [False, True], ids=["omniglot-style", "miniimagenet-style"])
@pytest.mark.slow
def test_conv4_second_order_meta_gradient_matches_finite_differences(pool):
    torch.manual_seed(0)
    size = 16 if pool else 8
    model = Conv4(n_way=2, in_channels=1, filters=3, pool=pool, image_size=size).double()
    maml = MAML(model, F.cross_entropy, inner_lr=0.3, inner_steps=2, adapt=ADAPT_ALL_BUT_NORM, strategy="vmap")
    assert "blocks.0.norm.bias" not in maml.adapted_names and "blocks.0.conv.weight" in maml.adapted_names
    fd_check(maml, image_batch(2, 2, 2, 1, size))


def test_no_conv_mlp_meta_gradient_matches_finite_differences():
    torch.manual_seed(1)
    model = MLPNet(n_way=3, in_features=16, hidden=(6, 5)).double()
    maml = MAML(model, F.cross_entropy, inner_lr=0.3, adapt=ADAPT_ALL_BUT_NORM, strategy="vmap")
    fd_check(maml, image_batch(2, 3, 2, 1, 4))


def test_presets_for_every_cell_are_valid():
    names = config.preset_names()
    for dataset, cells in {
        "omniglot": ["5way-1shot", "5way-5shot", "20way-1shot", "20way-5shot"],
        "miniimagenet": ["5way-1shot", "5way-5shot"],
    }.items():
        for cell in cells:
            for variant in ("", "-first-order"):
                cfg = load_config(f"{dataset}-{cell}{variant}")
                assert cfg.maml.first_order == (variant == "-first-order")
                assert cfg.task.n_way == int(cell.split("way")[0])
    assert {"omniglot-5way-1shot-mlp", "omniglot-5way-5shot-mlp"} <= set(names)
    omni20 = load_config("omniglot-20way-1shot")
    assert (omni20.maml.inner_steps, omni20.train.meta_batch_size, omni20.maml.inner_lr) == (5, 16, 2.0)
    mini = load_config("miniimagenet-5way-1shot")
    assert (mini.task.q_query, mini.maml.inner_steps, mini.data.rotate) == (15, 5, False)


def test_model_and_dataset_must_agree():
    with pytest.raises(config.ConfigError, match="miniimagenet_conv4 expects data.dataset=miniimagenet"):
        load_config("omniglot-5way-1shot", ["model.arch=miniimagenet_conv4"])


def test_missing_data_is_named_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MAMLKIT_OMNIGLOT_DIR", raising=False)
    code = cli.main(
        [
            "train",
            "omniglot-5way-1shot",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            "--set",
            f"data.root={tmp_path / 'nowhere'}",
            "--set",
            "train.device=cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "mamlkit: error:" in err and "nowhere" in err


@pytest.mark.skipif(not OMNIGLOT.is_dir(), reason=f"Omniglot archives not found at {OMNIGLOT}")
def test_omniglot_5way_1shot_learns_end_to_end(tmp_path, capsys):
    """A short real run through the CLI: validation picks best.pt, test accuracy beats chance (20%)."""
    run = tmp_path / "omni"
    sets = [
        "train.iterations=200",
        "train.threads=1",  # robust when CI's two cores are shared
        "train.meta_batch_size=4",
        "train.log_every=50",
        "train.validate_every=100",
        "train.val_tasks=32",
        "train.device=cpu",
        "eval.num_tasks=60",
        "eval.steps=3",
        "eval.task_batch=20",
        f"data.root={OMNIGLOT}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    args = ["train", "omniglot-5way-1shot", "--out", str(run), "--quiet"] + [a for s in sets for a in ("--set", s)]
    assert cli.main(args) == 0
    assert (run / "best.pt").exists() and (run / "checkpoint.pt").exists()
    assert cli.main(["eval", str(run)]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["source"]["checkpoint"] == "best.pt"
    modern = results["protocols"]["modern"]
    assert modern["query_per_class"] == 15 and len(modern["acc"]) == 4
    assert modern["acc"][0] < 30  # no adaptation: chance
    assert modern["acc"][3] > 35  # three steps from the meta-learned start
    assert cli.main(["plot", str(run)]) == 0
    assert (run / "plots" / "accuracy_vs_steps.png").exists()


@pytest.mark.slow
def test_miniimagenet_pipeline_runs_on_fake_pickles(tmp_path, monkeypatch):
    """The MiniImagenet preset end to end on a tiny fake dataset in the pickle layout."""
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        classes = {f"n{split}{c:02d}": list(range(c * 17, (c + 1) * 17)) for c in range(5)}
        data = {"image_data": rng.integers(0, 255, (85, 84, 84, 3), dtype=np.uint8), "class_dict": classes}
        with open(tmp_path / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(data, f)
    run = tmp_path / "run"
    sets = [
        "train.iterations=2",
        "train.meta_batch_size=2",
        "train.log_every=1",
        "train.validate_every=2",
        "train.val_tasks=2",
        "train.device=cpu",
        "task.q_query=2",
        "eval.num_tasks=2",
        "eval.steps=2",
        f"data.root={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    args = ["train", "miniimagenet-5way-1shot", "--out", str(run), "--quiet"] + [a for s in sets for a in ("--set", s)]
    read = []  # the splits each phase reads: training meta-learns on train and selects on val only
    monkeypatch.setattr(fewshot, "load_split", lambda cfg, split: read.append(split) or load_split(cfg, split))
    assert cli.main(args) == 0
    assert sorted(set(read)) == ["train", "val"]
    assert cli.main(["plot", str(run)]) == 0  # before any evaluation: the learning curves alone
    assert (run / "plots" / "training_loss.png").exists() and not (run / "plots" / "accuracy_vs_steps.png").exists()
    read.clear()
    assert cli.main(["eval", str(run)]) == 0
    assert set(read) == {"test"}
    results = json.loads((run / "eval.json").read_text())
    assert results["source"]["checkpoint"] == "best.pt"
    assert set(results["protocols"]) == {"paper", "modern"}
    assert results["protocols"]["paper"]["query_per_class"] == 1  # the paper's query set: K per class
    for protocol in results["protocols"].values():
        assert len(protocol["acc"]) == 3  # 0, 1 and 2 steps
        assert all(0 <= a <= 100 for a in protocol["acc"])
