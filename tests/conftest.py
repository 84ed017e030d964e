"""Shared fixtures: a real S3 endpoint on loopback (moto server mode).

Hermetic: from the start of the run, every cache batchdet (and onnxruntime)
would fill is in a temporary folder; the CLI subprocesses and Ray workers the
tests start inherit that environment. The run errors if it left new files in
the user's cache, the repository or the folder it was started from. A
deprecation warning raised from batchdet's code is an error in those
processes too (see pyproject.toml's filterwarnings for this one).
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest


# --- hermetic --------------------------------------------------------------------------------------
def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _tree(root: Path) -> set[Path]:
    """Every file under ``root``, not descending into VCS, bytecode, pytest's
    own cache, build metadata or virtualenvs."""
    found = set()
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not (d in (".git", "__pycache__", ".pytest_cache") or d.endswith(".egg-info")
                                           or (here / d / "pyvenv.cfg").exists())]
        found.update(here / f for f in files)
    return found


def _top(root: Path) -> set[Path]:
    return set(root.iterdir()) if root.is_dir() else set()


def _outside(cache: Path, repo: Path, cwd: Path) -> set[Path]:
    """What a run must not add to: the user's cache (its top level, and all of
    batchdet's folder there), the repository, and the folder pytest was
    started from (its top level, when that is not inside the repository)."""
    found = _top(cache) | _tree(cache / "batchdet") | _tree(repo)
    return found if cwd.resolve().is_relative_to(repo.resolve()) else found | _top(cwd)


def _deprecations_are_errors_in_children() -> str:
    """PYTHONWARNINGS for subprocesses and Ray workers: a DeprecationWarning or
    FutureWarning raised from batchdet's own code is an error there too (the
    in-process equivalent is filterwarnings in pyproject.toml)."""
    import batchdet

    modules = ["batchdet"] + [m.name for m in pkgutil.walk_packages(batchdet.__path__, "batchdet.")]
    own = [f"error::{category}:{module}" for category in ("DeprecationWarning", "FutureWarning") for module in modules]
    return ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *own]))


def pytest_configure(config):
    """Before any test module is imported: caches into a temporary folder."""
    config._batchdet_watched = (_user_cache(), config.rootpath, Path.cwd())
    config._batchdet_before = _outside(*config._batchdet_watched)
    config._batchdet_tmp = Path(tempfile.mkdtemp(prefix="batchdet-tests-"))
    # $BATCHDET_MODEL, $BATCHDET_MODEL_CACHE, $BATCHDET_ORT_CACHE, ... unset:
    # batchdet's defaults, every one of them under $XDG_CACHE_HOME
    for name in [n for n in os.environ if n.startswith("BATCHDET_") and not n.startswith("BATCHDET_TEST_")]:
        del os.environ[name]
    # no Ray of the caller's: the tests' own (ray_local), which CLI subprocesses join only when given it
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["XDG_CACHE_HOME"] = str(config._batchdet_tmp / "cache")
    os.environ["PYTHONWARNINGS"] = _deprecations_are_errors_in_children()
    # Ray adds a show-once filter for RayDeprecationWarning on import; imported
    # here, that filter lies beneath pyproject's filterwarnings in every test
    # instead of above them in whichever test imports Ray first.
    import ray.util.annotations  # noqa: F401


def pytest_unconfigure(config):
    if getattr(config, "_batchdet_tmp", None):
        shutil.rmtree(config._batchdet_tmp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def nothing_written_outside(request):
    """After the last test: no new file in the user's cache, the current
    directory or the repository (outputs belong in tmp_path)."""
    yield
    new = sorted(map(str, _outside(*request.config._batchdet_watched) - request.config._batchdet_before))
    assert not new, "the tests (or another process meanwhile) wrote outside their temporary folders:\n  " + "\n  ".join(new[:30])


@dataclass
class S3Endpoint:
    """A running moto S3 server and how to talk to it through s3fs."""

    endpoint_url: str

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "key": "testing", "secret": "testing"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def new_bucket(self) -> str:
        """A fresh, empty bucket, so tests never see each other's keys."""
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1 in a process of its own (in this one, its
    request threads would share the GIL with the code under test), stopped at
    the end of the session."""
    import socket
    import urllib.request

    mp = pytest.MonkeyPatch()
    # Credentials and region for every client in this process; a region other
    # than us-east-1 makes CreateBucket demand a location constraint.
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with socket.socket() as probe:  # a free port (moto's server cannot report one it chose)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=tmp_path_factory.mktemp("moto"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's server did not start on {url} (exit {server.poll()})") from None
                time.sleep(0.05)
        yield S3Endpoint(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
        mp.undo()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[str, dict[str, str]]:
    """(output URL, storage options): a local folder, or a prefix in a fresh bucket."""
    if request.param == "local":
        (tmp_path / "out").mkdir()
        return str(tmp_path / "out"), {}
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/out", s3.storage_options


@pytest.fixture(params=["in-process", "ray"])
def execution(request) -> str:
    """Each of detect's execution paths (``--execution``): the tests that hold
    the output contract, hostile files, kills and the watchdog run on both."""
    return request.param


@pytest.fixture(scope="session")
def narrow_model(tmp_path_factory):
    """The narrow stand-in (same graph, channels / 8): fast enough for every test."""
    from batchdet.model.standin import write_standin

    return write_standin(tmp_path_factory.mktemp("models") / "narrow.onnx", seed=0, channels_divisor=8)


@pytest.fixture(scope="session")
def smooth_model(tmp_path_factory):
    """The narrow smooth stand-in: detections stable under noise, for tests where a
    difference of detections must mean a real difference (docs/model.md, "Stand-ins")."""
    from batchdet.model.standin import write_standin

    return write_standin(tmp_path_factory.mktemp("models") / "smooth.onnx", seed=0, channels_divisor=8, smooth=True)


@dataclass
class LocalRay:
    """The session's Ray: its GCS address and the folder holding its sessions (and logs)."""

    address: str
    temp_dir: Path

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment (``base``, default this process's) in which a ``batchdet``
        subprocess joins this Ray through ``RAY_ADDRESS`` instead of starting its own."""
        return {**(os.environ if base is None else base), "RAY_ADDRESS": self.address, **extra}


#: Credentials the session's Ray must not take from this process's environment
#: (the s3 fixture sets them): its workers then hold only what a run hands
#: them, as a CLI's own Ray started without them would.
_AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[LocalRay]:
    """One real local Ray for the whole session, started as batchdet starts its
    embedded one (:func:`batchdet.pipeline.run.local_ray_options`: its node
    settings keep idle workers warm between runs). In-process runs (``detect()``,
    ``main()``) reuse it; CLI subprocesses join it with :meth:`LocalRay.env`.
    Only tests that must kill or own a Ray start another."""
    import ray

    from batchdet.pipeline.run import local_ray_options

    temp_dir = Path(tempfile.mkdtemp(prefix="bdlocal-", dir="/tmp"))  # short: Ray's unix sockets live under it
    saved = {k: os.environ.pop(k) for k in _AWS_CREDENTIALS if k in os.environ}
    try:
        ray.init(num_cpus=2, log_to_driver=False, _temp_dir=str(temp_dir), **local_ray_options())
    finally:
        os.environ.update(saved)
    try:
        yield LocalRay(ray.get_runtime_context().gcs_address, temp_dir)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _shared_cluster(request, s3, tmp_path_factory):
    """The :class:`helpers.ray_cluster.SharedCluster`; the nodes' credentials
    file lies outside the cluster's folder (searched by test_secrets)."""
    from helpers.ray_cluster import NODE_PROFILE, SharedCluster

    credentials = tmp_path_factory.mktemp("aws") / "credentials"
    credentials.write_text(f"[{NODE_PROFILE}]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    shared = SharedCluster(credentials)
    request.config._batchdet_cluster = shared
    yield shared
    shared.stop()
    assert not shared.left, f"processes of the test cluster left running: {shared.left}"


@pytest.fixture(scope="module")
def cluster(_shared_cluster):
    """The session's multi-node Ray cluster (a head and a worker node), whole:
    a worker node an earlier test killed is running again."""
    return _shared_cluster.running()


@pytest.fixture(scope="session")
def cluster_job(_shared_cluster, s3, narrow_model, tmp_path_factory):
    """The session's one ``batchdet submit`` to the shared cluster, finished
    (:func:`helpers.ray_cluster.submit_detect_job`): test_cluster checks its
    rows, test_secrets that the cluster kept none of its secrets."""
    from helpers.ray_cluster import submit_detect_job

    return submit_detect_job(_shared_cluster.running(), s3, narrow_model, tmp_path_factory.mktemp("job"))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``breaks_cluster`` (they kill one of the shared cluster's
    nodes) run after the other tests that use the cluster, which then never
    wait for a node to be started again."""
    breakers = [item for item in items if "cluster" in item.fixturenames and item.get_closest_marker("breaks_cluster")]
    rest = [item for item in items if item not in breakers]
    users = [i for i, item in enumerate(rest) if "cluster" in item.fixturenames]
    if breakers and users:
        items[:] = rest[:users[-1] + 1] + breakers + rest[users[-1] + 1:]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """The shared cluster stops after the last test that uses it, so that the
    rest of the session does not share the CPUs with its idle nodes."""
    yield
    shared = getattr(item.config, "_batchdet_cluster", None)
    if shared is not None and shared.cluster is not None:
        users = [i for i in item.session.items if "cluster" in i.fixturenames]
        if item is users[-1]:
            shared.stop()


N_IMAGES = 30


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """N_IMAGES distinct JPEGs cut from a real photo, and one broken file:
    enough work for a run to be killed half-way."""
    import numpy as np
    from PIL import Image

    from helpers.photos import photo_path

    folder = tmp_path_factory.mktemp("many")
    rgb = np.asarray(Image.open(photo_path("astronaut.png")).convert("RGB"))
    for i in range(N_IMAGES):
        Image.fromarray(rgb[i * 4 : i * 4 + 300, i * 5 : i * 5 + 400]).save(folder / f"img{i:03d}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\x89PNG broken")
    return folder
