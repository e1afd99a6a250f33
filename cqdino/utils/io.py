"""Safe output: atomic writes with the user's umask, and checks that refuse, in one line and
before any slow work, an output that would overwrite an input or cannot be written.

``tempfile`` creates files 0600 and folders 0700 whatever the umask; everything written through
these helpers gets the permissions an ordinary ``open``/``mkdir`` would give (0666 / 0777 less
the umask), so a checkpoint or a generated dataset can be read by whoever could read any other
file of the user.
"""

import os
import tempfile
from typing import Any, Callable, Iterable, Optional

__all__ = [
    "InputError",
    "umask",
    "atomic_save",
    "atomic_write",
    "make_temp_dir",
    "check_output_dir",
    "check_not_inputs",
]


class InputError(ValueError):
    """Bad user input (a path, an argument, a config value): the message is the whole story,
    one line naming the file, key or argument; entry points print it without a traceback."""


def umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(
    path: str, save: Callable[[str], None], overwrite: bool = True, suffix: str = ".tmp"
) -> None:
    """``save(tmp)`` writes a temporary file (by name: for libraries that take a path) next to
    ``path``; it is fsynced and renamed onto ``path``.

    The file gets the permissions of a newly created file (0666 less the umask); a reader never
    sees a partial file, and a failure leaves ``path`` as it was. With ``overwrite=False`` an
    existing ``path`` is never replaced, not even one that appears while ``save`` runs (the
    temporary file is hard-linked into place, which fails on an existing name):
    ``FileExistsError`` naming it. ``suffix`` ends the temporary name (some writers want
    ``.pt2`` or ``.onnx``); the name starts with ``.<basename of path>.``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        _fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} exists; not replaced (overwrite is off)") from None
            os.remove(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        _fsync(folder)
    except OSError:
        pass


def atomic_write(
    path: str, write: Callable[[Any], None], mode: str = "wb", overwrite: bool = True
) -> None:
    """``write(f)`` into a temporary file object next to ``path``, then as :func:`atomic_save`
    (fsync, rename; umask permissions; ``overwrite=False`` never replaces an existing file)."""

    def save(tmp: str) -> None:
        with open(tmp, mode) as f:
            write(f)

    atomic_save(path, save, overwrite=overwrite)


def make_temp_dir(prefix: str, dir: str) -> str:
    """``tempfile.mkdtemp`` with the permissions of ``os.mkdir`` (0777 less the umask), for a
    folder that is renamed into place once complete."""
    path = tempfile.mkdtemp(prefix=prefix, dir=dir)
    os.chmod(path, 0o777 & ~umask())
    return path


def _first_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(path: str, what: str) -> None:
    """Raise :class:`InputError` naming ``what`` (e.g. ``"--output"``, ``"train.output_dir"``)
    when ``path`` cannot become a folder to write into: it is a file, an ancestor is a file, or
    the folder (or the existing ancestor it would be created in) is not writable."""
    if not path:
        raise InputError(f"{what}: no folder given")
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what}={path} is a file, not a folder: choose a folder")
    existing = _first_existing(path)
    if not os.path.isdir(existing):
        raise InputError(f"{what}={path}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing}, where it would be created)"
        raise InputError(f"{what}={path}: the folder is not writable{where}")


def check_not_inputs(
    outputs: Iterable[str], inputs: Iterable[str], what: str, hint: Optional[str] = None
) -> None:
    """Raise :class:`InputError` when a path in ``outputs`` is (the same file as) one of
    ``inputs``: an output must never replace an input. The same file: the same path after
    resolving symbolic links, or a hard link of it (same device and inode)."""
    real = {os.path.realpath(p): p for p in inputs}
    for out in outputs:
        src = real.get(os.path.realpath(out))
        if src is None and os.path.exists(out):
            src = next((p for p in real.values() if _same_inode(out, p)), None)
        if src is not None:
            msg = f"{what}: writing {out} would overwrite the input {src}"
            raise InputError(msg + (f"; {hint}" if hint else ""))


def _same_inode(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist
        return False
