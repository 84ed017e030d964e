"""Hostile and odd inputs through the whole pipeline; manifest inputs; secrets
never leak; dataset names cannot escape their partition."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from batchdet.api import detect
from batchdet.cli import main
from batchdet.output.schema import check_dataset_name
from batchdet.pipeline.listing import list_images
from batchdet.pipeline.reading import read_many
from helpers.photos import photo, png_declaring


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def catalogue() -> dict[str, tuple[bytes, tuple[int, int] | str]]:
    """file name → (bytes, expected (width, height) or expected error kind)."""
    rocket = Image.open(io.BytesIO(photo("rocket.jpg")))
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    deep = Image.new("I;16", (50, 40))
    deep.frombytes(np.linspace(0, 65535, 2000).astype("<u2").tobytes())
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "zero.jpg": (b"", "EmptyFile"),
        "truncated.jpg": (photo("rocket.jpg")[:5000], "DecodeError"),
        "text.jpg": (b"just some text, saved as .jpg", "DecodeError"),
        "page.JPG": (b"<!doctype html><html><body>404</body></html>", "DecodeError"),
        "cmyk.jpg": (_enc(Image.new("CMYK", (64, 48), (0, 200, 200, 0)), "JPEG"), (64, 48)),
        "deep16.png": (_enc(deep, "PNG"), (50, 40)),
        "grey.png": (photo("camera.png"), (512, 512)),
        "palette.png": (_enc(pal, "PNG", transparency=0), (30, 20)),
        "animated.gif": (gif.getvalue(), (40, 30)),
        "photo.webp": (_enc(rocket.convert("RGB"), "WEBP"), (640, 427)),
        "photo.tiff": (_enc(rocket.convert("RGB"), "TIFF"), (640, 427)),
        "one.png": (_enc(Image.new("RGB", (1, 1), "white"), "PNG"), (1, 1)),
        "strip.png": (_enc(Image.new("L", (20000, 10), 128), "PNG"), (20000, 10)),
        "rotated.jpg": (_enc(rocket, "JPEG", exif=exif), (427, 640)),
        "bomb.png": (png_declaring(100_000, 100_000), "ImageTooLarge"),
        "with space ünïcødé [1].jpg": (photo("rocket.jpg"), (640, 427)),
    }


def check_catalogue(rows: dict[str, dict], expected: dict[str, tuple[int, int] | str]) -> None:
    assert set(rows) == set(expected)
    for uri, want in expected.items():
        row = rows[uri]
        if isinstance(want, str):
            assert row["status"] == "error" and row["error"].startswith(f"{want}: "), (uri, row["error"])
            assert "\n" not in row["error"] and row["detections"] is None
        else:
            assert row["status"] == "ok", (uri, row["error"])
            assert (row["width"], row["height"]) == want, uri


def read_rows(output: str, storage_options=None) -> dict[str, dict]:
    from batchdet.storage import filesystem

    fs, path = filesystem(output, storage_options)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return {r["uri"]: r for r in table.to_pylist()}


def test_catalogue_local_with_a_file_vanishing_after_listing(ray_local, narrow_model, tmp_path, execution):
    folder = tmp_path / "hostile"
    folder.mkdir()
    expected = {}
    for name, (data, want) in catalogue().items():
        (folder / name).write_bytes(data)
        expected[str(folder / name)] = want
    # listed (by a manifest, as for a bucket too large to list) but gone by the time it is read
    expected[str(folder / "vanished.jpg")] = "ReadError"
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(expected) + "\n")
    result = detect({"hostile": str(manifest)}, str(tmp_path / "out"), model=narrow_model, execution=execution)
    check_catalogue(read_rows(str(tmp_path / "out")), expected)
    counts = result.datasets["hostile"]
    errors = sum(isinstance(w, str) for w in expected.values())
    assert (counts.images, counts.images_ok, counts.images_error) == (len(expected), len(expected) - errors, errors)


def test_catalogue_on_s3_keys_with_spaces_and_non_ascii(ray_local, narrow_model, s3, execution):
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    picked = {k: v for k, v in catalogue().items() if k in ("zero.jpg", "bomb.png", "with space ünïcødé [1].jpg", "page.JPG")}
    for name, (data, _) in picked.items():
        fs.pipe(f"{bucket}/in/{name}", data)
    out = f"s3://{bucket}/out"
    detect({"s3set": f"s3://{bucket}/in"}, out, model=narrow_model, storage_options=s3.storage_options,
           execution=execution)
    check_catalogue(read_rows(out, s3.storage_options), {f"s3://{bucket}/in/{n}": w for n, (_, w) in picked.items()})


def test_manifest_formats_dedupe_and_relative_entries(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    want = [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "s3://bucket/c.png"]
    (tmp_path / "list.txt").write_text(f"# comment\na.jpg\n\n{tmp_path / 'b.jpg'}\na.jpg\ns3://bucket/c.png\n")
    table = pa.table({"uri": ["a.jpg", str(tmp_path / "b.jpg"), "s3://bucket/c.png", "a.jpg"], "other": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "list.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "list.csv")
    for name in ("list.txt", "list.parquet", "list.csv"):
        assert list_images(str(tmp_path / name)).uris == want
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'uri' column"):
        list_images(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no images"):
        list_images(str(tmp_path / "empty.txt"))


def test_duplicate_uris_processed_once(narrow_model, tmp_path):
    (tmp_path / "a.jpg").write_bytes(photo("rocket.jpg"))
    (tmp_path / "list.txt").write_text("a.jpg\na.jpg\n" + str(tmp_path / "a.jpg") + "\n")
    result = detect({"d": str(tmp_path / "list.txt")}, str(tmp_path / "out"), model=narrow_model,
                    execution="in-process")  # the listing drops the duplicates, before either engine
    assert result.datasets["d"].images == 1 and len(read_rows(str(tmp_path / "out"))) == 1


def test_oversized_file_is_not_read_whole(tmp_path):
    (tmp_path / "huge.jpg").write_bytes(b"\xff" * 5000)
    (result,) = read_many([str(tmp_path / "huge.jpg")], max_bytes=1000)
    assert str(result) == "FileTooLarge: larger than the 1,000-byte limit"


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", "-x", "x" * 129, "a b", "", "dataset=x", "ü"])
def test_dataset_names_cannot_escape_their_partition(name, tmp_path, capsys):
    with pytest.raises(ValueError, match="bad dataset name"):
        check_dataset_name(name)
    if "=" not in name:  # NAME=URL splits at the first "=", so the CLI cannot even express such a name
        assert main(["detect", f"--dataset={name}=/tmp", "--output", str(tmp_path)]) == 2
        assert "bad dataset name" in capsys.readouterr().err


def test_no_secret_in_logs_rows_or_manifest(s3, narrow_model, ray_local):
    """Credentials given as storage options appear nowhere: not in the CLI's
    output, the Ray logs, the Parquet rows or the manifest. The CLI joins
    ray_local, whose workers have no credentials of their own: the run's
    reads and writes can only use the ones given, and all of Ray's logs
    (this run's driver and workers among them) are under its folder."""
    key, secret = "AKIAQUITEUNIQUEKEY77", "s3cr3t-value/that+must+never+leak"
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    fs.pipe(f"{bucket}/in/a.jpg", photo("rocket.jpg"))
    fs.pipe(f"{bucket}/in/bad.jpg", b"not an image")
    fs.pipe(f"{bucket}/in/zero.jpg", b"")
    env = ray_local.env({k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "batchdet.cli", "detect", "--dataset", f"d=s3://{bucket}/in",
         "--output", f"s3://{bucket}/out", "--model", str(narrow_model),
         "--storage-option", f"endpoint_url={s3.endpoint_url}",
         "--storage-option", f"key={key}", "--storage-option", f"secret={secret}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    haystacks = {"stdout": proc.stdout, "stderr": proc.stderr}
    for path in fs.find(f"{bucket}/out"):
        haystacks[path] = fs.cat(path).decode("latin-1")
    ray_tmp = ray_local.temp_dir
    logs = list(ray_tmp.rglob("*.log")) + list(ray_tmp.rglob("*.out")) + list(ray_tmp.rglob("*.err"))
    assert [p for p in logs if p.name.startswith("python-core-driver-") and p.stat().st_mtime > started], \
        "no Ray logs of this run's driver found to search"
    # and the log file the CLI sends everything it does not show to
    logs += [Path(line.split("log: ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("  log: ")]
    assert logs[-1].name.endswith(".log") and logs[-1].parent.name == "batchdet-logs", proc.stdout
    for log in logs:
        haystacks[str(log)] = log.read_text(errors="replace")
    for where, text in haystacks.items():
        assert key not in text and secret not in text, f"secret leaked into {where}"
    rows = {r["uri"].rsplit("/", 1)[1]: r["status"] for r in pads.dataset(
        f"{bucket}/out", filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()}
    assert rows == {"a.jpg": "ok", "bad.jpg": "error", "zero.jpg": "error"}  # read and written with the given keys
    manifests = [p for p in fs.find(f"{bucket}/out/_runs") if p.endswith(".json")]
    manifest = json.loads(fs.cat(manifests[0]))
    assert manifest["arguments"]["storage_options"]["secret"] == "***"
    assert len(manifest["model"]["sha256"]) == 64
