"""Dataset readers: the files users have (archives, image folders, pickles) → cached tensors.

Omniglot, MiniImagenet, and any folder of class folders (``load_folder``).

Nothing here ever downloads: a missing dataset raises ``DatasetNotFoundError`` saying which
file was expected where, how to point mamlkit at it and where to get it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CACHE_ENV = "MAMLKIT_CACHE_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset directory or file that is not where it was looked for (no download is attempted)."""


class DatasetFormatError(ValueError):
    """A dataset file that exists but cannot be read as expected (corrupt archive, wrong layout)."""


def resolve_dir(root: str | os.PathLike | None, env: str, what: str, hint: str) -> Path:
    """The data directory: ``root`` if given, else the environment variable ``env``; it must exist."""
    if not root:  # None or "" (an empty config value) both mean "not given"
        root = os.environ.get(env)
        if not root:
            raise DatasetNotFoundError(
                f"{what} data directory not set: pass it with `--set data.root=/path/to/dir` "
                f"(or the loader's root argument) or set the environment variable {env}. {hint}"
            )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{what} data directory {path} does not exist or is not a directory; "
            f"set it with `--set data.root=/path/to/dir` or {env}. {hint}"
        )
    return path


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache_dir``, else ``$MAMLKIT_CACHE_DIR``, else ``~/.cache/mamlkit``."""
    if not cache_dir:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mamlkit"
    return Path(cache_dir).expanduser()


def tensor_digest(t: Tensor) -> str:
    """sha256 of a tensor's bytes: detects a cache whose pixels changed under an intact key."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_cache(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): an interrupted run or a concurrent writer never leaves a
    half-written cache. A cache that cannot be written is only a warning: the data is already loaded."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write cache {path} ({e}); set another with MAMLKIT_CACHE_DIR", stacklevel=3)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def load_cache(path: Path, key: str, shape: tuple[int, ...] | None = None) -> dict[str, Any] | None:
    """The cached payload if it exists and matches ``key`` (and ``shape``) and its pixels are intact.

    A cache that is corrupt or does not match is reported with a warning and ``None`` is returned,
    so the caller rebuilds it.
    """
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        images = payload["images"]
        problem = None
        if payload.get("key") != key:
            problem = "its key does not match the inputs"
        elif images.dtype != torch.uint8 or (shape is not None and tuple(images.shape) != tuple(shape)):
            problem = f"unexpected images {images.dtype} {tuple(images.shape)}"
        elif tensor_digest(images) != payload.get("sha256"):
            problem = "its pixel checksum does not match"
    except Exception as e:  # any unreadable file is just a stale cache
        problem = f"it cannot be read ({type(e).__name__}: {e})"
    if problem is not None:
        warnings.warn(f"rebuilding cache {path}: {problem}", stacklevel=3)
        return None
    return payload


from .folder import FolderData, load_folder  # noqa: E402
from .miniimagenet import MiniImagenetData, load_miniimagenet  # noqa: E402
from .omniglot import OmniglotData, load_omniglot  # noqa: E402

__all__ = [
    "DatasetNotFoundError",
    "DatasetFormatError",
    "OmniglotData",
    "load_omniglot",
    "MiniImagenetData",
    "load_miniimagenet",
    "FolderData",
    "load_folder",
]
