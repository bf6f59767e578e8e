"""A file written through megamoe.atomic_files holds the old content or the whole new one, never a part,
and leaves no temporary file behind."""

import os
import stat

import pytest

from megamoe.atomic_files import AtomicFile, write_atomic, write_text_atomic


def listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "meta.json"
    write_text_atomic(target, "old")

    def fails_midway(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fails_midway)
    assert target.read_text() == "old" and listing(tmp_path) == ["meta.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and listing(tmp_path) == ["meta.json"]


def test_atomic_file_is_published_only_by_commit(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    streamed = AtomicFile(target)
    streamed.file.write(b"first tensor ")
    assert target.read_bytes() == b"old"  # a crash now leaves the previous file
    streamed.file.write(b"second tensor")
    streamed.commit()
    assert target.read_bytes() == b"first tensor second tensor" and listing(tmp_path) == ["model.safetensors"]

    aborted = AtomicFile(target)
    aborted.file.write(b"a failed export")
    aborted.abort()
    assert target.read_bytes() == b"first tensor second tensor" and listing(tmp_path) == ["model.safetensors"]


def test_published_files_get_the_mode_of_any_new_file(tmp_path):
    mask = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a", "x")
        streamed = AtomicFile(tmp_path / "b")
        streamed.commit()
    finally:
        os.umask(mask)
    for name in ("a", "b"):  # not the private 0600 of the temporary file
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name
