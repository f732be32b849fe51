"""The folder dataset (root/CLASS/*.png|jpg|...): split, conversion, cache, errors, and the preset end to end."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from mamlkit import cli, config
from mamlkit.data import DatasetFormatError, DatasetNotFoundError, load_folder
from mamlkit.data import folder as folder_module
from mamlkit.experiments import configs, load_config
from mamlkit.models import Conv4, classifier
from mamlkit.tasks.fewshot import FewShotTasks


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MAMLKIT_CACHE_DIR", raising=False)


def coded_image(c: int, i: int, side: int = 16) -> Image.Image:
    """A flat RGB image whose red value codes its class and green value its index (read back exactly)."""
    return Image.new("RGB", (side, side), (10 * c, 10 * i, 7))


def make_folder(root, n_classes: int, per_class, side: int = 16):
    """``n_classes`` class folders ``class00``.. of ``per_class`` coded PNGs (an int or one count per class)."""
    counts = per_class if isinstance(per_class, list) else [per_class] * n_classes
    for c, n in enumerate(counts):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            coded_image(c, i, side).save(root / f"class{c:02d}" / f"{i:03d}.png")
    return root


def codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class, index) of each image of ``x [..., 3, H, W]`` in [0, 1], from its top-left pixel."""
    pixel = (x[..., :, 0, 0] * 255).round().long()
    return pixel[..., 0] // 10, pixel[..., 1] // 10


def test_classes_split_and_modes_are_read_as_documented(tmp_path):
    root = make_folder(tmp_path / "imgs", 10, 3)
    # Any mode and size, in formats beside PNG; hidden folders and other files are not classes or images.
    odd = root / "class03"
    Image.new("L", (30, 20), 100).save(odd / "gray.jpg", quality=100)
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(odd / "transparent.png")
    Image.new("RGB", (40, 40), (255, 0, 0)).convert("P").save(odd / "palette.gif")
    Image.new("1", (16, 16), 1).save(odd / "bits.bmp")
    (odd / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "x.png").write_bytes(b"")

    data = load_folder(root, image_size=16, channels=3, cache_dir=tmp_path / "cache")
    assert data.classes == [f"class{c:02d}" for c in range(10)]
    assert [len(f) for f in data.files] == [3, 3, 3, 7, 3, 3, 3, 3, 3, 3]
    assert data.images.shape == (34, 3, 16, 16) and data.images.dtype == torch.uint8
    # Sorted names, shuffled with Random(0), cut at round(10 * 0.64) and round(10 * 0.8).
    assert {s: len(ix) for s, ix in data.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert sorted(sum(data.splits.values(), [])) == list(range(10))
    assert data.splits == folder_module.fraction_split(data.classes)
    first = 12  # after 3 classes of 3 and class03's 000-002.png: bits.bmp, gray.jpg, palette.gif, transparent.png
    bits, gray, palette, transparent = (data.images[first + k, :, 5, 5].tolist() for k in range(4))
    assert bits == [255, 255, 255] and palette == [255, 0, 0] and transparent == [255, 255, 255]
    assert all(abs(v - 100) <= 1 for v in gray)

    one = load_folder(root, image_size=16, channels=1, cache=False)
    assert one.images.shape == (34, 1, 16, 16)
    red = one.images[first + 2, 0, 5, 5].item()
    assert red == round(0.299 * 255), "RGB to gray with ITU-R 601 weights, as Pillow's L conversion"


def test_tasks_draw_distinct_classes_of_the_split_and_disjoint_support_and_query(tmp_path):
    data = load_folder(make_folder(tmp_path / "imgs", 12, 6), image_size=16, cache=False)
    train = data.split_images("train", min_per_class=4, min_classes=5)
    assert train.shape == (len(data.splits["train"]), 6, 3, 16, 16)
    tasks = FewShotTasks(train, 5, 1, 3, scale=1 / 255)
    b = tasks.batch(20, torch.Generator().manual_seed(0))
    assert b.support_inputs.shape == (20, 5, 3, 16, 16) and b.query_inputs.shape == (20, 15, 3, 16, 16)
    assert b.support_inputs.dtype == torch.float32 and 0 <= b.support_inputs.min() <= b.support_inputs.max() <= 1
    allowed = {int(data.classes[c][-2:]) for c in data.splits["train"]}
    s_class, s_index = codes(b.support_inputs)
    q_class, q_index = codes(b.query_inputs)
    for t in range(20):
        label_of = {}
        for cls, label in zip(
            s_class[t].tolist() + q_class[t].tolist(),
            b.support_targets[t].tolist() + b.query_targets[t].tolist(),
            strict=True,
        ):
            assert label_of.setdefault(cls, label) == label, "one label per class within a task"
        assert set(label_of) <= allowed and len(label_of) == 5 and sorted(label_of.values()) == list(range(5))
        for cls in label_of:
            support = set(s_index[t][s_class[t] == cls].tolist())
            query = q_index[t][q_class[t] == cls].tolist()
            assert len(support) == 1 and len(set(query)) == 3 and not support & set(query)


def test_unequal_classes_use_the_first_images_of_each_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "imgs", 3, [4, 6, 5])
    split = root / "split.txt"
    split.write_text("# every class trains\nclass00 train\nclass01 train\nclass02 train\n")
    data = load_folder(root, image_size=16, split_file=split, cache=False)
    with pytest.warns(UserWarning, match="hold 4 to 6 images; tasks use the first 4"):
        train = data.split_images("train")
    assert train.shape[:2] == (3, 4)
    assert codes(train.float() / 255)[1].tolist() == [[0, 1, 2, 3]] * 3


def test_split_file_csv_or_text_and_unlisted_classes_unused(tmp_path):
    root = make_folder(tmp_path / "imgs", 5, 2)
    csv_file = tmp_path / "split.csv"
    csv_file.write_text('class,split\nclass03,train\nclass00,val\n\n"class01",test\nclass04,train\n')
    data = load_folder(root, image_size=16, split_file=csv_file, cache=False)
    named = {s: [data.classes[c] for c in ix] for s, ix in data.splits.items()}
    assert named == {"train": ["class03", "class04"], "val": ["class00"], "test": ["class01"]}  # class02 unused
    text = tmp_path / "split.txt"
    text.write_text("class03  train\nclass00\tval\nclass01 test\nclass04 train\n")
    assert folder_module.scan_folder(root, split_file=text).splits == data.splits


@pytest.mark.parametrize(
    "text, message",
    [
        ("class00,train\nclass09,val\n", r"line 2: class 'class09' has no folder"),
        ("class00,training\n", r"line 1: split 'training' must be one of train, val, test"),
        ("class00,train\nclass00,test\n", r"line 2: class 'class00' is listed again \(first on line 1\)"),
        ("class00\n", r"line 1: expected `CLASS,SPLIT`"),
        ("# nothing\n", "lists no classes"),
    ],
)
def test_bad_split_files_name_the_line(tmp_path, text, message):
    root = make_folder(tmp_path / "imgs", 2, 2)
    (tmp_path / "split.csv").write_text(text)
    with pytest.raises(DatasetFormatError, match=message):
        load_folder(root, split_file=tmp_path / "split.csv", cache=False)


def test_cache_is_reused_and_rebuilt_when_an_image_or_the_resize_changes(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", 4, 3, side=20)
    cache = tmp_path / "cache"
    first = load_folder(root, image_size=16, cache_dir=cache)
    (path,) = cache.glob("folder_16_3_*.pt")

    decoded = []
    real_decode = folder_module._decode
    monkeypatch.setattr(folder_module, "_decode", lambda *a: decoded.append(a) or real_decode(*a))
    again = load_folder(root, image_size=16, cache_dir=cache)
    assert not decoded and torch.equal(again.images, first.images), "read from the cache"

    # Pixels changed under an intact key: caught by the checksum, rebuilt.
    payload = torch.load(path, weights_only=True)
    payload["images"][0] = 255 - payload["images"][0]
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="checksum"):
        rebuilt = load_folder(root, image_size=16, cache_dir=cache)
    assert len(decoded) == 1 and torch.equal(rebuilt.images, first.images)

    # A replaced image (its size or mtime changes): a new key, decoded again.
    image = root / "class02" / "001.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(image)
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock cannot hide the change
    changed = load_folder(root, image_size=16, cache_dir=cache)
    assert len(decoded) == 2 and changed.images[7, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list(cache.glob("folder_16_3_*.pt"))) == 2

    load_folder(root, image_size=18, cache_dir=cache)  # another resize: its own cache
    assert len(decoded) == 3 and list(cache.glob("folder_18_3_*.pt"))
    assert not list(cache.glob(".*tmp")), "no temporary file is left behind"


def test_missing_and_bad_data_name_the_problem(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="needs its directory: pass it with `--set data.root="):
        load_folder(None)
    with pytest.raises(DatasetNotFoundError, match="nowhere does not exist"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="holds no class folders; lay it out as root/CLASS/IMAGE"):
        load_folder(tmp_path / "empty")

    root = make_folder(tmp_path / "imgs", 6, 3)
    (root / "nested" / "inner").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="class folder .*nested holds no images"):
        load_folder(root)
    (root / "nested" / "inner").rmdir()
    (root / "nested").rmdir()

    data = load_folder(root, image_size=16, split_fractions=(0.5, 0.0, 0.5), cache=False)
    with pytest.raises(
        DatasetFormatError, match=r"need 4 images per class .* 3 of its classes hold fewer: class\d\d \(3\)"
    ):
        data.split_images("train", min_per_class=4)
    with pytest.raises(DatasetFormatError, match="the val split holds 0 classes but 5-way tasks need 5"):
        data.split_images("val", min_classes=5)

    (root / "class04" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetFormatError, match=r"cannot read image .*class04.broken\.png"):
        load_folder(root, cache=False)


def test_config_fields_ranges_and_the_model(tmp_path):
    cfg = load_config("folder-5way-1shot")
    assert (cfg.data.dataset, cfg.model.arch, cfg.data.image_shape()) == ("folder", "conv4", (3, 84, 84))
    configs.check_memory(cfg)  # the preset's memory is estimated without reading a folder
    small = load_config("folder-5way-1shot", ["data.image_size=32", "data.channels=1"])
    model = classifier("conv4", 5, small.data.image_shape())
    assert isinstance(model, Conv4) and model(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    assert load_config("omniglot-5way-1shot").data.image_shape() == (1, 28, 28)

    bad = [
        (["data.image_size=8"], "data.image_size: 8 out of range; allowed [16, 1024]"),
        (["data.channels=2"], "data.channels: 2 not allowed; choose from [1, 3]"),
        (["data.split_fractions=[0.5, 0.2, 0.2]"], "must be 3 fractions (train, val, test) summing to 1"),
        (["model.arch=miniimagenet_conv4"], "data.dataset=folder trains model.arch=conv4"),
    ]
    for sets, message in bad:
        with pytest.raises(config.ConfigError, match=re.escape(message)):
            load_config("folder-5way-1shot", sets)
    with pytest.raises(config.ConfigError, match="data.channels applies to data.dataset=folder only"):
        load_config("omniglot-5way-1shot", ["data.channels=1"])


def run_args(run, root, *sets):
    common = [
        f"data.root={root}",
        f"data.cache_dir={root.parent / 'cache'}",
        "data.image_size=16",
        "task.q_query=2",
        "maml.inner_steps=1",
        "maml.strategy=loop",
        "train.iterations=3",
        "train.meta_batch_size=2",
        "train.log_every=1",
        "train.validate_every=3",
        "train.val_tasks=2",
        "train.checkpoint_every=3",
        "train.threads=1",
        "train.device=cpu",
        "eval.num_tasks=4",
        "eval.steps=2",
        "eval.query=[paper]",
    ]
    sets = [a for s in (*common, *sets) for a in ("--set", s)]
    return ["train", "folder-5way-1shot", "--out", str(run), "--quiet", *sets]


def test_preset_trains_and_evaluates_through_the_cli_on_the_split_it_trained_on(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", 30, 4)  # 19 train, 5 val, 6 test classes
    run = tmp_path / "run"
    assert cli.main(run_args(run, root)) == 0
    assert (run / "best.pt").exists() and (run / "checkpoint.pt").exists()
    assert cli.main(["eval", str(run)]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["dataset"] == "folder" and results["source"]["iteration"] == 3
    paper = results["protocols"]["paper"]
    assert paper["query_per_class"] == 1 and len(paper["acc"]) == 3 and all(0 <= a <= 100 for a in paper["acc"])

    # The split is recorded with the run; classes added to the folder later reshuffle the default
    # split, but evaluation keeps the classes the run was tested on (no training class in its tests).
    recorded = folder_module.read_split_file(run / "split.csv", [f"class{c:02d}" for c in range(30)])
    index = folder_module.scan_folder(root)
    assert recorded == {s: [index.classes[c] for c in ix] for s, ix in index.splits.items()}
    make_folder(root, 40, 4)
    assert folder_module.scan_folder(root).splits["test"] != index.splits["test"]
    assert cli.main(["eval", str(run), "--name", "later"]) == 0
    assert json.loads((run / "eval-later.json").read_text())["protocols"] == results["protocols"]


def test_a_folder_too_small_for_the_test_tasks_stops_before_training(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", 30, 4)
    run = tmp_path / "run"
    assert cli.main(run_args(run, root, "eval.query=[paper, modern]")) == 2
    err = capsys.readouterr().err
    assert "the test split need 16 images per class" in err and "6 of its classes hold fewer" in err
    assert not (run / "checkpoint.pt").exists()
