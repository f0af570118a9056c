"""Files at rest that hold patient data are private to the service user: folders 0700, files 0600.

`screener serve` and `screener replay` set the process umask to 0077 first, so that everything they
or their libraries create (the SQLite database and its -wal/-shm files, spool files, SRs, audit
files) is private whatever the umask of the shell or unit that started them; `make_tree_private`
tightens what an earlier run (or an older version) left with wider modes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
DIR_MODE = 0o700
FILE_MODE = 0o600


def apply_private_umask() -> int:
    """Set the process umask to 0077; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def make_tree_private(root: Path) -> int:
    """chmod folders under `root` (itself included) to 0700 and files to 0600; symlinks are not
    followed. Returns the number of entries changed. A missing `root` is left alone."""
    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        return 0
    changed = 0

    def fix(path: str, mode: int) -> None:
        nonlocal changed
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
            changed += 1

    fix(str(root), DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            fix(os.path.join(folder, d), DIR_MODE)
        for f in files:
            fix(os.path.join(folder, f), FILE_MODE)
    return changed
