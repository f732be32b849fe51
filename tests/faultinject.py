"""Run the mamlkit command with a fault injected at one of its writes: ``python tests/faultinject.py
MODE K DIR mamlkit-args...``.

Every write into ``DIR`` (but TensorBoard's ``tb/``) is an event, counted in order: each
``write()`` on a file opened for writing (through ``open``/``io.open``/``os.fdopen``, as Python,
torch.save and matplotlib open files) or through ``os.write``, and each
``os.replace``/``os.rename``/``os.link``.
``MODE``:

- ``count``: no fault; the events are listed, one a line (``op relative-path``), in the file that
  the environment variable ``FAULT_EVENTS`` names, if set.
- ``kill``: at event ``K``, half of the data is written (nothing for a rename), then the process is
  killed with SIGKILL, as a power cut or ``kill -9`` would do it.
- ``enospc``: at event ``K``, half of the data is written, then the write fails with ENOSPC (a
  full disk); renames are not failed.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import sys
from pathlib import Path

MODE, AT, DIR = sys.argv[1], int(sys.argv[2]), os.path.realpath(sys.argv[3])
EVENTS: list[str] = []
_real = {"open": io.open, "write": os.write, "replace": os.replace, "rename": os.rename, "link": os.link}


def _inside(path) -> str | None:
    """``path`` relative to DIR, or None outside it or in ``tb/``: TensorBoard writes its event files
    from a thread of its own, at moments that differ from run to run, so they would make the
    event numbers differ between the counting run and the faulted one."""
    if isinstance(path, int):
        try:
            path = os.readlink(f"/proc/self/fd/{path}")
        except OSError:
            return None
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return None
    if not (real == DIR or real.startswith(DIR + os.sep)):
        return None
    rel = os.path.relpath(real, DIR)
    return None if "tb" in rel.split(os.sep) else rel


def _event(op: str, rel: str) -> bool:
    """Count an event; True if the fault strikes at it."""
    EVENTS.append(f"{op} {rel}")
    if MODE == "count" and os.environ.get("FAULT_EVENTS"):
        with _real["open"](os.environ["FAULT_EVENTS"], "a") as f:
            f.write(f"{op} {rel}\n")
    return MODE != "count" and len(EVENTS) == AT


def _strike(rel: str, write_half) -> None:
    if write_half is not None:
        write_half()
    if MODE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(DIR, rel))


class _Counted:
    """A file object whose writes are events."""

    def __init__(self, f, rel: str):
        self._f, self._rel = f, rel

    def write(self, data):
        if _event("write", self._rel):
            half = data[: len(data) // 2]
            _strike(self._rel, lambda: (self._f.write(half), self._f.flush()))
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _open(file, mode="r", *args, **kwargs):
    f = _real["open"](file, mode, *args, **kwargs)
    rel = _inside(file) if any(c in mode for c in "wax+") else None
    return f if rel is None else _Counted(f, rel)


def _write(fd, data):
    rel = _inside(fd)
    if rel is not None and _event("write", rel):
        _strike(rel, lambda: _real["write"](fd, data[: len(data) // 2]))
    return _real["write"](fd, data)


def _renaming(op: str):
    def rename(src, dst, *args, **kwargs):
        rel = _inside(dst)
        if rel is not None and _event(op, rel) and MODE == "kill":
            _strike(rel, None)
        return _real[op](src, dst, *args, **kwargs)

    return rename


builtins.open = io.open = _open
os.write = _write
os.replace, os.rename, os.link = _renaming("replace"), _renaming("rename"), _renaming("link")
Path(DIR).mkdir(parents=True, exist_ok=True)

if __name__ == "__main__":
    from mamlkit.cli import main

    sys.exit(main(sys.argv[4:]))
