"""Your own images as a few-shot dataset: a folder of class folders.

::

    root/
      cat/    0001.png  0002.jpg  ...
      dog/    a.jpeg  b.webp  ...

Every folder directly inside ``root`` is a class (hidden ones are skipped); its images are the
files directly inside it whose names end in one of ``EXTENSIONS`` (case-insensitive), in sorted
order. Images of any mode are converted to ``channels`` (1: gray, 3: RGB; transparent pixels
become white) and resized, not cropped, to ``image_size`` x ``image_size`` with LANCZOS.

Split, by class:

- a split file (``split_file``): one ``CLASS,SPLIT`` (CSV) or ``CLASS SPLIT`` (whitespace) line per
  class, SPLIT being ``train``, ``val`` or ``test``; blank lines, ``#`` comments and a first line
  ``class,split`` are skipped. Classes it does not list are not used.
- otherwise the class names are sorted, shuffled with ``random.Random(0)`` (so that names that
  group similar classes, ``bird_01``..., do not put them all in one split) and cut by
  ``split_fractions``: the first ``round(n * train)`` classes train, up to ``round(n * (train + val))``
  val, the rest test. Deterministic on every machine; adding a class reshuffles it, so a run of
  ``mamlkit train`` records its split in ``RUN/split.csv``, which ``--resume`` and ``mamlkit eval`` read.

The sampler draws from equal-sized classes, so a split whose classes hold different numbers of
images uses the first ``m`` (sorted names) of each, ``m`` being its smallest class (with a warning).
"""

from __future__ import annotations

import csv
import hashlib
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import DatasetFormatError, DatasetNotFoundError, load_cache, resolve_cache_dir, save_cache, tensor_digest

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
SPLIT_SEED = 0
# Bump when the cached content or layout changes, so old caches stop matching.
FORMAT_VERSION = 1
LAYOUT = "root/CLASS/IMAGE (e.g. root/cat/0001.png)"


@dataclass
class FolderIndex:
    """The classes found under ``root`` (sorted), their image files and the split: no pixels read."""

    root: Path
    classes: list[str]
    files: list[list[Path]]  # per class, sorted
    splits: dict[str, list[int]]  # class indices per split

    def check(self, split: str, min_per_class: int = 1, min_classes: int = 1) -> None:
        """Refuse a split with fewer than ``min_classes`` classes or a class with fewer than
        ``min_per_class`` images, naming them."""
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; splits are {list(self.splits)}")
        ids = self.splits[split]
        if len(ids) < min_classes:
            raise DatasetFormatError(
                f"{self.root}: the {split} split holds {len(ids)} classes but {min_classes}-way tasks need "
                f"{min_classes}; add class folders, or move classes to it with data.split_file or data.split_fractions"
            )
        short = [(self.classes[c], len(self.files[c])) for c in ids if len(self.files[c]) < min_per_class]
        if short:
            named = ", ".join(f"{name} ({n})" for name, n in short[:5])
            named += f" and {len(short) - 5} more" if len(short) > 5 else ""
            raise DatasetFormatError(
                f"{self.root}: tasks on the {split} split need {min_per_class} images per class (the shots plus "
                f"the queries per class) but {len(short)} of its classes hold fewer: {named}; add images to them, "
                "leave them out of the split (data.split_file), or lower task.k_shot / task.q_query / eval.query"
            )


@dataclass
class FolderData(FolderIndex):
    """``FolderIndex`` with the pixels: ``images`` holds every class's images, class after class."""

    images: Tensor  # [all images, channels, size, size] uint8 (scale by 1/255 per batch)

    def split_images(self, split: str, min_per_class: int = 1, min_classes: int = 1) -> Tensor:
        """``[classes, per_class, channels, size, size]`` uint8 of one split (checked as ``check`` does)."""
        self.check(split, min_per_class, min_classes)
        ids = self.splits[split]
        counts = [len(f) for f in self.files]
        starts = np.cumsum([0, *counts])
        m = min(counts[c] for c in ids)
        if any(counts[c] != m for c in ids):
            warnings.warn(
                f"{self.root}: the {split} split's classes hold {m} to {max(counts[c] for c in ids)} images; "
                f"tasks use the first {m} of each (sorted by name), as the sampler draws from equal-sized classes",
                stacklevel=2,
            )
        return torch.stack([self.images[starts[c] : starts[c] + m] for c in ids])


def scan_folder(
    root: str | os.PathLike | None,
    *,
    split_file: str | os.PathLike | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> FolderIndex:
    """List the classes and images under ``root`` and split the classes (see the module docstring)."""
    if not root:  # None or "" (an empty config value) both mean "not given"
        raise DatasetNotFoundError(
            f"the folder dataset needs its directory: pass it with `--set data.root=/path/to/images` "
            f"(or the root argument), laid out as {LAYOUT}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist or is not a directory; set it with `--set data.root=...` "
            f"to a folder laid out as {LAYOUT}"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetFormatError(f"{root} holds no class folders; lay it out as {LAYOUT}")
    files = []
    for name in classes:
        found = sorted(
            p
            for p in (root / name).iterdir()
            if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and p.is_file()
        )
        if not found:
            raise DatasetFormatError(
                f"class folder {root / name} holds no images ({', '.join(EXTENSIONS)}) directly inside it; "
                f"add some, or remove the folder (the layout is {LAYOUT}, one level of class folders)"
            )
        files.append(found)
    if split_file:
        by_name = read_split_file(split_file, classes)
        index = {name: c for c, name in enumerate(classes)}
        splits = {s: [index[name] for name in by_name[s]] for s in SPLITS}
    else:
        splits = fraction_split(classes, split_fractions)
    return FolderIndex(root, classes, files, splits)


def load_folder(
    root: str | os.PathLike | None,
    *,
    image_size: int = 84,
    channels: int = 3,
    split_file: str | os.PathLike | None = None,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
) -> FolderData:
    """Read a folder of class folders, decoding once into a cache.

    Args:
        root: the folder of class folders.
        image_size: side of the square images after resizing.
        channels: 1 (gray) or 3 (RGB); images of any mode are converted.
        split_file: a file naming each class's split; else ``split_fractions`` of the shuffled classes.
        split_fractions: (train, val, test) fractions of the classes, summing to 1.
        cache_dir: where the decoded images are kept (default ``$MAMLKIT_CACHE_DIR`` or
            ``~/.cache/mamlkit``); keyed by every image's name, size and mtime, ``image_size``,
            ``channels``, the resize and a format version; rebuilt with a warning if it does not match.
        cache: ``False`` decodes without reading or writing a cache.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    index = scan_folder(root, split_file=split_file, split_fractions=split_fractions)
    paths = [p for ps in index.files for p in ps]
    shape = (len(paths), channels, image_size, image_size)
    images = None
    if cache:
        key = _cache_key(index, image_size, channels)
        cache_path = resolve_cache_dir(cache_dir) / f"folder_{image_size}_{channels}_{key[:16]}.pt"
        payload = load_cache(cache_path, key, shape)
        if payload is not None and payload.get("classes") == index.classes:
            images = payload["images"]
    if images is None:
        images = _decode(paths, image_size, channels)
        if cache:
            payload = {"key": key, "classes": index.classes, "images": images, "sha256": tensor_digest(images)}
            save_cache(cache_path, payload)
    return FolderData(index.root, index.classes, index.files, index.splits, images)


def fraction_split(classes: list[str], fractions=DEFAULT_FRACTIONS) -> dict[str, list[int]]:
    """Indices into the sorted ``classes``: shuffled with ``random.Random(0)``, cut by ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be 3 numbers >= 0 (train, val, test) summing to 1, got {fractions}")
    order = sorted(range(len(classes)), key=lambda c: classes[c])
    random.Random(SPLIT_SEED).shuffle(order)
    n = len(order)
    a, b = round(n * fractions[0]), round(n * (fractions[0] + fractions[1]))
    return {"train": order[:a], "val": order[a:b], "test": order[b:]}


def read_split_file(path: str | os.PathLike, classes: list[str]) -> dict[str, list[str]]:
    """``{split: class names}`` from a split file (format in the module docstring), checked against ``classes``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"split file {path} not found; fix data.split_file, or set it to null to split by fractions"
        )
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    seen: dict[str, int] = {}
    known = set(classes)
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = next(csv.reader([line])) if "," in line else line.rsplit(None, 1)
        parts = [p.strip() for p in parts]
        if [p.lower() for p in parts] == ["class", "split"] and not seen:
            continue  # the header
        where = f"split file {path}, line {number}"
        if len(parts) != 2 or not all(parts):
            raise DatasetFormatError(f"{where}: expected `CLASS,SPLIT` (or `CLASS SPLIT`), got {line!r}")
        name, split = parts
        if split not in SPLITS:
            raise DatasetFormatError(f"{where}: split {split!r} must be one of {', '.join(SPLITS)}")
        if name not in known:
            raise DatasetFormatError(f"{where}: class {name!r} has no folder in the dataset; classes are folder names")
        if name in seen:
            raise DatasetFormatError(f"{where}: class {name!r} is listed again (first on line {seen[name]})")
        seen[name] = number
        out[split].append(name)
    if not seen:
        raise DatasetFormatError(f"split file {path} lists no classes; write one `CLASS,SPLIT` line per class")
    return out


def _cache_key(index: FolderIndex, image_size: int, channels: int) -> str:
    # Hashing every image would cost as much as decoding them; sizes and mtimes catch replaced files.
    h = hashlib.sha256(f"folder-v{FORMAT_VERSION}|{image_size}|{channels}|lanczos".encode())
    for name, ps in zip(index.classes, index.files, strict=True):
        for p in ps:
            st = p.stat()
            h.update(f"|{name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def to_array(img: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """One image of any mode → ``[channels, image_size, image_size]`` uint8."""
    if img.mode in ("P", "PA") or "A" in img.getbands() or "transparency" in img.info:
        # Over white, not black: a drawing on a transparent background stays visible.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), resample=Image.LANCZOS)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _decode(paths: list[Path], image_size: int, channels: int) -> Tensor:
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as img:
                out[i] = to_array(img, image_size, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetFormatError(f"cannot read image {p} ({e}); replace or delete it") from e
    return torch.from_numpy(out)
