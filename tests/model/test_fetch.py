"""fetch_model against a real HTTP server on 127.0.0.1, and model path resolution.

The server serves a random payload standing in for the 80 MB official file;
tests pass that payload's sha256 and size. "Nothing left behind" means the
destination directory holds exactly what it held before the call.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from batchdet.model import fetch
from batchdet.model.fetch import FetchError, default_model_path, fetch_model, resolve_model_path
from batchdet.model.spec import OFFICIAL_NAME

PAYLOAD = os.urandom(300 * 1024 + 17)  # odd size catches off-by-ones
SHA = hashlib.sha256(PAYLOAD).hexdigest()
SIZE = len(PAYLOAD)


@dataclass
class Server:
    base: str
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """urllib honours *_proxy variables; loopback traffic must not go through one."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    """ThreadingHTTPServer on an ephemeral 127.0.0.1 port.

    /model.onnx  the payload; /cut.onnx  Content-Length of the payload, then
    half of it and a closed connection; /nolength.onnx  the payload without a
    Content-Length; anything else 404.
    """
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            seen.append(self.path)
            if self.path == "/model.onnx":
                self.send_response(200)
                self.send_header("Content-Length", str(SIZE))
                self.end_headers()
                self.wfile.write(PAYLOAD)
            elif self.path == "/cut.onnx":
                self.send_response(200)
                self.send_header("Content-Length", str(SIZE))
                self.end_headers()
                self.wfile.write(PAYLOAD[: SIZE // 2])
                self.wfile.flush()
                self.close_connection = True
            elif self.path == "/nolength.onnx":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(PAYLOAD)
                self.close_connection = True
            else:
                self.send_error(404)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_url() -> str:
    """A URL on a 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/model.onnx"


def _fetch(url: str, dest: Path, **kw) -> Path:
    kw.setdefault("sha256", SHA)
    kw.setdefault("size", SIZE)
    kw.setdefault("timeout", 10)
    return fetch_model(url, to=dest, **kw)


def _assert_nothing_left(directory: Path, expected: set[str] = frozenset()) -> None:
    assert {p.name for p in directory.iterdir()} == set(expected)


# --- downloads ---------------------------------------------------------------


def test_good_download_lands_atomically(server, tmp_path):
    dest = tmp_path / "deep" / "er" / "m.onnx"  # parents are created
    assert _fetch(server.url("/model.onnx"), dest) == dest
    assert dest.read_bytes() == PAYLOAD
    _assert_nothing_left(dest.parent, {"m.onnx"})


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(PAYLOAD)
    before = dest.stat().st_mtime_ns
    assert _fetch(server.url("/model.onnx"), dest) == dest
    assert server.requests == []
    assert dest.stat().st_mtime_ns == before


def test_existing_wrong_file_is_replaced(server, tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"<html>proxy error</html>")
    _fetch(server.url("/model.onnx"), dest)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == ["/model.onnx"]
    _assert_nothing_left(tmp_path, {"m.onnx"})


def test_directory_destination_uses_official_name(server, tmp_path):
    assert _fetch(server.url("/model.onnx"), tmp_path) == tmp_path / OFFICIAL_NAME
    assert (tmp_path / OFFICIAL_NAME).read_bytes() == PAYLOAD


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    dest = tmp_path / "m.onnx"
    with pytest.raises(FetchError, match="sha256 mismatch") as err:
        _fetch(server.url("/model.onnx"), dest, sha256="0" * 64)
    assert SHA in str(err.value) and "\n" not in str(err.value)
    _assert_nothing_left(tmp_path)


def test_wrong_checksum_keeps_existing_file_untouched(server, tmp_path):
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"old")
    with pytest.raises(FetchError, match="sha256"):
        _fetch(server.url("/model.onnx"), dest, sha256="0" * 64, size=None)
    assert dest.read_bytes() == b"old"
    _assert_nothing_left(tmp_path, {"m.onnx"})


def test_cut_off_transfer_is_detected(server, tmp_path):
    dest = tmp_path / "m.onnx"
    # size=None: only Content-Length can tell the transfer was cut short.
    with pytest.raises(FetchError, match=rf"cut off after {SIZE // 2} of {SIZE} bytes"):
        _fetch(server.url("/cut.onnx"), dest, size=None)
    _assert_nothing_left(tmp_path)


def test_short_body_without_content_length_fails_on_size(server, tmp_path):
    dest = tmp_path / "m.onnx"
    with pytest.raises(FetchError, match=rf"cut off after {SIZE} of {SIZE + 1} bytes"):
        _fetch(server.url("/nolength.onnx"), dest, size=SIZE + 1)
    _assert_nothing_left(tmp_path)


def test_no_content_length_still_works(server, tmp_path):
    dest = tmp_path / "m.onnx"
    _fetch(server.url("/nolength.onnx"), dest)
    assert dest.read_bytes() == PAYLOAD


def test_announced_size_mismatch_fails_before_download(server, tmp_path):
    with pytest.raises(FetchError, match=rf"is {SIZE} bytes, expected {SIZE - 1}"):
        _fetch(server.url("/model.onnx"), tmp_path / "m.onnx", size=SIZE - 1)
    _assert_nothing_left(tmp_path)


def test_http_404(server, tmp_path):
    with pytest.raises(FetchError, match="HTTP 404 for http://127.0.0.1"):
        _fetch(server.url("/missing.onnx"), tmp_path / "m.onnx")
    _assert_nothing_left(tmp_path)


def test_unreachable_port(closed_url, tmp_path):
    with pytest.raises(FetchError, match=f"cannot reach {closed_url}"):
        _fetch(closed_url, tmp_path / "m.onnx", timeout=5)
    _assert_nothing_left(tmp_path)


def test_unsupported_scheme(tmp_path):
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        _fetch("ftp://example.invalid/m.onnx", tmp_path / "m.onnx")


def test_progress_reports_increasing_counts(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CHUNK", 64 * 1024)  # several chunks for a 300 KB payload
    calls: list[tuple[int, int | None]] = []
    _fetch(server.url("/model.onnx"), tmp_path / "m.onnx", progress=lambda n, total: calls.append((n, total)))
    counts = [n for n, _ in calls]
    assert len(counts) >= 5 and counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] == SIZE
    assert {total for _, total in calls} == {SIZE}


def test_failing_progress_callback_leaves_nothing(server, tmp_path):
    def boom(n, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fetch(server.url("/model.onnx"), tmp_path / "m.onnx", progress=boom)
    _assert_nothing_left(tmp_path)


# --- air-gapped copies ------------------------------------------------------


def test_file_url_and_plain_path(tmp_path):
    src = tmp_path / "src" / "copy.onnx"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    out = tmp_path / "out"
    assert _fetch(src.as_uri(), out / "a.onnx").read_bytes() == PAYLOAD
    assert _fetch(str(src), out / "b.onnx").read_bytes() == PAYLOAD
    _assert_nothing_left(out, {"a.onnx", "b.onnx"})


def test_missing_local_file(tmp_path):
    with pytest.raises(FetchError, match="cannot reach"):
        _fetch(str(tmp_path / "nope.onnx"), tmp_path / "m.onnx")
    _assert_nothing_left(tmp_path)


# --- official URL and mirror --------------------------------------------------


def test_default_url_falls_back_to_mirror(server, closed_url, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "OFFICIAL_URL", closed_url)
    monkeypatch.setattr(fetch, "MIRROR_URL", server.url("/model.onnx"))
    dest = fetch_model(to=tmp_path / "m.onnx", sha256=SHA, size=SIZE, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == ["/model.onnx"]


def test_both_sources_failing_names_both(server, closed_url, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "OFFICIAL_URL", closed_url)
    monkeypatch.setattr(fetch, "MIRROR_URL", server.url("/missing.onnx"))
    with pytest.raises(FetchError, match="cannot reach .*; mirror also failed: HTTP 404"):
        fetch_model(to=tmp_path / "m.onnx", sha256=SHA, size=SIZE, timeout=5)
    _assert_nothing_left(tmp_path)


def test_explicit_url_does_not_fall_back(server, closed_url, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "MIRROR_URL", server.url("/model.onnx"))
    with pytest.raises(FetchError, match="cannot reach"):
        _fetch(closed_url, tmp_path / "m.onnx", timeout=5)
    assert server.requests == []


# --- which model file to use ----------------------------------------------------


def test_default_model_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model_path() == tmp_path / "batchdet" / "resnet34-ssd1200.onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_path() == tmp_path / "home" / ".cache" / "batchdet" / "resnet34-ssd1200.onnx"


def test_resolve_model_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BATCHDET_MODEL", raising=False)
    default = tmp_path / "cache" / "batchdet" / "resnet34-ssd1200.onnx"
    assert resolve_model_path() == default
    monkeypatch.setenv("BATCHDET_MODEL", str(tmp_path / "env.onnx"))
    assert resolve_model_path() == tmp_path / "env.onnx"
    assert resolve_model_path(str(tmp_path / "arg.onnx")) == tmp_path / "arg.onnx"
    assert resolve_model_path(tmp_path / "arg.onnx") == tmp_path / "arg.onnx"  # PathLike too
    monkeypatch.setenv("BATCHDET_MODEL", "")  # empty counts as unset
    assert resolve_model_path() == default
