"""Dataset readers: the real Omniglot archives (when present), small fake Omniglot and MiniImagenet sets."""

import csv
import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mamlkit.data import DatasetFormatError, DatasetNotFoundError, load_miniimagenet, load_omniglot
from mamlkit.data import miniimagenet as mini_module
from mamlkit.data import omniglot as omniglot_module
from mamlkit.tasks.fewshot import FewShotTasks

# CI runs from a checkout at X/main with the data at X/shared/data: resolve it relative to this file.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT_DIR = SHARED_DATA / "omniglot"
SPLIT_DIR = SHARED_DATA / "miniimagenet-split"
needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT_DIR / "images_background.zip").is_file(), reason=f"real Omniglot archives not in {OMNIGLOT_DIR}"
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("MAMLKIT_OMNIGLOT_DIR", "MAMLKIT_MINIIMAGENET_DIR", "MAMLKIT_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)


# -- real Omniglot ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="module")
def real_omniglot(real_cache):
    if not (OMNIGLOT_DIR / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot archives not in {OMNIGLOT_DIR}")
    return load_omniglot(OMNIGLOT_DIR, cache_dir=real_cache)


@needs_omniglot
def test_real_omniglot_characters_and_images(real_omniglot):
    d = real_omniglot
    assert len(d.names) == len(set(d.names)) == 1623 and d.names == sorted(d.names)
    assert d.images.shape == (1623, 20, 28, 28) and d.images.dtype == torch.float32
    assert d.resize == "nearest"
    assert set(d.images.unique().tolist()) == {0.0, 1.0}, "the official preprocessing gives binary images"
    # Ink = 1 on a background of 0: sparse strokes, empty borders, every drawing has some ink.
    assert 0.03 < d.images.mean() < 0.25
    assert d.images[:, :, 0, :].mean() < 0.01 and d.images[:, :, :, 0].mean() < 0.01
    assert d.images.amax(dim=(2, 3)).eq(1).all()


@needs_omniglot
def test_real_omniglot_split(real_omniglot):
    splits = real_omniglot.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 1100, "val": 100, "test": 423}
    together = splits["train"] + splits["val"] + splits["test"]
    assert sorted(together) == list(range(1623)), "the splits are disjoint and cover every character"
    # The official code's module-level seeding over the sorted names gives the same order.
    state = random.getstate()
    try:
        names = list(real_omniglot.names)
        random.seed(1)
        random.shuffle(names)
    finally:
        random.setstate(state)
    assert [real_omniglot.names[i] for i in together] == names
    assert omniglot_module.official_split(real_omniglot.names) == splits
    train = real_omniglot.split_images("train")
    assert train.shape == (1100, 20, 28, 28)
    assert torch.equal(train[5], real_omniglot.images[splits["train"][5]])


@needs_omniglot
def test_real_omniglot_cache_round_trip_and_tamper(real_omniglot, real_cache, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    with monkeypatch.context() as m:
        m.setattr(omniglot_module, "_decode", no_decode)
        again = load_omniglot(OMNIGLOT_DIR, cache_dir=real_cache)
    assert torch.equal(again.images, real_omniglot.images) and again.names == real_omniglot.names
    assert again.splits == real_omniglot.splits

    # Pixels changed under an intact key: caught by the checksum and rebuilt.
    (path,) = real_cache.glob("omniglot_28_nearest_*.pt")
    payload = torch.load(path, weights_only=True)
    payload["images"][0, 0] = 255 - payload["images"][0, 0]
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="checksum"):
        rebuilt = load_omniglot(OMNIGLOT_DIR, cache_dir=real_cache)
    assert torch.equal(rebuilt.images, real_omniglot.images)
    assert not list(real_cache.glob(".*tmp")), "no temporary file is left behind"


@needs_omniglot
def test_real_omniglot_resize_modes_on_real_drawings():
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background.zip") as zf:
        members = [n for n in zf.namelist() if n.endswith(".png")][:40:8]
        images = [Image.open(io.BytesIO(zf.read(n))) for n in members]
    for img in images:
        assert img.mode == "1" and img.size == (105, 105)
        nearest = omniglot_module.preprocess(img, "nearest")
        assert set(np.unique(nearest)) <= {0, 255}
        # Pillow turns LANCZOS on a 1-bit image into NEAREST: if that ever changes, this fails.
        assert np.array_equal(nearest, 255 - np.asarray(img.resize((28, 28), Image.NEAREST).convert("L")))
        lanczos = omniglot_module.preprocess(img, "lanczos")
        assert ((lanczos > 0) & (lanczos < 255)).any(), "lanczos gives gray levels"
        assert abs(lanczos.astype(float).mean() - nearest.astype(float).mean()) < 40


@needs_omniglot
def test_real_omniglot_feeds_fewshot_tasks(real_omniglot):
    tasks = FewShotTasks(real_omniglot.split_images("train"), 5, 1, 1, rotate=True)
    b = tasks.batch(32, torch.Generator().manual_seed(0))
    assert b.support_inputs.shape == (32, 5, 1, 28, 28) and b.query_targets.shape == (32, 5)


# -- fake Omniglot ------------------------------------------------------------------------------


def _png(rng: np.random.Generator) -> bytes:
    ink = rng.random((105, 105)) < 0.1
    buf = io.BytesIO()
    Image.fromarray(~ink).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def make_fake_omniglot(root: Path, drawers: int = 20) -> Path:
    """images_background: 2 alphabets x 2 characters; images_evaluation: 1 alphabet x 2 characters."""
    rng = np.random.default_rng(0)
    layout = {"images_background": ["Beta", "Alpha"], "images_evaluation": ["Gamma"]}
    char_id = 0
    root.mkdir(parents=True, exist_ok=True)
    for archive, alphabets in layout.items():
        with zipfile.ZipFile(root / f"{archive}.zip", "w") as zf:
            for alphabet in alphabets:
                for c in (1, 2):
                    char_id += 1
                    for d in range(1, drawers + 1):
                        zf.writestr(f"{archive}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png", _png(rng))
    return root


@pytest.fixture
def fake_omniglot(tmp_path):
    return make_fake_omniglot(tmp_path / "omniglot")


def test_fake_omniglot_loads_sorted_and_split(fake_omniglot, tmp_path):
    d = load_omniglot(fake_omniglot, cache_dir=tmp_path / "cache", split_sizes=(3, 1))
    assert d.names == sorted(d.names) and len(d.names) == 6 and d.names[0] == "Alpha/character01"
    assert d.images.shape == (6, 20, 28, 28)
    assert sorted(sum(d.splits.values(), [])) == list(range(6)) and len(d.splits["test"]) == 2
    assert set(d.images.unique().tolist()) <= {0.0, 1.0}
    # Each character's drawings are its own PNGs, in file order: ink where the drawing is black,
    # sampled at the nearest source pixel (105 -> 28 pixels).
    nearest = ((np.arange(28) + 0.5) * 105 / 28).astype(int)
    with zipfile.ZipFile(fake_omniglot / "images_background.zip") as zf:
        for j in (0, 7, 19):
            png = zf.read(f"images_background/Beta/character02/0002_{j + 1:02d}.png")
            ink = ~np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=bool)
            want = torch.tensor(ink[np.ix_(nearest, nearest)], dtype=d.images.dtype)
            assert torch.equal(d.images[d.names.index("Beta/character02"), j], want), j
    gray = load_omniglot(fake_omniglot, resize="lanczos", cache_dir=tmp_path / "cache", split_sizes=(3, 1))
    assert ((gray.images > 0) & (gray.images < 1)).any(), "lanczos gives intermediate values"
    assert len(list((tmp_path / "cache").glob("omniglot_28_*.pt"))) == 2, "one cache file per resize mode"
    # Reading the directory from the environment, the cache dir from its variable too.
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MAMLKIT_OMNIGLOT_DIR", str(fake_omniglot))
        m.setenv("MAMLKIT_CACHE_DIR", str(tmp_path / "cache"))
        m.setattr(omniglot_module, "_decode", lambda *a: pytest.fail("should come from the cache"))
        assert torch.equal(load_omniglot(split_sizes=(3, 1)).images, d.images)
        assert torch.equal(load_omniglot("", cache_dir="", split_sizes=(3, 1)).images, d.images), "'' = not set"


def test_fake_omniglot_corrupt_cache_is_rebuilt(fake_omniglot, tmp_path):
    first = load_omniglot(fake_omniglot, cache_dir=tmp_path, split_sizes=(3, 1))
    (path,) = tmp_path.glob("omniglot_*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="cannot be read"):
        second = load_omniglot(fake_omniglot, cache_dir=tmp_path, split_sizes=(3, 1))
    assert torch.equal(first.images, second.images)
    # A changed archive changes the key, so a new cache is built beside the old one.
    with zipfile.ZipFile(fake_omniglot / "images_evaluation.zip", "a") as zf:
        zf.writestr("images_evaluation/readme.txt", "x")
    load_omniglot(fake_omniglot, cache_dir=tmp_path, split_sizes=(3, 1))
    assert len(list(tmp_path.glob("omniglot_*.pt"))) == 2
    # No cache at all.
    assert torch.equal(load_omniglot(fake_omniglot, cache=False, split_sizes=(3, 1)).images, first.images)
    # A cache that cannot be written is a warning, not a failure.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write cache"):
        unwritten = load_omniglot(fake_omniglot, cache_dir=blocker / "cache", split_sizes=(3, 1))
    assert torch.equal(unwritten.images, first.images)


def test_omniglot_missing_data_errors(fake_omniglot, tmp_path):
    with pytest.raises(DatasetNotFoundError, match="MAMLKIT_OMNIGLOT_DIR") as e:
        load_omniglot()
    assert "data.root" in str(e.value) and "brendenlake/omniglot" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_omniglot(tmp_path / "nowhere")
    (fake_omniglot / "images_evaluation.zip").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        load_omniglot(fake_omniglot, cache=False)
    msg = str(e.value)
    assert "images_evaluation.zip" in msg and str(fake_omniglot) in msg and "brendenlake/omniglot" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_omniglot_bad_archives(tmp_path):
    root = make_fake_omniglot(tmp_path / "o")
    (root / "images_background.zip").write_bytes(b"PK garbage")
    with pytest.raises(DatasetFormatError, match="images_background.zip"):
        load_omniglot(root, cache=False)
    root = make_fake_omniglot(tmp_path / "o2", drawers=19)
    with pytest.raises(DatasetFormatError, match="19 drawings"):
        load_omniglot(root, cache=False)
    root = make_fake_omniglot(tmp_path / "o3")
    with pytest.raises(ValueError, match="split_sizes"):
        load_omniglot(root, cache=False)  # 6 characters cannot hold the official 1100 + 100
    with pytest.raises(ValueError, match="resize"):
        load_omniglot(root, resize="bicubic")


# -- fake MiniImagenet ---------------------------------------------------------------------------

N_CLASSES, N_PER_CLASS = 5, 4
WNIDS = [f"n{9 - c:08d}" for c in range(N_CLASSES)]  # reverse of sorted order, to test the sorting


def colour(c: int, i: int) -> tuple[int, int, int]:
    """Class in the red channel, example in the green one."""
    return 30 + 40 * c, 40 + 50 * i, 128


def check_images(images: torch.Tensor, classes: list[str]) -> None:
    assert images.shape == (N_CLASSES, N_PER_CLASS, 3, 84, 84) and images.dtype == torch.uint8
    assert classes == sorted(WNIDS)
    for j, wnid in enumerate(classes):
        c = WNIDS.index(wnid)
        for i in range(N_PER_CLASS):
            mean = images[j, i].float().mean(dim=(1, 2))
            assert torch.allclose(mean, torch.tensor(colour(c, i), dtype=torch.float32), atol=3), (wnid, i, mean)


def make_folder(root: Path, csv_dir: Path | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for c, wnid in enumerate(WNIDS):
        for i in range(N_PER_CLASS):
            name = f"{wnid}{i + 1:08d}.jpg"
            Image.new("RGB", (90 + c, 70), colour(c, i)).save(root / "images" / name, quality=95)
            rows.append((name, wnid))
    # Interleave classes so grouping by label is exercised; keep each class's own order.
    rows = [rows[c * N_PER_CLASS + i] for i in range(N_PER_CLASS) for c in range(N_CLASSES)]
    csv_dir = csv_dir or root
    csv_dir.mkdir(parents=True, exist_ok=True)
    with open(csv_dir / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        w.writerows(rows)
    return root


def make_pickle(root: Path, side: int = 84) -> Path:
    root.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(N_CLASSES * N_PER_CLASS)
    data = np.zeros((N_CLASSES * N_PER_CLASS, side, side, 3), dtype=np.uint8)
    class_dict = {}
    for c, wnid in enumerate(WNIDS):
        slots = order[c * N_PER_CLASS : (c + 1) * N_PER_CLASS].tolist()
        class_dict[wnid] = slots
        for i, s in enumerate(slots):
            data[s] = colour(c, i)
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return root


def test_miniimagenet_folder_layout_groups_resizes_and_caches(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "mini")
    d = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert d.layout == "folder" and d.split == "train"
    check_images(d.images, d.classes)
    monkeypatch.setenv("MAMLKIT_MINIIMAGENET_DIR", str(root))
    with monkeypatch.context() as m:
        m.setattr(mini_module, "_decode", lambda *a: pytest.fail("should come from the cache"))
        again = load_miniimagenet(split="train", cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, d.images) and again.classes == d.classes
    (path,) = (tmp_path / "cache").glob("miniimagenet_train_84_*.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = load_miniimagenet(split="train", cache_dir=tmp_path / "cache")
    assert torch.equal(rebuilt.images, d.images)
    tasks = FewShotTasks(d.images, 5, 1, 2, scale=1 / 255)
    b = tasks.batch(3, torch.Generator().manual_seed(0))
    assert b.query_inputs.shape == (3, 10, 3, 84, 84) and b.query_inputs.max() <= 1


def test_miniimagenet_split_csv_in_another_folder(tmp_path):
    root = make_folder(tmp_path / "mini", csv_dir=tmp_path / "split")
    with pytest.raises(DatasetNotFoundError, match="train.csv"):
        load_miniimagenet(root, "train", cache=False)
    d = load_miniimagenet(root, "train", split_dir=tmp_path / "split", cache=False)
    check_images(d.images, d.classes)


@pytest.mark.parametrize("side", [84, 60])
def test_miniimagenet_pickle_layout(tmp_path, side):
    root = make_pickle(tmp_path / "mini", side)
    d = load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")
    assert d.layout == "pickle"
    check_images(d.images, d.classes)
    assert not (tmp_path / "cache").exists(), "pickles are already decoded: no second cache"


def test_miniimagenet_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="MAMLKIT_MINIIMAGENET_DIR"):
        load_miniimagenet(split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as e:
        load_miniimagenet(tmp_path / "empty", "val")
    msg = str(e.value)
    assert "images" in msg and "val.csv" in msg and "mini-imagenet-cache-val.pkl" in msg
    assert "Ravi" in msg and "ImageNet" in msg
    root = make_folder(tmp_path / "mini")
    with pytest.raises(DatasetNotFoundError, match="test.csv"):
        load_miniimagenet(root, "test")
    (root / "images" / f"{WNIDS[2]}00000003.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{WNIDS[2]}00000003.jpg"):
        load_miniimagenet(root, "train", cache=False)
    with pytest.raises(ValueError, match="split"):
        load_miniimagenet(root, "validation")


def test_miniimagenet_bad_files(tmp_path):
    root = make_folder(tmp_path / "mini")
    (root / "images" / f"{WNIDS[0]}00000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetFormatError, match="00000001.jpg"):
        load_miniimagenet(root, "train", cache=False)
    (root / "train.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DatasetFormatError, match="filename,label"):
        load_miniimagenet(root, "train", cache=False)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"images": 1}))
    with pytest.raises(DatasetFormatError, match="image_data"):
        load_miniimagenet(tmp_path / "p", "train")


@pytest.mark.skipif(not (SPLIT_DIR / "train.csv").is_file(), reason=f"split CSVs not in {SPLIT_DIR}")
def test_real_ravi_larochelle_split_files_parse():
    sizes = {}
    for split in ("train", "val", "test"):
        classes, files = mini_module._read_csv(SPLIT_DIR / f"{split}.csv")
        assert all(len(f) == 600 for f in files)
        assert all(
            name.startswith(c) and name.endswith(".jpg") for c, f in zip(classes, files, strict=True) for name in f
        )
        sizes[split] = classes
    assert [len(sizes[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert not set(sizes["train"]) & set(sizes["val"]) and not set(sizes["val"]) & set(sizes["test"])


def test_omniglot_corrupt_member_is_a_dataset_error(tmp_path):
    """A member whose compressed bytes are damaged (zlib fails on it) is named, not a zlib traceback."""
    root = make_fake_omniglot(tmp_path / "o")
    path = root / "images_background.zip"
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, data in members.items():
            zf.writestr(n, data + bytes(2000))  # compressible padding: every member is deflated
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".png"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start : start + 8] = b"\xff" * 8  # the member's deflate stream
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match=info.filename.split("/")[-1]):
        load_omniglot(root, cache=False, split_sizes=(3, 1))
