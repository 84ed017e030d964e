"""Flaky object storage: transient failures are retried, permanent ones are
clear error rows or a clear refusal. Through a fault-injecting proxy in front
of a real S3 endpoint, both on 127.0.0.1."""

from __future__ import annotations

import pyarrow.dataset as pads

from batchdet.api import detect
from batchdet.cli import main
from batchdet.storage import filesystem
from helpers.faulty_proxy import FAULTS, FaultyProxy
from helpers.photos import photo

GOOD = ["rocket.jpg", "chelsea.png", "astronaut.png", "coffee.png", "camera.png", "ihc.png"]


def test_transient_faults_retried_permanent_ones_reported(narrow_model, s3):
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    for name in GOOD:
        fs.pipe(f"{bucket}/in/{name}", photo(name))
    fs.pipe(f"{bucket}/in/forbidden.jpg", photo("rocket.jpg"))
    with FaultyProxy(s3.endpoint_url, every=5) as proxy:
        options = {**s3.storage_options, "endpoint_url": proxy.url}
        result = detect({"flaky": f"s3://{bucket}/in"}, f"s3://{bucket}/out", model=narrow_model,
                        storage_options=options, batch_size=2,
                        execution="in-process")  # the same reads and writes as Ray's tasks, none of Ray's start
    # every kind of fault was injected, on reads and on writes
    kinds = {kind for kind, _ in proxy.faults}
    methods = {method for _, method in proxy.faults}
    assert kinds == set(FAULTS) and {"GET", "PUT"} <= methods, proxy.faults
    assert sum(proxy.faults.values()) >= 10
    counts = result.datasets["flaky"]
    assert (counts.images, counts.images_ok, counts.images_error) == (len(GOOD) + 1, len(GOOD), 1)
    out_fs, path = filesystem(f"s3://{bucket}/out", s3.storage_options)
    rows = {r["uri"]: r for r in pads.dataset(path, filesystem=out_fs, format="parquet",
                                              partitioning="hive").to_table().to_pylist()}
    assert len(rows) == len(GOOD) + 1
    assert all(rows[f"s3://{bucket}/in/{n}"]["status"] == "ok" for n in GOOD)
    assert rows[f"s3://{bucket}/in/forbidden.jpg"]["error"].startswith("ReadError: access denied")


def test_permanent_listing_failure_is_one_clear_line(narrow_model, s3, tmp_path, capsys):
    bucket = s3.new_bucket()
    with FaultyProxy(s3.endpoint_url, every=10**9) as proxy:
        argv = ["detect", "--dataset", f"x=s3://{bucket}/forbidden/", "--output", str(tmp_path / "out"),
                "--model", str(narrow_model), "--storage-option", f"endpoint_url={proxy.url}"]
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchdet: error: cannot list") and "PermissionError: Access Denied" in err and "\n" not in err
