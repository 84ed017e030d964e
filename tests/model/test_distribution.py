"""Model distribution: a model URL becomes one verified file per node, shared by
every process on the node (file lock + atomic rename), checked by sha256."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from batchdet.model import distribution
from batchdet.model.distribution import (
    DistributionError, is_remote, local_model, model_cache_dir, model_ref, resolve_model, split_ref,
)

BLOB = b"not really onnx, but bytes are bytes" * 1000
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def remote(s3):
    """A model file on the moto S3 endpoint: (url, storage options, s3fs)."""
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    fs.pipe(f"{bucket}/models/m.onnx", BLOB)
    return f"s3://{bucket}/models/m.onnx", s3.storage_options, fs


@pytest.fixture
def downloads(monkeypatch):
    """Count real downloads (and make each slow enough for others to queue on the lock)."""
    calls = []
    original = distribution._download

    def counting(location, cache, options, want):
        calls.append(location)
        threading.Event().wait(0.3)
        return original(location, cache, options, want)

    monkeypatch.setattr(distribution, "_download", counting)
    return calls


def test_references():
    assert split_ref(f"s3://b/m.onnx#sha256={SHA.upper()}") == ("s3://b/m.onnx", SHA)
    assert split_ref("s3://b/m.onnx") == ("s3://b/m.onnx", None)
    assert model_ref("https://x/m.onnx", SHA) == f"https://x/m.onnx#sha256={SHA}"
    with pytest.raises(DistributionError, match="64 hexadecimal digits"):
        split_ref("s3://b/m.onnx#sha256=abc")
    assert is_remote("s3://b/m.onnx") and is_remote("https://h/m.onnx") and is_remote("gs://b/m")
    assert not is_remote("/models/m.onnx") and not is_remote("file:///m.onnx") and not is_remote("C:\\m.onnx")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BATCHDET_MODEL_CACHE", str(tmp_path / "c"))
    assert model_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BATCHDET_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "batchdet" / "models"


def test_local_paths_pass_through_and_can_be_pinned(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(BLOB)
    assert local_model(path) == path
    assert local_model(f"file://{path}") == path
    assert local_model(f"{path}#sha256={SHA}") == path
    with pytest.raises(DistributionError, match="sha256 mismatch"):
        local_model(path, sha256="0" * 64)
    with pytest.raises(DistributionError, match="model file not found on node"):
        local_model(tmp_path / "missing.onnx", sha256=SHA)


def test_pinned_url_fetched_once_then_verified_from_cache(remote, downloads, tmp_path):
    url, options, _ = remote
    cache = tmp_path / "cache"
    first = local_model(f"{url}#sha256={SHA}", storage_options=options, cache_dir=cache)
    assert first == cache / f"{SHA}.onnx" and first.read_bytes() == BLOB
    assert local_model(url, sha256=SHA, storage_options=options, cache_dir=cache) == first
    assert downloads == [url]
    first.write_bytes(b"bit rot")  # a damaged cache file is replaced, not used
    assert local_model(url, sha256=SHA, storage_options=options, cache_dir=cache).read_bytes() == BLOB
    assert len(downloads) == 2
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [f"{SHA}.onnx"]


def test_wrong_checksum_leaves_nothing_behind(remote, tmp_path):
    url, options, _ = remote
    cache = tmp_path / "cache"
    with pytest.raises(DistributionError, match=f"sha256 mismatch for {url}: got {SHA}, expected 1111"):
        local_model(url, sha256="1" * 64, storage_options=options, cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(DistributionError, match="conflicting sha256"):
        local_model(f"{url}#sha256={SHA}", sha256="1" * 64, cache_dir=cache)


def test_missing_object_is_one_line(remote, tmp_path):
    url, options, _ = remote
    with pytest.raises(DistributionError, match=r"^model not found: s3://.*/nothing.onnx$"):
        local_model(url.replace("m.onnx", "nothing.onnx"), storage_options=options, cache_dir=tmp_path)


def test_unpinned_url_reused_until_the_object_changes(remote, downloads, tmp_path):
    url, options, fs = remote
    cache = tmp_path / "cache"
    assert local_model(url, storage_options=options, cache_dir=cache) == cache / f"{SHA}.onnx"
    assert local_model(url, storage_options=options, cache_dir=cache) == cache / f"{SHA}.onnx"
    assert len(downloads) == 1  # same size and ETag: the cached copy
    new = b"a new version of the model"
    fs.pipe(url, new)
    got = local_model(url, storage_options=options, cache_dir=cache)
    assert got.read_bytes() == new and got.name == f"{hashlib.sha256(new).hexdigest()}.onnx"
    assert len(downloads) == 2


def test_concurrent_actors_share_one_download(remote, downloads, tmp_path):
    url, options, _ = remote
    cache = tmp_path / "cache"
    results, errors = [], []

    def actor():
        try:
            results.append(local_model(url, sha256=SHA, storage_options=options, cache_dir=cache))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=actor) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6 and set(results) == {cache / f"{SHA}.onnx"}
    assert downloads == [url]


def test_concurrent_processes_share_one_download(remote, tmp_path):
    """Separate processes (as Ray actors are), each with its own lock handle."""
    url, options, _ = remote
    cache = tmp_path / "cache"
    code = (
        "import sys, json; from batchdet.model import distribution as d\n"
        "orig = d._download\n"
        "def counted(*a):\n"
        "    print('DOWNLOAD', flush=True); return orig(*a)\n"
        "d._download = counted\n"
        "print(d.local_model(sys.argv[1], storage_options=json.loads(sys.argv[2]), cache_dir=sys.argv[3]))\n"
    )
    import json

    procs = [subprocess.Popen([sys.executable, "-c", code, f"{url}#sha256={SHA}", json.dumps(options), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sum(out.count("DOWNLOAD") for out, _ in outs) == 1
    assert {out.split()[-1] for out, _ in outs} == {str(cache / f"{SHA}.onnx")}


def test_resolve_model_pins_the_url_for_the_actors(s3, narrow_model, tmp_path, monkeypatch):
    from batchdet.files import sha256_of_file

    monkeypatch.setenv("BATCHDET_MODEL_CACHE", str(tmp_path / "driver-cache"))
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    fs.put(str(narrow_model), f"{bucket}/narrow.onnx")
    sha = sha256_of_file(narrow_model)
    info = resolve_model(f"s3://{bucket}/narrow.onnx", s3.storage_options)
    assert info.path == f"s3://{bucket}/narrow.onnx#sha256={sha}" and info.sha256 == sha
    assert (tmp_path / "driver-cache" / f"{sha}.onnx").is_file()
    # an actor on another node: its own cache, the pinned reference
    other = local_model(info.path, storage_options=s3.storage_options, cache_dir=tmp_path / "node2")
    assert other == tmp_path / "node2" / f"{sha}.onnx"
    # BATCHDET_MODEL may be a URL too
    monkeypatch.setenv("BATCHDET_MODEL", f"s3://{bucket}/narrow.onnx#sha256={sha}")
    assert resolve_model(None, s3.storage_options).path == info.path
    # local models are untouched
    monkeypatch.delenv("BATCHDET_MODEL")
    assert resolve_model(narrow_model).path == str(Path(narrow_model).resolve())


def test_plan_and_actor_stage_use_the_url(s3, narrow_model, tmp_path, monkeypatch):
    """plan_run resolves the URL on the driver; InferenceStage fetches its own copy."""
    from batchdet.files import sha256_of_file
    from batchdet.options import DetectOptions
    from batchdet.pipeline.plan import plan_run
    from batchdet.pipeline.stages import InferenceStage
    from helpers.photos import photo

    fs = s3.filesystem()
    bucket = s3.new_bucket()
    fs.put(str(narrow_model), f"{bucket}/m/narrow.onnx")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(photo("rocket.jpg"))
    monkeypatch.setenv("BATCHDET_MODEL_CACHE", str(tmp_path / "driver"))
    plan = plan_run(DetectOptions({"a": str(tmp_path / "imgs")}, str(tmp_path / "out"),
                                  model=f"s3://{bucket}/m/narrow.onnx", storage_options=s3.storage_options))
    sha = sha256_of_file(narrow_model)
    assert plan.model.path == f"s3://{bucket}/m/narrow.onnx#sha256={sha}" and plan.model.sha256 == sha
    monkeypatch.setenv("BATCHDET_MODEL_CACHE", str(tmp_path / "actor-node"))
    InferenceStage(plan.model.path, plan.run_id, threads=1, storage_options=plan.options.storage_options)
    assert (tmp_path / "actor-node" / f"{sha}.onnx").is_file()
