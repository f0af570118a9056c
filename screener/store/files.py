"""The one way the node writes a file that must survive a crash: temp file, fsync, atomic rename,
fsync of the folder. Files are created private (0600) and folders 0700, whatever the umask."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path) -> None:
    """Create `path` (and missing parents) with mode 0700; fsync the parent of each new folder."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, DIR_MODE)
            os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask
        fsync_dir(folder.parent)


def atomic_write(dest: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Write `data` to `dest` so that a reader sees either the old file or the whole new one.

    A unique ``<name>.<random>.part`` temp file in the same folder is written, fsynced and renamed
    onto `dest`, then the folder is fsynced. A folder that vanishes between the mkdir and the open
    (retention racing a writer) is re-created once."""
    folder = dest.parent
    for attempt in (0, 1):
        if not folder.is_dir():
            make_private_dir(folder)
        tmp = folder / f"{dest.name}.{uuid.uuid4().hex[:12]}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileNotFoundError:
            if attempt:
                raise
            continue
        try:
            try:
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(folder)
        return
