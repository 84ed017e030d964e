"""Shared fixtures: a real S3 endpoint on loopback (moto server mode)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest


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
def s3() -> S3Endpoint:
    """moto's ThreadedMotoServer on 127.0.0.1, stopped at the end of the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    mp = pytest.MonkeyPatch()
    # Credentials and region for every client in this process; a region other
    # than us-east-1 makes CreateBucket demand a location constraint.
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield S3Endpoint(f"http://127.0.0.1:{server._server.server_port}")
    finally:
        server.stop()
        mp.undo()


@pytest.fixture(scope="session")
def narrow_model(tmp_path_factory):
    """The narrow stand-in (same graph, channels / 8): fast enough for every test."""
    from batchdet.standin import write_standin

    return write_standin(tmp_path_factory.mktemp("models") / "narrow.onnx", seed=0, channels_divisor=8)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the in-process pipeline tests (detect() reuses it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


N_IMAGES = 30


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """N_IMAGES distinct JPEGs cut from a real photo, and one broken file:
    enough work for a run to be killed half-way."""
    import numpy as np
    from PIL import Image

    from photos import photo_path

    folder = tmp_path_factory.mktemp("many")
    rgb = np.asarray(Image.open(photo_path("astronaut.png")).convert("RGB"))
    for i in range(N_IMAGES):
        Image.fromarray(rgb[i * 4 : i * 4 + 300, i * 5 : i * 5 + 400]).save(folder / f"img{i:03d}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\x89PNG broken")
    return folder
