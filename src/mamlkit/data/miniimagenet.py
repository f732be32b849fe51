"""MiniImagenet (Vinyals et al., 2016) with the Ravi & Larochelle (2017) class split.

Two layouts are read, as people have them:

- folder: ``<root>/images/*.jpg`` (the 60,000 images, named ``<wnid><8-digit index>.jpg``) and
  the split files ``train.csv``, ``val.csv``, ``test.csv`` (header ``filename,label``) in
  ``<root>`` or in ``split_dir``. Decoding a split takes minutes, so the decoded tensor is cached.
- pickle: ``<root>/mini-imagenet-cache-{train,val,test}.pkl``, each a dict with ``"image_data"``
  (uint8 ``[N, 84, 84, 3]``) and ``"class_dict"`` (``{class: [indices]}``). Already decoded, so
  not cached again. Unpickling runs code from the file: only load pickles you trust.

Images that are not ``size``×``size`` are resized with LANCZOS, as in the paper.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import (
    DatasetFormatError,
    DatasetNotFoundError,
    file_digest,
    load_cache,
    resolve_cache_dir,
    resolve_dir,
    save_cache,
    tensor_digest,
)

ENV = "MAMLKIT_MINIIMAGENET_DIR"
SPLITS = ("train", "val", "test")
# Bump when the cached content or layout changes, so old caches stop matching.
FORMAT_VERSION = 1
WHERE_TO_GET = (
    "MiniImagenet cannot be downloaded by mamlkit: its images come from ImageNet (ILSVRC-2012), which you "
    "obtain yourself. Use the Ravi & Larochelle split files train.csv/val.csv/test.csv "
    "(https://github.com/twitter/meta-learning-lstm, data/miniImagenet/) with an images/ folder of the "
    "60,000 84x84 jpgs, or the mini-imagenet-cache-{train,val,test}.pkl pickles."
)


@dataclass
class MiniImagenetData:
    """One split: ``images[c, i]`` is image ``i`` of class ``classes[c]`` (an ImageNet wnid)."""

    images: Tensor  # [n_classes, n_per_class, 3, size, size] uint8 (scale by 1/255 per batch)
    classes: list[str]
    split: str
    layout: str  # "folder" or "pickle"


def load_miniimagenet(
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    split_dir: str | os.PathLike | None = None,
    size: int = 84,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> MiniImagenetData:
    """Load one split from ``root`` (or ``$MAMLKIT_MINIIMAGENET_DIR``) as uint8 ``[classes, per_class, 3, size, size]``.

    Args:
        root: a folder with ``images/`` (and the split CSVs unless ``split_dir`` is given), or with
            the ``mini-imagenet-cache-<split>.pkl`` pickles. The pickle is used when present and
            ``split_dir`` is not given.
        split: ``"train"``, ``"val"`` or ``"test"``.
        split_dir: where ``<split>.csv`` lives, when not in ``root``.
        size: output side in pixels.
        cache_dir: where the folder layout's decoded split is kept (default ``$MAMLKIT_CACHE_DIR``
            or ``~/.cache/mamlkit``); keyed by the CSV's contents, the images' sizes and mtimes,
            ``size`` and a format version, and rebuilt with a warning if it does not match.
        cache: ``False`` decodes without reading or writing a cache.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    root = resolve_dir(root, ENV, "MiniImagenet", WHERE_TO_GET)
    pkl = root / f"mini-imagenet-cache-{split}.pkl"
    images_dir = root / "images"
    if pkl.is_file() and split_dir is None:
        images, classes = _load_pickle(pkl, size)
        return MiniImagenetData(images, classes, split, "pickle")
    csv_path = Path(split_dir).expanduser() / f"{split}.csv" if split_dir is not None else root / f"{split}.csv"
    if not images_dir.is_dir():
        raise DatasetNotFoundError(
            f"MiniImagenet {split} split not found in {root}: expected either an image folder {images_dir} "
            f"(with {csv_path}) or the pickle {pkl}. Set the directory with `--set data.root=...` or {ENV}. "
            f"{WHERE_TO_GET}"
        )
    if not csv_path.is_file():
        raise DatasetNotFoundError(
            f"MiniImagenet split file {csv_path.name} not found (looked for {csv_path}); put it next to "
            f"{images_dir} or pass its folder as split_dir. {WHERE_TO_GET}"
        )
    classes, files = _read_csv(csv_path)
    paths = [[images_dir / f for f in fs] for fs in files]
    missing = [p for ps in paths for p in ps if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} images listed in {csv_path} are missing from {images_dir}, e.g. "
            f"{', '.join(p.name for p in missing[:3])}. {WHERE_TO_GET}"
        )
    shape = (len(classes), len(files[0]), 3, size, size)

    images = None
    if cache:
        key = _cache_key(csv_path, paths, split, size)
        cache_path = resolve_cache_dir(cache_dir) / f"miniimagenet_{split}_{size}_{key[:16]}.pt"
        payload = load_cache(cache_path, key, shape)
        if payload is not None and payload.get("classes") == classes:
            images = payload["images"]
    if images is None:
        images = _decode(paths, size)
        if cache:
            save_cache(cache_path, {"key": key, "classes": classes, "images": images, "sha256": tensor_digest(images)})
    return MiniImagenetData(images, classes, split, "folder")


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted class names and, per class, its file names in CSV order."""
    groups: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"filename", "label"} <= set(reader.fieldnames):
            raise DatasetFormatError(f"{path}: expected a header `filename,label`, got {reader.fieldnames}")
        for row in reader:
            groups.setdefault(row["label"], []).append(row["filename"])
    if not groups:
        raise DatasetFormatError(f"{path} lists no images")
    classes = sorted(groups)
    _check_equal_counts(path, {c: len(groups[c]) for c in classes})
    return classes, [groups[c] for c in classes]


def _check_equal_counts(path: Path, counts: dict[str, int]) -> None:
    if len(set(counts.values())) > 1:
        raise DatasetFormatError(f"{path}: classes have different numbers of images: {counts}")


def _cache_key(csv_path: Path, paths: list[list[Path]], split: str, size: int) -> str:
    # Hashing every jpg would cost as much as decoding them; sizes and mtimes catch replaced files.
    h = hashlib.sha256(f"miniimagenet-v{FORMAT_VERSION}|{split}|{size}|{file_digest(csv_path)}".encode())
    for ps in paths:
        for p in ps:
            st = p.stat()
            h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _to_chw(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _decode(paths: list[list[Path]], size: int) -> Tensor:
    out = np.empty((len(paths), len(paths[0]), 3, size, size), dtype=np.uint8)
    for c, ps in enumerate(paths):
        for i, p in enumerate(ps):
            try:
                with Image.open(p) as img:
                    out[c, i] = _to_chw(img, size)
            except (OSError, ValueError) as e:
                raise DatasetFormatError(f"cannot decode {p} ({e})") from e
    return torch.from_numpy(out)


def _load_pickle(path: Path, size: int) -> tuple[Tensor, list[str]]:
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
        image_data = np.asarray(data["image_data"])
        class_dict = data["class_dict"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path} is not a MiniImagenet pickle (a dict with 'image_data' and 'class_dict'): {type(e).__name__}: {e}"
        ) from e
    if image_data.ndim != 4 or image_data.shape[-1] != 3 or image_data.dtype != np.uint8:
        raise DatasetFormatError(
            f"{path}: image_data should be uint8 [N, H, W, 3], got {image_data.dtype} {image_data.shape}"
        )
    classes = sorted(class_dict)
    indices = [np.asarray(class_dict[c], dtype=np.int64) for c in classes]
    _check_equal_counts(path, {c: len(ix) for c, ix in zip(classes, indices, strict=True)})
    if any(ix.size and (ix.min() < 0 or ix.max() >= len(image_data)) for ix in indices):
        raise DatasetFormatError(f"{path}: class_dict holds indices outside image_data's {len(image_data)} images")
    resize = image_data.shape[1:3] != (size, size)
    out = np.empty((len(classes), len(indices[0]), 3, size, size), dtype=np.uint8)
    # Class by class, to keep the peak memory near one copy of the split.
    for c, ix in enumerate(indices):
        if resize:
            out[c] = np.stack([_to_chw(Image.fromarray(image_data[i]), size) for i in ix])
        else:
            out[c] = image_data[ix].transpose(0, 3, 1, 2)
    return torch.from_numpy(out), classes
