"""The shared file helpers (batchdet/files.py) and one-line errors (batchdet/errors.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import fsspec
import pytest

from batchdet.errors import one_line
from batchdet.files import (
    CHUNK,
    AtomicFile,
    atomic_write,
    cache_folder,
    cache_root,
    replace_bytes,
    save_verified,
    sha256_of_file,
)


class Boom(Exception):
    pass


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- sha256 and the cache ---------------------------------------------------------
def test_sha256_of_file_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * (CHUNK // 256 * 2 + 3)  # more than two chunks, not a multiple of one
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of_file(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_of_file(str(tmp_path / "empty")) == hashlib.sha256(b"").hexdigest()


def test_cache_root_follows_xdg_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "batchdet"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset, as XDG says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "batchdet"


def test_cache_folder_prefers_its_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("BATCHDET_TEST_CACHE", raising=False)
    assert cache_folder("models", env="BATCHDET_TEST_CACHE") == tmp_path / "xdg" / "batchdet" / "models"
    assert cache_folder("models") == tmp_path / "xdg" / "batchdet" / "models"
    monkeypatch.setenv("BATCHDET_TEST_CACHE", str(tmp_path / "elsewhere"))
    assert cache_folder("models", env="BATCHDET_TEST_CACHE") == tmp_path / "elsewhere"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATCHDET_TEST_CACHE", "~/c")
    assert cache_folder("models", env="BATCHDET_TEST_CACHE") == tmp_path / "home" / "c"


# --- atomic writes ------------------------------------------------------------------
def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "record.json"
    target.write_bytes(b"old")
    with atomic_write(target, mode=0o640) as f:
        f.write(b"new ")
        assert target.read_bytes() == b"old"  # nothing shows before the block ends
        f.write(b"bytes")
    assert target.read_bytes() == b"new bytes"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _names(tmp_path) == ["record.json"]


@pytest.mark.parametrize("error", [Boom("writer failed"), KeyboardInterrupt()])
def test_atomic_write_that_raises_leaves_the_old_file_and_no_partial_one(tmp_path, error):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_write(target) as f:
            f.write(b"half of it")
            raise error
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["model.onnx"]
    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(Boom):
        with atomic_write(fresh) as f:
            f.write(b"half")
            raise Boom()
    assert _names(tmp_path) == ["model.onnx"]


def test_atomic_file_gives_path_writers_a_temp_name_beside_the_target(tmp_path):
    target = tmp_path / "out.onnx"
    with AtomicFile(target, suffix=".tmp.onnx") as file:
        assert file.temp.parent == tmp_path and file.temp.name.startswith(".out.onnx.")
        assert file.temp.name.endswith(".tmp.onnx") and not file.temp.exists()
        file.temp.write_bytes(b"model")
        assert file.commit() == target
    assert target.read_bytes() == b"model" and _names(tmp_path) == ["out.onnx"]
    with AtomicFile(target) as file:  # never committed: the temp goes, the target stays
        file.temp.write_bytes(b"other")
    assert target.read_bytes() == b"model" and _names(tmp_path) == ["out.onnx"]
    with AtomicFile(target) as file:  # committed under another name (a content hash, say)
        file.temp.write_bytes(b"named")
        file.commit(tmp_path / "named.onnx")
    assert (tmp_path / "named.onnx").read_bytes() == b"named" and _names(tmp_path) == ["named.onnx", "out.onnx"]


@pytest.mark.parametrize("url", ["local", "memory://files-test"])
def test_replace_bytes_on_fsspec_filesystems(tmp_path, url):
    fs, root = fsspec.core.url_to_fs(str(tmp_path) if url == "local" else url)
    path = f"{root}/_runs/r.json"
    fs.makedirs(f"{root}/_runs", exist_ok=True)
    replace_bytes(fs, path, b"first")
    replace_bytes(fs, path, b"second")
    assert fs.cat_file(path) == b"second"
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/_runs", detail=False)] == ["r.json"]


def test_replace_bytes_uses_a_temp_and_a_rename_where_a_put_is_not_whole(tmp_path, monkeypatch):
    from fsspec.implementations.dirfs import DirFileSystem

    fs = DirFileSystem(str(tmp_path), fsspec.filesystem("file"))  # protocol "dir": neither local nor an object store
    calls = []
    monkeypatch.setattr(fs, "mv", lambda a, b, **kw: (calls.append((a, b)), DirFileSystem.mv(fs, a, b, **kw)))
    replace_bytes(fs, "r.json", b"whole")
    assert (tmp_path / "r.json").read_bytes() == b"whole" and _names(tmp_path) == ["r.json"]
    assert len(calls) == 1 and calls[0][0].startswith(".r.json.") and calls[0][1] == "r.json"


# --- verified downloads --------------------------------------------------------------
def _chunks(data: bytes, fail_after: int | None = None):
    for i in range(0, len(data), 3):
        if fail_after is not None and i >= fail_after:
            raise Boom("connection reset")
        yield data[i:i + 3]


def test_save_verified_lands_a_right_file_and_returns_its_sha(tmp_path):
    data = b"the model's bytes"
    sha = hashlib.sha256(data).hexdigest()
    assert save_verified(_chunks(data), tmp_path, "m.onnx", sha, source="src") == sha
    assert (tmp_path / "m.onnx").read_bytes() == data and _names(tmp_path) == ["m.onnx"]
    cache = tmp_path / "cache"
    cache.mkdir()
    assert save_verified(_chunks(data), cache, lambda digest: f"{digest}.onnx", source="src") == sha  # named by content
    assert _names(cache) == [f"{sha}.onnx"]


def test_save_verified_never_lands_a_wrong_or_cut_off_file(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"old")
    got = hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(LookupError, match=f"^sha256 mismatch for http://x/m: got {got}, expected {'0' * 64}$"):
        save_verified(_chunks(b"abcdef"), tmp_path, "m.onnx", "0" * 64, source="http://x/m", error=LookupError)
    with pytest.raises(Boom, match="connection reset"):
        save_verified(_chunks(b"abcdefghi", fail_after=3), tmp_path, "m.onnx", source="http://x/m")
    assert (tmp_path / "m.onnx").read_bytes() == b"old" and _names(tmp_path) == ["m.onnx"]


# --- one-line errors -------------------------------------------------------------------
def test_one_line_keeps_the_first_line_and_names_the_type():
    error = OSError("Access Denied\n  while listing s3://b/\nTraceback (most recent call last): ...")
    assert one_line(error) == "OSError: Access Denied"
    assert one_line(error, with_type=False) == "Access Denied"
    assert one_line(ValueError("\n\n  second line first  \n")) == "ValueError: second line first"
    assert one_line(KeyError("label")) == "KeyError: 'label'"


def test_one_line_of_an_empty_message_is_the_type_name():
    assert one_line(TimeoutError()) == "TimeoutError"
    assert one_line(TimeoutError(), with_type=False) == "TimeoutError"
    assert one_line(RuntimeError("   \n")) == "RuntimeError"


def test_one_line_takes_any_object():
    assert one_line("[Errno -2] Name or service not known", with_type=False) == "[Errno -2] Name or service not known"
    assert one_line(os.strerror(13), with_type=False) == "Permission denied"
