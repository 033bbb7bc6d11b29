"""Writing files and folders so that a crash never leaves a half-written one under the final name.

Everything is written under a temporary name next to its destination, flushed to disk (`fsync`),
then renamed: a rename within a folder is atomic on POSIX file systems, so readers see either the
old version, the new one, or (for a first write) nothing, even after a SIGKILL or a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"  # in the names of temporaries: `.STEM.tmp-PID.SUFFIX`


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk (a no-op where the OS cannot open folders)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # Windows cannot open folders; their renames are flushed by the file system
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (and folders on some OSes) refuse fsync; nothing more can be done
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """`fsync_path` on every file and folder under `path`, and `path` itself."""
    path = Path(path)
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                fsync_path(os.path.join(root, name))
            fsync_path(root)
    else:
        fsync_path(path)


def temporary_name(path: Path) -> Path:
    """A hidden name next to `path` that is this process's own, with `path`'s suffix (writers pick formats by it)."""
    return path.with_name(f".{path.stem}{TEMP_MARK}{os.getpid()}{path.suffix}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove `path`'s temporaries left by processes that were killed while writing it."""
    for stale in path.parent.glob(f".{path.stem}{TEMP_MARK}*{path.suffix}"):
        _remove(stale)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder to; on success it replaces `path` atomically.

    On an exception the temporary is removed and `path` is left as it was. A folder that already
    exists at `path` is moved aside, then removed after the new one is in place (a folder cannot be
    renamed over a non-empty one); a crash in between leaves `path` absent, never half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    fsync_tree(tmp)
    replace_path(tmp, path)


def replace_path(source: Path, destination: Path) -> None:
    """Rename `source` (a file or a folder) to `destination`, replacing what is there, and flush the rename."""
    old = None
    if destination.is_dir() and not destination.is_symlink():
        old = destination.with_name(f".{destination.stem}{TEMP_MARK}{os.getpid()}.old{destination.suffix}")
        _remove(old)
        os.replace(destination, old)
    os.replace(source, destination)
    fsync_path(destination.parent)
    if old is not None:
        _remove(old)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` (UTF-8) so that `path` holds either the old text or all of the new."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)
