"""The in-process engine's own decisions: which runs it takes, how it lays out
sessions, and that a failure in one of its threads stops the others. (Its
results, kills, stalls and errors are held by the tests parametrised over
``execution``.)"""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from batchdet.options import DetectOptions
from batchdet.pipeline import in_process
from batchdet.pipeline.in_process import MAX_IN_PROCESS_IMAGES, choose_execution, layout
from batchdet.pipeline.plan import new_run_id


def test_sessions_share_the_cpus_and_never_outnumber_the_images():
    assert layout(1, 2, None, None, 0) == (1, 2)  # one image: one session with every CPU
    assert layout(24, 2, None, None, 0) == (2, 1)  # as the Ray job's actors: one 1-thread session per CPU
    assert layout(3, 8, None, None, 0) == (3, 2)
    assert layout(24, 8, 4, None, 0) == (2, 4)  # --threads-per-actor 4
    assert layout(24, 8, None, 1, 0) == (1, 8)  # --actors 1
    assert layout(24, 8, None, None, 1.0) == (1, 4)  # a GPU: one session, up to 4 CPUs feeding it


@pytest.fixture
def no_ray_joined(monkeypatch):
    """This process as a user's would be: no Ray joined, no $RAY_ADDRESS (the suite's own Ray aside)."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _options(**kw) -> DetectOptions:
    return DetectOptions({"d": "/data"}, "/out", **kw)


def test_auto_runs_a_small_local_set_here_and_anything_that_may_grow_on_ray(no_ray_joined, monkeypatch):
    assert choose_execution(_options(), 1) == "in-process"
    assert choose_execution(_options(), MAX_IN_PROCESS_IMAGES) == "in-process"
    assert choose_execution(_options(), MAX_IN_PROCESS_IMAGES + 1) == "ray"
    assert f"up to {MAX_IN_PROCESS_IMAGES} images" in DetectOptions.__dataclass_fields__["execution"].metadata["help"]
    assert choose_execution(_options(address="ray://head:10001"), 1) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert choose_execution(_options(), 1) == "ray"
    assert choose_execution(_options(execution="in-process"), 10**6) == "in-process"  # forced either way
    monkeypatch.delenv("RAY_ADDRESS")
    assert choose_execution(_options(execution="ray"), 1) == "ray"
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the caller's own Ray: its cluster, its choice
    assert choose_execution(_options(), 1) == "ray"


def test_a_pixel_limit_above_the_callers_pillow_guard_goes_to_ray_or_is_refused(no_ray_joined, monkeypatch):
    """In the caller's process Pillow's guard stays as it is; rows must not
    depend on where they ran, so a larger --max-pixels runs where the guard is ours."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)  # Pillow refuses above twice this
    assert choose_execution(_options(max_pixels=100_000_000), 1) == "in-process"
    assert choose_execution(_options(max_pixels=100_000_001), 1) == "ray"
    with pytest.raises(ValueError, match=r"--max-pixels 100,000,001 exceeds Pillow's limit of 100,000,000"):
        choose_execution(_options(max_pixels=100_000_001, execution="in-process"), 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the guard switched off: no limit of its own
    assert choose_execution(_options(max_pixels=10**12, execution="in-process"), 1) == "in-process"


def test_a_threads_error_stops_the_others_and_puts_return_false_after():
    import queue

    run = in_process._Threads()
    q: queue.Queue = queue.Queue(maxsize=1)
    seen = []

    def fails() -> None:
        raise OSError(28, "No space left on device")

    def waits() -> None:
        seen.append(run.get(q))  # None once the run stops

    run.start("inference-0", waits)
    run.start("inference-1", fails)
    deadline = time.monotonic() + 5
    while run.alive():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert run.stop.is_set() and seen == [None] and isinstance(run.errors[0], OSError)
    assert run.put(q, "block") is False


def test_close_waits_for_inference_threads_until_the_deadline_and_never_for_the_reader():
    run = in_process._Threads()
    release = threading.Event()
    run.start("read", lambda: release.wait(30))  # a read stuck in the kernel
    run.start("inference-0", lambda: time.sleep(0.3))  # finishing its block
    start = time.monotonic()
    run.close(time.monotonic() + 5)
    assert 0.25 < time.monotonic() - start < 3 and not run.threads["inference-0"].is_alive()
    assert run.threads["read"].is_alive()
    release.set()


def test_run_ids_sort_by_their_start_to_the_millisecond():
    """An image's latest row is the one of the greatest run_id: two in-process
    runs of a few images each begin within the same second."""
    first, second = new_run_id(1796397589.572), new_run_id(1796397589.573)
    assert first.startswith("20261204T151949572Z-") and first < second
    assert new_run_id(1796397589.999) < new_run_id(1796397590.0)
