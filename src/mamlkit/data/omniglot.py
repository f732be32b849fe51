"""Omniglot (Lake et al., 2015) read in place from the two standard zip archives.

Preprocessing follows the official MAML code: 28×28, pixel = 1 − x/255 (ink = 1). The
official script asked Pillow for LANCZOS on the 1-bit PNGs, which Pillow silently performs
as NEAREST, so its images were binary: ``resize="nearest"`` reproduces that exactly and
``resize="lanczos"`` converts to gray first to get real LANCZOS gray levels (about 3
accuracy points apart on the same model, so a result must say which one it used).

Split: the official code shuffled the ``os.listdir`` order of all 1623 character folders
(both archives merged into one ``<alphabet>/<character>`` tree) with ``random.seed(1)``,
then took 1100 train, 100 validation and the remaining 423 test characters. ``os.listdir``
order depends on the file system and cannot be recovered, so here the ``alphabet/character``
names are sorted before the same seeded shuffle (Python 3's ``random.shuffle``; Python 2's
drew a different permutation from the same seed): deterministic everywhere, but not the
official characters.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import zipfile
import zlib
from dataclasses import dataclass, field
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

ENV = "MAMLKIT_OMNIGLOT_DIR"
ARCHIVES = ("images_background.zip", "images_evaluation.zip")
RESIZE_MODES = ("nearest", "lanczos")
DRAWERS = 20
SPLIT_SEED = 1
# Bump when the cached content or layout changes, so old caches stop matching.
FORMAT_VERSION = 1
WHERE_TO_GET = (
    "Get images_background.zip and images_evaluation.zip from https://github.com/brendenlake/omniglot "
    "(folder python/) and put both zip files, unextracted, in that directory; mamlkit never downloads."
)


@dataclass
class OmniglotData:
    """All characters: ``images[c, d]`` is drawing ``d`` of character ``names[c]`` (``alphabet/characterNN``).

    ``splits`` holds character indices in shuffled order for ``"train"``, ``"val"`` and ``"test"``.
    """

    images: Tensor  # [n_chars, 20, size, size] float32, ink = 1
    names: list[str]
    splits: dict[str, list[int]] = field(default_factory=dict)
    resize: str = "nearest"

    def split_images(self, split: str) -> Tensor:
        """``[n_chars_in_split, 20, size, size]`` images of one split."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; splits are {list(self.splits)}")
        return self.images[torch.tensor(self.splits[split], dtype=torch.long)]


def preprocess(img: Image.Image, resize: str = "nearest", size: int = 28) -> np.ndarray:
    """One 1-bit drawing → ``[size, size]`` uint8 ink (255 = ink, i.e. 255 − gray)."""
    if resize == "nearest":
        # The official script's call, kept verbatim: on a mode-"1" image Pillow ignores LANCZOS
        # and uses NEAREST, which is what produced the official (binary) images.
        resample = Image.LANCZOS if img.mode == "1" else Image.NEAREST
        out = img.resize((size, size), resample=resample)
    elif resize == "lanczos":
        out = img.convert("L").resize((size, size), resample=Image.LANCZOS)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return 255 - np.asarray(out.convert("L"), dtype=np.uint8)


def load_omniglot(
    root: str | os.PathLike | None = None,
    *,
    resize: str = "nearest",
    size: int = 28,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    split_sizes: tuple[int, int] = (1100, 100),
) -> OmniglotData:
    """Load Omniglot from ``root`` (or ``$MAMLKIT_OMNIGLOT_DIR``), preprocessing once into a cache.

    Args:
        root: directory holding ``images_background.zip`` and ``images_evaluation.zip``.
        resize: ``"nearest"`` (official, binary images) or ``"lanczos"`` (true gray levels).
        size: output side in pixels.
        cache_dir: where the preprocessed tensor is kept (default ``$MAMLKIT_CACHE_DIR`` or
            ``~/.cache/mamlkit``); the cache is keyed by the archives' contents, ``resize``,
            ``size`` and a format version, and is rebuilt with a warning if it does not match.
        cache: ``False`` preprocesses without reading or writing a cache.
        split_sizes: (train, validation) characters; the rest are test. The official values are
            (1100, 100).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    root = resolve_dir(root, ENV, "Omniglot", WHERE_TO_GET)
    paths = [_archive(root, name) for name in ARCHIVES]
    members = _list_characters(paths)
    names = sorted(members)
    splits = official_split(names, split_sizes)
    shape = (len(names), DRAWERS, size, size)

    ink = None
    if cache:
        key = _cache_key(paths, resize, size)
        cache_path = resolve_cache_dir(cache_dir) / f"omniglot_{size}_{resize}_{key[:16]}.pt"
        payload = load_cache(cache_path, key, shape)
        if payload is not None and payload.get("names") == names:
            ink = payload["images"]
    if ink is None:
        ink = _decode(paths, members, names, resize, size)
        if cache:
            save_cache(cache_path, {"key": key, "names": names, "images": ink, "sha256": tensor_digest(ink)})
    return OmniglotData(images=ink.float().div_(255.0), names=names, splits=splits, resize=resize)


def official_split(names: list[str], split_sizes: tuple[int, int] = (1100, 100)) -> dict[str, list[int]]:
    """Indices into the sorted ``names``, shuffled as ``random.seed(1); random.shuffle(...)`` does."""
    n_train, n_val = split_sizes
    if n_train < 0 or n_val < 0 or n_train + n_val > len(names):
        raise ValueError(f"split_sizes {split_sizes} do not fit {len(names)} characters")
    order = list(range(len(names)))
    # A fresh Random(1) draws the same stream as the module-level random.seed(1) the official
    # code used, without touching the caller's global random state.
    random.Random(SPLIT_SEED).shuffle(order)
    return {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}


def _archive(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        present = sorted(p.name for p in root.iterdir())[:10]
        raise DatasetNotFoundError(
            f"Omniglot archive {name} not found in {root} (looked for {path}; the directory holds "
            f"{present or 'nothing'}). Set the directory with `--set data.root=...` or {ENV}. {WHERE_TO_GET}"
        )
    return path


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DatasetFormatError(f"{path} is not a readable zip archive ({e}). {WHERE_TO_GET}") from e


def _list_characters(paths: list[Path]) -> dict[str, tuple[int, list[str]]]:
    """``alphabet/character`` → (archive index, its PNG member names sorted by drawer)."""
    chars: dict[str, tuple[int, list[str]]] = {}
    for i, path in enumerate(paths):
        with _open(path) as zf:
            for member in zf.namelist():
                parts = member.split("/")
                if not member.endswith(".png") or len(parts) < 3 or "__MACOSX" in parts:
                    continue
                name = f"{parts[-3]}/{parts[-2]}"
                owner, files = chars.setdefault(name, (i, []))
                if owner != i:
                    raise DatasetFormatError(f"character {name} appears in both {paths[owner].name} and {path.name}")
                files.append(member)
    if not chars:
        raise DatasetFormatError(f"no <alphabet>/<character>/*.png images found in {', '.join(map(str, paths))}")
    for name, (i, files) in chars.items():
        files.sort()
        if len(files) != DRAWERS:
            raise DatasetFormatError(f"{paths[i]}: character {name} has {len(files)} drawings, expected {DRAWERS}")
    return chars


def _cache_key(paths: list[Path], resize: str, size: int) -> str:
    parts = [f"omniglot-v{FORMAT_VERSION}", resize, str(size)] + [file_digest(p) for p in paths]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _decode(
    paths: list[Path], members: dict[str, tuple[int, list[str]]], names: list[str], resize: str, size: int
) -> Tensor:
    out = np.empty((len(names), DRAWERS, size, size), dtype=np.uint8)
    index = {name: c for c, name in enumerate(names)}
    for i, path in enumerate(paths):
        with _open(path) as zf:
            for name, (owner, files) in members.items():
                if owner != i:
                    continue
                for d, member in enumerate(files):
                    try:
                        with Image.open(io.BytesIO(zf.read(member))) as img:
                            out[index[name], d] = preprocess(img, resize, size)
                    except (zipfile.BadZipFile, zlib.error, OSError, ValueError) as e:
                        raise DatasetFormatError(f"{path}: cannot decode {member} ({e}). {WHERE_TO_GET}") from e
    return torch.from_numpy(out)
