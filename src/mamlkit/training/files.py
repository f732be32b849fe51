"""The one way a run's files are written: beside the file, flushed, fsynced, renamed over it.

A kill, a full disk or a file-size limit in the middle of any write leaves the file as it was
before (or, for an append, without the torn line), and a write that fails raises
:class:`RunWriteError` naming the file. Checkpoints, ``config.yaml``, ``metrics.csv``, ``run.log``,
``eval*.json``/``eval*.md`` and plots all go through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

Content = str | bytes | Callable[[BinaryIO], None]


class RunWriteError(OSError):
    """A run file that could not be written; the file still holds what it held before."""


def _failed(path: Path, e: OSError, kept: str) -> RunWriteError:
    err = RunWriteError(
        e.errno,
        f"could not write {path} ({e.strerror or e}); {kept}. Free disk space or fix the directory's "
        "permissions, then run the same command again",
    )
    err.filename = str(path)
    return err


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _write_tmp(path: Path, content: Content) -> Path:
    """``content`` into a fsynced temporary file beside ``path``; removed again if anything fails."""
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                recording = _Recording(f)
                try:
                    content(recording)
                except Exception as e:
                    # A writer in C++ (torch.save's zip writer) reports a failed write as its own
                    # error ("unexpected pos ..."); the failed write's OSError is the cause to report.
                    if recording.error is not None and not isinstance(e, OSError):
                        raise recording.error from e
                    raise
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


class _Recording:
    """A binary file that remembers the OSError of a failed write."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _sync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_file(path: str | Path, content: Content, *, exclusive: bool = False) -> None:
    """Replace ``path`` with ``content`` (text, bytes, or a function writing to a binary file):
    a reader sees the old file or the new one, never a mix. With ``exclusive``, ``FileExistsError``
    if ``path`` already exists (two processes starting the same run: the first one wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = _write_tmp(path, content)
    except OSError as e:
        raise _failed(path, e, "it was left as it was" if path.exists() else "nothing was written") from e
    try:
        if exclusive:
            os.link(tmp, path)  # fails if path exists, unlike a rename
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)


def write_files(contents: dict[Path, Content]) -> None:
    """Replace several files of one folder as a set (an evaluation's ``.json`` and ``.md``).

    Every new file is written and fsynced first, so a failed write changes none of them. Then a
    journal naming the new files is written, the files are renamed into place, and the journal is
    removed; a kill between two renames leaves the journal, and :func:`finish_pending` (which every
    mamlkit command on a run calls) completes the set. Ctrl-C and SIGTERM wait for the renames."""
    paths = [Path(p) for p in contents]
    folder = paths[0].parent
    if any(p.parent != folder for p in paths):
        raise ValueError("write_files: the files of a set share one folder")
    folder.mkdir(parents=True, exist_ok=True)
    finish_pending(folder)
    written: dict[Path, Path] = {}
    try:
        for path, content in zip(paths, contents.values()):
            try:
                written[path] = _write_tmp(path, content)
            except OSError as e:
                raise _failed(path, e, f"{', '.join(p.name for p in paths)} were left as they were") from e
        journal = folder / f".{paths[0].name}{PENDING}"
        write_file(journal, json.dumps({p.name: t.name for p, t in written.items()}))
        with _signals_held():
            for path, tmp in written.items():
                os.replace(tmp, path)
            journal.unlink()
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
    _sync_dir(folder)


PENDING = ".pending"


def finish_pending(folder: str | Path) -> list[str]:
    """Complete the sets of files whose renames a kill interrupted (:func:`write_files`): each
    journal's files that are still temporary are renamed into place. Returns the files completed."""
    done = []
    for journal in Path(folder).glob(f".*{PENDING}"):
        try:
            names = json.loads(journal.read_text())
        except (OSError, ValueError):  # the journal itself was cut: no rename had started
            journal.unlink(missing_ok=True)
            continue
        for final, tmp in names.items():
            if (journal.parent / tmp).exists():
                os.replace(journal.parent / tmp, journal.parent / final)
                done.append(final)
        journal.unlink(missing_ok=True)
    return done


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` in one write, fsynced; a write that fails is cut
    back off, so the file never keeps part of it."""
    path = Path(path)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _failed(path, e, "its earlier lines are intact") from e
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Delay SIGINT, SIGTERM and SIGHUP until the block ends (a few renames), so a stop cannot
    land between two files that belong together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
