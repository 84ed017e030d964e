"""Where bytes live: fsspec filesystems for local paths, file://, s3:// and the rest.

Every stage that touches storage (listing, reading, writing, querying) gets
its filesystem here, so credentials and endpoints are handled in one place:
s3fs takes them from the standard AWS chain (environment, profile, instance
role, ``AWS_ENDPOINT_URL``) unless ``--storage-option`` says otherwise.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import fsspec
from fsspec.core import url_to_fs

#: storage-option keys whose values are secrets (never logged, written or sent to a cluster).
SECRET_KEYS = frozenset(
    {"key", "secret", "token", "password", "session_token", "aws_access_key_id",
     "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
     "client_secret", "connection_string", "credential"}
)
REDACTED = "***"

#: Retries for S3 unless the user configures their own: botocore's "standard"
#: mode retries 500/502/503/504, SlowDown/throttling and dropped connections
#: with exponential backoff and jitter; s3fs adds its own retries on top.
S3_RETRIES = {"retries": {"max_attempts": 10, "mode": "standard"}}


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://…", "anon=true"]`` → ``{"endpoint_url": "http://…", "anon": True}``.

    ``true``/``false`` become booleans because s3fs's ``anon`` and
    ``requester_pays`` are flags; everything else stays a string.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bad --storage-option {item!r}: expected KEY=VALUE")
        lowered = value.lower()
        options[key] = True if lowered == "true" else False if lowered == "false" else value
    return options


def is_secret_name(name: str) -> bool:
    """Whether a storage option, environment variable or URL query parameter
    called ``name`` holds a secret: one of :data:`SECRET_KEYS`, in any case, or
    ending in ``_`` and one of them, because that is how the same credentials
    are named elsewhere (``AWS_SECRET_ACCESS_KEY``, ``AZURE_STORAGE_ACCOUNT_KEY``,
    ``HF_TOKEN``)."""
    lowered = name.lower()
    return lowered in SECRET_KEYS or any(lowered.endswith(f"_{key}") for key in SECRET_KEYS)


def url_secret(url: str) -> str | None:
    """What in ``url`` is a credential — a password in ``user:pass@host`` or a
    query parameter named like a secret (``?token=…``) — or None. fsspec and
    HTTP clients use both, so such a URL is a secret wherever it is stored.
    Local paths have none."""
    if "://" not in url:
        return None
    parts = urlsplit(url)
    if parts.password is not None:
        return "a password (user:password@host)"
    named = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True) if is_secret_name(name)]
    return f"the query parameter {named[0]!r}" if named else None


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` safe to print or write into a manifest."""
    return {k: (REDACTED if is_secret_name(k) else v) for k, v in options.items()}


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URL or local path.

    s3fs's ``endpoint_url`` storage option is passed through as given; local
    paths come back absolute so URIs in the output are unambiguous.
    """
    options = dict(storage_options or {})
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    if url.startswith(("s3://", "s3a://")) and "config_kwargs" not in options:
        options["config_kwargs"] = S3_RETRIES
    fs, path = url_to_fs(url, **options)
    return fs, path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI users see: ``s3://bucket/key`` for remote files, an absolute path for local ones."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
