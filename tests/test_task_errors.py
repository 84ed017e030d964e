"""A task that fails inside Ray reaches the user as its cause, in one line:
the disk filling up, the store refusing a write, the output bucket vanishing
mid-run, each through the CLI (issue 22, item 2), on each execution path."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from batchdet.cli import main
from helpers.faulty_proxy import FaultyProxy
from helpers.photos import photo

IMAGES = ("rocket.jpg", "chelsea.png", "coffee.png", "astronaut.png")


def _inputs(folder: Path) -> Path:
    folder.mkdir()
    for name in IMAGES:
        (folder / name).write_bytes(photo(name))
    return folder


def _error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("batchdet: error:")]
    assert "\x1b" not in line and "ray::" not in line and "RayTaskError" not in line, line
    return line


@contextlib.contextmanager
def _small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` at ``folder`` (needs root, as CI and this project's machines are)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_disk_full_is_its_cause_in_one_line(narrow_model, tmp_path, ray_local, capsys, execution):
    images = _inputs(tmp_path / "in")
    with _small_disk(tmp_path / "disk", "24k") as disk:
        argv = ["detect", "--dataset", f"x={images}", "--output", str(disk / "out"), "--model", str(narrow_model),
                "--rows-per-file", "1", "--batch-size", "1", "--execution", execution]
        capsys.readouterr()
        assert main(argv) == 2
        line = _error_line(capsys.readouterr().err)
        assert line.startswith("batchdet: error: OSError: [Errno 28] No space left on device"), line


def _refusing(s3, tmp_path, capsys, narrow_model, execution: str, status: int, code: str, message: str) -> str:
    """Run detect on S3 with every staged data file's PUT refused; the CLI's error line."""
    bucket = s3.new_bucket()
    images = _inputs(tmp_path / "in")
    refuse = lambda method, path: (status, code, message) if method == "PUT" and "/_staging/" in path \
        and path.split("?")[0].endswith(".parquet") else None  # noqa: E731
    with FaultyProxy(s3.endpoint_url, every=10**9, refuse=refuse) as proxy:
        argv = ["detect", "--dataset", f"x={images}", "--output", f"s3://{bucket}/out", "--model", str(narrow_model),
                "--execution", execution, *[f"--storage-option={k}={v}" for k, v in {**s3.storage_options, "endpoint_url": proxy.url}.items()]]
        capsys.readouterr()
        assert main(argv) == 2
    return _error_line(capsys.readouterr().err)


def test_a_refused_write_is_its_cause_in_one_line(narrow_model, s3, tmp_path, ray_local, capsys, execution):
    line = _refusing(s3, tmp_path, capsys, narrow_model, execution, 403, "AccessDenied", "Access Denied")
    assert line.startswith("batchdet: error: PermissionError: Access Denied"), line


def test_a_vanished_output_bucket_is_its_cause_in_one_line(narrow_model, s3, tmp_path, ray_local, capsys,
                                                          execution):
    line = _refusing(s3, tmp_path, capsys, narrow_model, execution, 404, "NoSuchBucket", "The specified bucket does not exist")
    assert line.startswith("batchdet: error: FileNotFoundError:") and "bucket does not exist" in line, line
