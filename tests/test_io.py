"""cqdino.utils.io's atomic writers: one code path for file-object writers (atomic_write) and
path writers (atomic_save, used by the exporters), with and without overwriting."""

import os
import stat

import pytest

from cqdino.utils.io import atomic_save, atomic_write


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("."))


def test_atomic_write_replaces_and_follows_umask(tmp_path, umask_027):
    path = tmp_path / "out.txt"
    path.write_text("old")
    atomic_write(str(path), lambda f: f.write("new"), mode="w")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0666 & ~027, not tempfile's 0600
    assert _leftovers(tmp_path) == []


def test_no_overwrite_keeps_existing_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="model.onnx exists"):
        atomic_save(str(path), lambda tmp: open(tmp, "wb").write(b"x"), overwrite=False)
    assert path.read_bytes() == b"user data"
    with pytest.raises(FileExistsError):
        atomic_write(str(path), lambda f: f.write(b"x"), overwrite=False)
    assert path.read_bytes() == b"user data"
    assert _leftovers(tmp_path) == []


def test_no_overwrite_when_the_file_appears_while_writing(tmp_path):
    path = tmp_path / "model.pt2"

    def save(tmp):
        path.write_bytes(b"written by someone else meanwhile")
        with open(tmp, "wb") as f:
            f.write(b"ours")

    with pytest.raises(FileExistsError):
        atomic_save(str(path), save, overwrite=False)
    assert path.read_bytes() == b"written by someone else meanwhile"
    assert _leftovers(tmp_path) == []


def test_new_file_without_overwrite_and_temp_suffix(tmp_path, umask_027):
    path = tmp_path / "sub" / "model.pt2"
    seen = []

    def save(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"program")

    atomic_save(str(path), save, overwrite=False, suffix=".pt2")
    assert path.read_bytes() == b"program"
    assert seen[0].endswith(".pt2") and os.path.basename(seen[0]).startswith(".model.pt2.")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert _leftovers(path.parent) == []


def test_failure_leaves_the_target_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"previous")

    def save(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save(str(path), save)
    assert path.read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []
