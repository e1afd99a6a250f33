"""One run per output folder: an advisory lock held for the life of a run.

``RunLock(folder).acquire()`` takes an exclusive ``flock`` on ``<folder>/run.lock`` (without
waiting) and writes the holder's pid, host and command into it. The kernel releases a ``flock``
when its holder exits in any way (a crash or ``kill -9`` included), so a lock left by a killed
run is never "held": the next run takes it over and says whose it was. A second run started
into the same folder while the first lives is refused in one line naming the holder. On a clean
exit the file is emptied before the lock is released (the file itself stays: deleting it would
let two processes lock two different files of the same name).
"""

import atexit
import errno
import fcntl
import os
import socket
import sys
import time
from typing import Optional

from cqdino.utils.io import InputError

__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]

LOCK_NAME = "run.lock"


class RunLockedError(InputError):
    """Another live process holds the folder's lock (the message names it)."""


class RunLock:
    """Exclusive, non-blocking lock of ``folder`` (created if absent) for one run.

    Args:
        folder: the run's output folder.
        what: how the folder is named in messages (e.g. ``"train.output_dir"``).
    """

    def __init__(self, folder: str, what: str = "train.output_dir"):
        self.folder = folder
        self.what = what
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None
        self.previous = ""  # the holder line of a run that died holding the lock ("" if none)

    def acquire(self) -> "RunLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise InputError(f"{self.what}={self.folder}: cannot lock {self.path}: {e}")
            raise RunLockedError(
                f"{self.what}={self.folder} is in use by another run ({holder or 'holder unknown'}"
                f"; lock {self.path}): wait for it to end or choose another {self.what}=..."
            ) from None
        self.previous = _read(fd)  # left by a run that died holding the lock
        line = (
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}"
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)  # a clean exit empties the file
        return self

    def release(self) -> None:
        """Empty the file (a clean end) and release the lock; a no-op when not held."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        os.close(self._fd)  # releases the flock
        self._fd = None
        atexit.unregister(self.release)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""
