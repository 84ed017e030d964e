"""``batchdet submit``: run ``detect`` on a Ray cluster through the Jobs API.

::

    batchdet submit --address http://HEAD:8265 [--no-wait] [--config FILE] -- <detect arguments>

Before anything is sent the detect arguments and the config file are parsed
and validated here, merged (flags override the file) and written as one job
spec, so a typo fails in a second on the laptop, not minutes into a cluster
job. The job then runs ``python -m batchdet.cluster.job --config batchdet-job.yaml``
on the cluster with this runtime environment:

* ``py_modules``: this machine's ``batchdet`` package directory, uploaded by
  Ray and put first on every worker's ``PYTHONPATH`` — the cluster runs the
  code you submit from, whether or not its image has batchdet;
* ``working_dir``: a temporary directory holding only the job spec;
* ``pip`` (only with ``--pip-deps``): batchdet's dependencies, for clusters
  whose image lacks them (the image in ``infra/docker`` has them);
* ``--runtime-env FILE`` is merged over all of that.

Authentication: the Ray token is read the way Ray reads it — ``$RAY_AUTH_TOKEN``,
else the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` — and sent
as ``Authorization: Bearer …`` on every request (also without
``RAY_AUTH_MODE=token`` in this shell). It is never printed, logged, or put
into the job's runtime environment. A cluster whose dashboard answers without
a token is refused unless ``--insecure`` is given.

Secrets stay on this machine: everything submitted is kept by the cluster —
the working_dir package in Ray's GCS and unpacked on every node, the runtime
environment, entrypoint and metadata in the job's record — and the Jobs API
has no channel that is not. So storage options that are secrets (see
:func:`batchdet.storage.is_secret_name`), URLs holding credentials and
secret environment variables in ``--runtime-env`` are refused with one line,
before any request; the nodes bring their own credentials.

The exit status is the job's: 0 only when it SUCCEEDED. ``--no-wait`` prints
the submission id and returns at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import batchdet
from batchdet.errors import one_line

JOB_CONFIG_NAME = "batchdet-job.yaml"
ENTRYPOINT = f"python -m batchdet.cluster.job --config {JOB_CONFIG_NAME}"
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
#: Seconds to wait for a final status once the log stream has closed.
STATUS_TIMEOUT_S = 60.0
#: Where a refused secret should come from instead; ends every such refusal.
NODE_CREDENTIALS = ("the cluster keeps everything submitted (Ray's GCS, every node's disk), so give its nodes their "
                    "own credentials: an instance profile (IRSA on EKS), environment variables from a Kubernetes "
                    "Secret, or the nodes' AWS config/credentials files (see README, 'Running on a cluster')")


class SubmitError(ValueError):
    """Submission failed before the job ran; the one-line message says why."""


# --- the token ----------------------------------------------------------------------
def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def resolve_token(environ: dict[str, str] | None = None) -> str | None:
    """The Ray auth token, in Ray's order: ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH`` (an error if unreadable or empty, as in Ray),
    ``~/.ray/auth_token``; None when there is none."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = env.get(TOKEN_PATH_ENV)
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"cannot read the Ray token file ${TOKEN_PATH_ENV}={path}: {e.strerror or e}") from None
        if not token:
            raise SubmitError(f"the Ray token file ${TOKEN_PATH_ENV}={path} is empty")
        return token
    try:
        return default_token_path().read_text().strip() or None
    except OSError:
        return None


def auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- the address ------------------------------------------------------------------
def check_address(address: str | None) -> str:
    """``http(s)://HOST:PORT`` of the cluster's dashboard (Jobs API)."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise SubmitError(f"no --address: give the dashboard URL, e.g. http://HEAD:8265 (or set ${ADDRESS_ENV})")
    address = address.rstrip("/")
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(f"--address {address!r} must be the dashboard URL, e.g. http://HEAD:8265")
    if parts.username or parts.password:
        raise SubmitError("--address must not hold credentials; the Ray token comes from $RAY_AUTH_TOKEN or a file")
    return address


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_auth(address: str, timeout: float = 10.0) -> None:
    """Refuse a cluster whose Jobs API answers a request that carries no token."""
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            return  # token authentication is on
        return  # something else: the Jobs client reports it properly
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {reason}") from None
    raise SubmitError(
        f"the Ray cluster at {address} runs jobs for anyone who can reach it (no token authentication); "
        "start it with RAY_AUTH_MODE=token (see README, 'Running on a cluster') or pass --insecure"
    )


# --- the job ----------------------------------------------------------------------
def requirements() -> list[str]:
    """batchdet's own dependencies (not ray: the cluster has it), for ``--pip-deps``."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("batchdet") or []
    except PackageNotFoundError:
        return []
    out = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        name = spec.strip().split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
        if "extra" in marker or name == "ray":
            continue
        out.append(spec.strip())
    return out


def job_config(detect_args: list[str], config: str | None = None) -> dict[str, Any]:
    """Parse and check ``detect`` arguments (plus ``--config``) exactly as
    ``batchdet detect`` would; return the merged job spec (options that differ from their defaults)."""
    from batchdet.config import add_detect_arguments, options_from_args

    args = list(detect_args)
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["detect"]:
        args = args[1:]
    if "--config" in args and config:
        raise SubmitError("--config given twice (before and after --)")
    if config:
        args += ["--config", config]
    parser = argparse.ArgumentParser(prog="batchdet detect")
    add_detect_arguments(parser)
    options = options_from_args(parser.parse_args(args))
    if options.address:
        raise SubmitError("--address is not a detect argument here: the job joins the cluster it is submitted to")
    return options.to_spec()


def refuse_secrets(config: dict[str, Any]) -> None:
    """Raise SubmitError naming the first secret in a job spec — a secret
    storage option, or a dataset, output or model URL holding credentials —
    because the spec travels with the job and the cluster keeps it."""
    from batchdet.storage import is_secret_name, url_secret

    for key in config.get("storage_options", {}):
        if is_secret_name(key):
            raise SubmitError(f"storage option {key!r} is a secret and is not sent to a cluster: {NODE_CREDENTIALS}")
    urls = [(f"dataset {name!r}", url) for name, url in config.get("datasets", {}).items()]
    for what, url in [*urls, ("output", config.get("output")), ("model", config.get("model"))]:
        found = url_secret(url) if url else None
        if found:
            raise SubmitError(f"the {what} URL holds {found}, which is not sent to a cluster: {NODE_CREDENTIALS}")


def local_paths(config: dict[str, Any]) -> list[str]:
    """Local paths in a job spec: on the cluster they name the nodes' files, not this machine's."""
    from batchdet.model.distribution import is_remote

    urls = [*config.get("datasets", {}).values(), config.get("output"), config.get("model")]
    return [u for u in urls if u and not is_remote(u)]


def runtime_env(job_dir: str | os.PathLike, pip_deps: bool = False, extra: dict[str, Any] | None = None) -> dict:
    """The job's runtime environment (see the module docstring). Never holds
    the token or another secret: Ray stores it with the job."""
    from batchdet.storage import is_secret_name

    env: dict[str, Any] = {
        "py_modules": [str(Path(batchdet.__file__).resolve().parent)],
        "working_dir": str(job_dir),
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    if pip_deps:
        env["pip"] = {"packages": requirements(), "pip_check": False}
    for key, value in (extra or {}).items():
        if key == "working_dir":
            raise SubmitError("--runtime-env must not set working_dir: batchdet's carries the job spec "
                              "(add code with py_modules)")
        if key == "env_vars":
            env["env_vars"] = {**env["env_vars"], **value}
        elif key == "py_modules":
            env["py_modules"] = [*env["py_modules"], *value]
        else:
            env[key] = value
    bad = [k for k in env.get("env_vars", {}) if k.upper() in (TOKEN_ENV, TOKEN_PATH_ENV)]
    if bad:
        raise SubmitError(f"{bad[0]} must not go into the runtime environment: the cluster nodes hold the token")
    secret = [k for k in env.get("env_vars", {}) if is_secret_name(k)]
    if secret:
        raise SubmitError(f"--runtime-env env_vars {secret[0]} is a secret and is not sent to a cluster: "
                          f"{NODE_CREDENTIALS}")
    return env


def _read_runtime_env(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SubmitError(f"cannot read --runtime-env {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {path} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {path} must be a mapping (working_dir, pip, env_vars, …)")
    return data


# --- submitting and watching ------------------------------------------------------
def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as e:  # ConnectionError, ray.exceptions.AuthenticationError, RuntimeError, …
        first = one_line(e, with_type=False)
        hint = ""
        if "uthentication" in first:
            hint = (" (set $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH to the cluster's token)" if token is None
                    else " (the token this machine has is not the cluster's)")
        raise SubmitError(f"{first}{hint}") from None


def submit(
    address: str | None,
    detect_args: list[str],
    config: str | None = None,
    wait: bool = True,
    pip_deps: bool = False,
    runtime_env_file: str | None = None,
    insecure: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Submit ``detect`` as a Ray job; return the exit status (see the module docstring)."""
    out = out or sys.stdout
    err = err or sys.stderr
    from batchdet.config import dump_config

    spec = job_config(detect_args, config)  # all local checks first
    refuse_secrets(spec)
    extra = _read_runtime_env(runtime_env_file) if runtime_env_file else None
    address = check_address(address)
    token = resolve_token()
    host = urlsplit(address).hostname or ""
    if token and urlsplit(address).scheme == "http" and not _loopback(host):
        print(f"batchdet: note: the Ray token travels in clear text over http:// to {host}; prefer an SSH tunnel "
              "(ray dashboard), kubectl port-forward or an https proxy", file=err)
    for path in local_paths(spec):
        print(f"batchdet: note: {path} is a local path: the cluster's nodes read it, not this machine", file=err)
    job_dir = tempfile.mkdtemp(prefix="batchdet-submit-")
    try:
        env = runtime_env(job_dir, pip_deps=pip_deps, extra=extra)  # refuses secrets before any request
        if not insecure:
            require_auth(address)
        client = _client(address, token)
        spec_file = Path(job_dir) / JOB_CONFIG_NAME
        spec_file.write_text(dump_config(spec), encoding="utf-8")
        spec_file.chmod(0o600)
        try:
            submission_id = client.submit_job(
                entrypoint=ENTRYPOINT, runtime_env=env,
                metadata={"batchdet_version": batchdet.__version__, "submitted_by": "batchdet submit"},
            )
        except Exception as e:  # the Jobs API refused it (runtime env too large, bad field, …)
            raise SubmitError(f"job submission failed: {one_line(e, with_type=False)}") from None
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)
    if not wait:
        print(submission_id, file=out)
        print(f"batchdet: submitted {submission_id} to {address}; follow it with "
              f"`ray job logs --follow {submission_id}` (RAY_API_SERVER_ADDRESS={address})", file=err)
        return 0
    print(f"batchdet: submitted {submission_id} to {address}; its logs follow "
          "(Ctrl-C stops watching, not the job)", file=err, flush=True)
    try:
        return watch(client, submission_id, out, err)
    except KeyboardInterrupt:
        print(f"batchdet: stopped watching; {submission_id} keeps running (ray job stop {submission_id})", file=err)
        return 130


def watch(client, submission_id: str, out: TextIO, err: TextIO) -> int:
    """Stream the job's logs to ``out`` until it ends; 0 only if it SUCCEEDED."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(submission_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the stream broke (network, head restart): fall back to polling
        print(f"batchdet: log stream ended early ({type(e).__name__}); waiting for the job's status", file=err)
    deadline = time.monotonic() + STATUS_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:  # logs closed but the job still runs: keep polling, slower
            time.sleep(5)
        else:
            time.sleep(0.5)
        status = client.get_job_status(submission_id)
    info = client.get_job_info(submission_id)
    message = f": {one_line(info.message, with_type=False)}" if status != JobStatus.SUCCEEDED and (info.message or "").strip() else ""
    print(f"batchdet: job {submission_id} {status.value}{message}", file=err)
    return 0 if status == JobStatus.SUCCEEDED else 1
