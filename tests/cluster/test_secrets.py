"""Secrets stay on the submitting machine (issue 16).

Everything ``batchdet submit`` sends is kept by the cluster: the working_dir
and py_modules packages in Ray's GCS and unpacked under every node's
``runtime_resources``, the runtime environment, entrypoint and metadata in
the job's record, the job's logs on disk. So submit refuses secrets (storage
options named like one, URLs holding credentials, secret environment
variables in ``--runtime-env``) with one line and exit status 2, before any
request, and the nodes bring their own credentials.

The session's real Ray cluster (``ray start``, token authentication; tests/conftest.py's
``cluster``), whose nodes get their S3 credentials one of the recommended
ways: from their own AWS credentials file, under a profile the job names with
the non-secret storage option ``profile``. Proof that a secret is nowhere the
cluster keeps is only worth something if the search finds what was sent, so
that profile's name is a unique marker and the same search must find it.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml

from batchdet.cluster.submit import NODE_CREDENTIALS, SubmitError, refuse_secrets, runtime_env
from helpers.ray_cluster import NODE_PROFILE, LocalRayCluster, client_env, submit_cli

#: Unique values per run: found anywhere, they can only have come from this module
#: (the marker is the profile the nodes' credentials file names; only this module's job names it).
MARKER = NODE_PROFILE
SECRET = f"secret-{uuid.uuid4().hex}"


# --- submit's local side --------------------------------------------------------------------
def test_secret_storage_options_and_credential_urls_are_refused():
    base = {"datasets": {"a": "s3://b/x"}, "output": "s3://b/o"}
    refuse_secrets({**base, "storage_options": {"endpoint_url": "http://h:9000", "anon": False}})
    refuse_secrets({**base, "model": "https://h/m.onnx?X-Amz-Expires=60#sha256=" + "0" * 64})  # pre-signed: allowed
    for bad, named in [
        ({"storage_options": {"secret": SECRET}}, "storage option 'secret'"),
        ({"storage_options": {"AWS_Secret_Access_Key": SECRET}}, "storage option 'AWS_Secret_Access_Key'"),
        ({"storage_options": {"client_token": SECRET}}, "storage option 'client_token'"),
        ({"datasets": {"a": f"s3://AKIA:{SECRET}@b/x"}}, "dataset 'a' URL holds a password"),
        ({"output": f"s3://AKIA:{SECRET}@b/o"}, "output URL holds a password"),
        ({"model": f"http://me:{SECRET}@h/m.onnx"}, "model URL holds a password"),
        ({"model": f"https://h/m.onnx?token={SECRET}"}, "model URL holds the query parameter 'token'"),
    ]:
        with pytest.raises(SubmitError) as e:
            refuse_secrets({**base, **bad})
        assert named in str(e.value) and str(e.value).endswith(NODE_CREDENTIALS) and SECRET not in str(e.value)


def test_secret_environment_variables_stay_out_of_the_runtime_env(tmp_path):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY"):
        with pytest.raises(SubmitError, match=f"env_vars {name} is a secret"):
            runtime_env(tmp_path, extra={"env_vars": {name: SECRET}})
    assert runtime_env(tmp_path, extra={"env_vars": {"AWS_REGION": "eu-west-1"}})["env_vars"]["AWS_REGION"]


# --- a real cluster -------------------------------------------------------------------------
# ``cluster`` (tests/conftest.py): its nodes have an AWS credentials file of
# their own holding the moto credentials under the profile MARKER (the nodes'
# environment names the file); ``cluster_job`` is the session's job, which names it.


def _jobs_client(cluster: LocalRayCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})


@pytest.fixture(scope="module")
def refused(cluster, tmp_path_factory) -> list[tuple[subprocess.CompletedProcess, str]]:
    """Submits with SECRET in each place a user might put it, against the real
    cluster: (the finished submit process, what its refusal must name). The
    jobs the cluster has before and after must be the same."""
    before = {j.submission_id for j in _jobs_client(cluster).list_jobs()}
    folder = tmp_path_factory.mktemp("refused")
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump({"datasets": {"a": "s3://b/x"}, "output": "s3://b/o",
                                    "storage_options": {"endpoint_url": "http://h:9000", "secret": SECRET}}))
    env_file = folder / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump({"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET}}))
    base = ["--address", cluster.dashboard]
    detect = ["--dataset", "a=s3://b/x", "--output", "s3://b/o"]
    attempts = [
        ([*base, "--", *detect, "--storage-option", "key=AKIA", "--storage-option", f"secret={SECRET}"],
         "storage option 'key'"),
        ([*base, "--config", str(spec)], "storage option 'secret'"),
        ([*base, "--", "--dataset", f"a=s3://AKIA:{SECRET}@b/x", "--output", "s3://b/o"],
         "dataset 'a' URL holds a password"),
        ([*base, "--runtime-env", str(env_file), "--", *detect], "env_vars AWS_SECRET_ACCESS_KEY is a secret"),
    ]
    env = client_env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file))
    procs = [(submit_cli(argv, env, timeout=60), named) for argv, named in attempts]
    assert {j.submission_id for j in _jobs_client(cluster).list_jobs()} == before
    return procs


@pytest.mark.slow
def test_a_job_with_non_secret_storage_options_runs(cluster_job, s3):
    """The session's job (tests/conftest.py's ``cluster_job``): its storage options
    are no secrets, its credentials the nodes' own under the profile MARKER."""
    proc, bucket = cluster_job.proc, cluster_job.bucket
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "SUCCEEDED" in proc.stderr
    assert [p for p in s3.filesystem().find(f"{bucket}/out") if p.endswith(".parquet")]


@pytest.mark.slow
def test_secrets_are_refused_in_one_line_before_anything_is_sent(refused):
    for proc, named in refused:
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert err.startswith("batchdet: error: ") and named in err and err.endswith(NODE_CREDENTIALS), err
        assert "\n" not in err and SECRET not in proc.stdout + err and "IRSA" in err and "Kubernetes Secret" in err


def _files(root: Path):
    """(name, bytes) of every regular file under ``root``, and of every member
    of every zip among them (Ray keeps packages as zips)."""
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        yield str(path), data
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    yield f"{path}!{member}", z.read(member)


GCS_DUMP = """
import sys, pathlib
from ray._private import ray_constants
from ray._raylet import GcsClient

client = GcsClient(address=sys.argv[1])
out = pathlib.Path(sys.argv[2])
namespaces = {None} | {getattr(ray_constants, n) for n in dir(ray_constants) if n.startswith("KV_NAMESPACE_")}
for i, ns in enumerate(namespaces):
    for j, key in enumerate(client.internal_kv_keys(b"", ns)):
        (out / f"{i}-{j}.key").write_bytes(key)
        (out / f"{i}-{j}.value").write_bytes(client.internal_kv_get(key, ns) or b"")
"""


def _gcs_kv(cluster: LocalRayCluster, folder: Path) -> Path:
    """Every key and value of the GCS's internal KV store (job records,
    uploaded packages, …) as files in ``folder``: read with Ray's own GCS
    client in a process that has the cluster's token."""
    subprocess.run([sys.executable, "-c", GCS_DUMP, f"127.0.0.1:{cluster.gcs_port}", str(folder)], check=True,
                   env=cluster.node_env(folder / "unused-cache"), timeout=60, capture_output=True)
    return folder


@pytest.mark.slow
def test_the_cluster_keeps_the_marker_and_no_secret(cluster, cluster_job, refused, tmp_path):
    proc = cluster_job.proc
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    client = _jobs_client(cluster)
    records = {
        "list_jobs": "\n".join(repr(j) for j in client.list_jobs()),
        **{f"job {j.submission_id}": repr(client.get_job_info(j.submission_id)) + client.get_job_logs(j.submission_id)
           for j in client.list_jobs() if j.submission_id},
    }
    kept = [*_files(cluster.root), *_files(_gcs_kv(cluster, tmp_path)), *((k, v.encode()) for k, v in records.items())]
    with_marker = [name for name, data in kept if MARKER.encode() in data]
    assert any("runtime_resources" in name for name in with_marker), with_marker  # the search sees the package
    assert any(".value!" in name for name in with_marker), with_marker  # ... and the package in the GCS
    assert not [name for name, data in kept if SECRET.encode() in data]
