"""Listing a dataset folder by sub-folder, several at once, with progress:
the same files as one serial ``find``, locally and on the S3 test endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from batchdet.pipeline.listing import find_files, list_images
from tests.helpers.benchmarks import run_script


def _tree(root: Path) -> None:
    """3 folders of 5 sub-folders of 4 images, one image at the top, an empty folder and a non-image."""
    for a in range(3):
        for b in range(5):
            folder = root / f"a{a}" / f"b{b}"
            folder.mkdir(parents=True)
            for c in range(4):
                (folder / f"{c}.jpg").write_bytes(b"x")
    (root / "top.jpg").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    (root / "empty").mkdir()


@pytest.mark.parametrize("workers,depth", [(1, 3), (2, 3), (4, 1), (16, 3), (100, 2)])
def test_by_prefix_finds_what_one_find_finds(tmp_path, workers, depth):
    _tree(tmp_path)
    fs = fsspec.filesystem("file")
    seen: list[int] = []
    files = find_files(fs, str(tmp_path), workers=workers, depth=depth, on_progress=seen.append)
    assert sorted(files) == sorted(fs.find(str(tmp_path))) and len(files) == 62
    assert seen == sorted(seen) and seen[-1] == 62  # counts only grow, and end at the total


def test_list_images_on_s3_by_prefix_with_progress(s3):
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    keys = [f"{bucket}/in/{a:02d}/{b}/img{i}.jpg" for a in range(20) for b in range(2) for i in range(2)]
    fs.pipe({key: b"x" for key in keys + [f"{bucket}/in/readme.md", f"{bucket}/in/top.png"]})
    seen: list[int] = []
    listing = list_images(f"s3://{bucket}/in", s3.storage_options, on_progress=seen.append)
    assert listing.uris == sorted(f"s3://{k}" for k in keys + [f"{bucket}/in/top.png"])
    assert listing.skipped == 1
    assert len(seen) >= 20 and seen[-1] == len(keys) + 2  # a report per prefix, files counted before filtering


@pytest.mark.bench
def test_listing_benchmark_times_both_ways_over_http(tmp_path):
    out = tmp_path / "listing.json"
    stdout = run_script("listing", "--sizes", "2500", "--latency-ms", "20", "--json", str(out), timeout=300)
    (r,) = json.loads(out.read_text())["results"]
    assert r["n"] == 2500 and r["latency_ms"] == 20
    for way in ("serial", "by_prefix"):  # the script checks it listed every key once
        assert r[way]["keys_per_s"] == pytest.approx(2500 / r[way]["seconds"], rel=0.01)  # seconds are rounded
    assert r["serial"]["progress_reports"] == 1 and r["by_prefix"]["progress_reports"] == 1 + 3  # root, then 3 prefixes
    assert r["speedup"] == pytest.approx(r["serial"]["seconds"] / r["by_prefix"]["seconds"], abs=0.01)
    row = next(line for line in stdout.splitlines() if line.split()[:2] == ["2500", "20"])
    assert f"{r['speedup']:.2f}x" in row


def test_a_second_listing_sees_the_store_as_it_is_now(s3):
    """fsspec keeps each filesystem, and its directory listings, for the life
    of the process (per thread): a second listing must see a re-uploaded
    object's new size and ETag, or --resume would keep its stale row."""
    from batchdet.storage import filesystem

    writer = s3.filesystem()  # another client, as another machine uploading
    bucket = s3.new_bucket()
    writer.pipe(f"{bucket}/in/a.jpg", b"first version")
    first = list_images(f"s3://{bucket}/in/", s3.storage_options)
    shared, _ = filesystem(f"s3://{bucket}/in/", s3.storage_options)
    assert shared is filesystem(f"s3://{bucket}/in/", s3.storage_options)[0]  # the premise: one cached client
    assert [e["size"] for e in shared.ls(f"{bucket}/in", detail=True)] == [13]  # its listing cached
    writer.pipe(f"{bucket}/in/a.jpg", b"the second, longer version")
    writer.pipe(f"{bucket}/in/b.jpg", b"new")
    second = list_images(f"s3://{bucket}/in/", s3.storage_options)
    assert first.sizes == [13] and second.sizes == [26, 3]
    etag = writer.info(f"{bucket}/in/a.jpg")["ETag"].strip('"')
    assert second.versions[0] == f"ETag:{etag}" != first.versions[0]
