"""`batchdet submit` and the Ray Jobs API: a real two-node Ray cluster on this
machine (head + worker as separate `ray start` processes, token
authentication on: the session's shared one), the model served from S3 (moto) and distributed to each
node's own cache, the job's Parquet output checked row by row.

The quick tests above the cluster check submit's local side: token lookup,
address checks, refusing unauthenticated clusters, validation before any
request is sent.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from batchdet.cluster.submit import (
    ENTRYPOINT, JOB_CONFIG_NAME, SubmitError, check_address, job_config, require_auth, resolve_token, runtime_env,
)
from batchdet.files import sha256_of_file
from helpers.photos import photo
from helpers.ray_cluster import BAD, client_env, ray_cli, submit_cli

REPO = Path(__file__).resolve().parents[2]


# --- submit's local side ----------------------------------------------------------------
def test_token_lookup_follows_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default-file\n")
    assert resolve_token({}) == "from-default-file"
    path = tmp_path / "tok"
    path.write_text("  from-path-file \n")
    assert resolve_token({"RAY_AUTH_TOKEN_PATH": str(path)}) == "from-path-file"
    assert resolve_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}) == "from-env"
    with pytest.raises(SubmitError, match="cannot read the Ray token file"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})
    path.write_text("\n")
    with pytest.raises(SubmitError, match="is empty"):
        resolve_token({"RAY_AUTH_TOKEN_PATH": str(path)})


def test_address_checks(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert check_address("http://head:8265/") == "http://head:8265"
    for bad, message in [(None, "no --address"), ("head:6379", "must be the dashboard URL"),
                         ("ray://head:10001", "must be the dashboard URL"),
                         ("http://user:pw@head:8265", "must not hold credentials")]:
        with pytest.raises(SubmitError, match=message):
            check_address(bad)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example.com")
    assert check_address(None) == "https://ray.example.com"


@pytest.fixture
def fake_dashboard():
    """A loopback HTTP server answering /api/jobs/ with a chosen status."""
    state = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(state["code"])
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", state
    server.shutdown()
    server.server_close()


def test_unauthenticated_cluster_is_refused(fake_dashboard):
    address, state = fake_dashboard
    with pytest.raises(SubmitError, match="no token authentication.*--insecure"):
        require_auth(address)
    state["code"] = 401
    require_auth(address)  # protected: fine


def test_submit_validates_everything_before_sending(tmp_path, capsys):
    from batchdet.cli import main

    # nothing listens on port 9: any request would fail with "cannot reach", not these messages
    base = ["submit", "--address", "http://127.0.0.1:9", "--"]
    assert main([*base, "--dataset", "bad/name=s3://b/x", "--output", "s3://b/o"]) == 2
    assert "bad dataset name" in capsys.readouterr().err
    assert main([*base, "--dataset", "a=s3://b/x"]) == 2
    assert "required: --output" in capsys.readouterr().err
    assert main([*base, "--dataset", "a=s3://b/x", "--output", "s3://b/o", "--address", "auto"]) == 2
    assert "not a detect argument" in capsys.readouterr().err
    spec = tmp_path / "job.yaml"
    spec.write_text("datasets: {a: s3://b/x}\noutput: s3://b/o\nbatch_size: four\n")
    assert main(["submit", "--address", "http://127.0.0.1:9", "--config", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'batch_size' must be a whole number" in err and "\n" not in err


def test_job_spec_merges_config_and_flags(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("datasets: {a: s3://b/a}\noutput: s3://b/o\nmodel: s3://b/m.onnx\nbatch_size: 8\n"
                    "storage_options: {endpoint_url: 'http://x:9000', anon: false}\n")
    merged = job_config(["--", "--batch-size", "2", "--storage-option", "anon=true", "--actors", "2:3"], str(spec))
    assert merged["datasets"] == {"a": "s3://b/a"} and merged["batch_size"] == 2 and merged["actors"] == (2, 3)
    assert merged["storage_options"] == {"endpoint_url": "http://x:9000", "anon": True}
    assert merged["model"] == "s3://b/m.onnx" and "address" not in merged


def test_runtime_env_ships_the_package_and_never_the_token(tmp_path):
    env = runtime_env(tmp_path)
    assert env["py_modules"] == [str(REPO / "batchdet")] and env["working_dir"] == str(tmp_path)
    assert "RAY_AUTH_TOKEN" not in str(env) and "pip" not in env
    assert "onnxruntime>=1.18" in runtime_env(tmp_path, pip_deps=True)["pip"]["packages"]
    with pytest.raises(SubmitError, match="must not go into the runtime environment"):
        runtime_env(tmp_path, extra={"env_vars": {"RAY_AUTH_TOKEN": "x"}})
    with pytest.raises(SubmitError, match="must not set working_dir"):
        runtime_env(tmp_path, extra={"working_dir": "."})
    merged = runtime_env(tmp_path, extra={"env_vars": {"A": "1"}, "py_modules": ["/x"], "pip": ["y"]})
    assert merged["env_vars"] == {"PYTHONUNBUFFERED": "1", "A": "1"} and merged["py_modules"][-1] == "/x"
    assert merged["pip"] == ["y"]
    assert ENTRYPOINT == f"python -m batchdet.cluster.job --config {JOB_CONFIG_NAME}"


# --- the real cluster ---------------------------------------------------------------------
# ``cluster`` (tests/conftest.py): the session's head and worker node. The
# nodes hold S3 credentials of their own, in their environment (set by the s3
# fixture before ``ray start``) as pods take them from a Secret, and in a
# credentials file under a profile (``cluster_job`` names it): a job carries
# none (``batchdet submit`` refuses secret options).


@pytest.mark.slow
def test_dashboard_and_jobs_api_need_the_token(cluster, tmp_path):
    assert cluster.status("/api/jobs/") == 401
    assert cluster.status("/api/jobs/", token="not-the-token") == 403
    assert cluster.status("/api/jobs/", token=cluster.token) == 200
    args = ["--address", cluster.dashboard, "--no-wait", "--", "--dataset", "a=s3://b/x", "--output", "s3://b/o"]
    no_token = submit_cli(args, client_env(HOME=str(tmp_path)), timeout=60)
    assert no_token.returncode == 2
    assert "Authentication required" in no_token.stderr and "RAY_AUTH_TOKEN" in no_token.stderr
    wrong = submit_cli(args, client_env(HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"), timeout=60)
    assert wrong.returncode == 2 and "Authentication failed" in wrong.stderr


@pytest.mark.slow
def test_submit_runs_detect_on_two_nodes_with_the_model_from_s3(cluster, cluster_job, s3, narrow_model):
    """The session's job (:func:`helpers.ray_cluster.submit_detect_job`): part of it
    in a spec file, the rest as flags (which win), the model and the images in S3."""
    proc, bucket = cluster_job.proc, cluster_job.bucket
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-6000:]
    assert cluster.token not in logs and "testing" not in logs
    assert "SUCCEEDED" in proc.stderr and "STAND-IN MODEL" in proc.stdout
    # the job ran the batchdet uploaded with it (py_modules), not the editable install here
    banner = next(line for line in proc.stdout.splitlines() if line.startswith("batchdet 0"))
    assert str(REPO) not in banner and "runtime_resources" in banner, banner

    # one row per image, ok with detections or error, from this run
    fs = s3.filesystem()
    table = pads.dataset(f"{bucket}/out", filesystem=fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table()
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows and set(rows) == set(cluster_job.images)
    from batchdet.pipeline.detector import Detector

    reference = Detector(narrow_model, threads=1)
    for uri, (dataset, data) in cluster_job.images.items():
        row = rows[uri]
        assert row["dataset"] == dataset
        if data in BAD.values():
            assert row["status"] == "error" and row["error"].startswith("DecodeError: ") and row["detections"] is None
            continue
        want = reference.detect(data).detections
        assert row["status"] == "ok" and row["error"] is None and len(row["detections"]) == len(want) > 0
        assert [d["label_id"] for d in row["detections"]] == [d["label_id"] for d in want]
        assert [d["score"] for d in row["detections"]] == pytest.approx([d["score"] for d in want], abs=1e-5)

    # the model: pinned in the manifest, fetched once into each node's own cache
    import json

    sha = sha256_of_file(narrow_model)
    run_id = next(iter(rows.values()))["run_id"]
    manifest = json.loads(fs.cat(f"{bucket}/out/_runs/{run_id}.json"))
    assert manifest["model"]["path"] == f"{cluster_job.model_url}#sha256={sha}"
    assert manifest["model"]["sha256"] == sha and "testing" not in json.dumps(manifest)
    for node in cluster.nodes:  # head: the driver's check; worker: the only node an actor fits on
        cached = node.cache / f"{sha}.onnx"
        assert cached.is_file() and sha256_of_file(cached) == sha, node.name
        assert not [p for p in node.cache.iterdir() if p.name.endswith(".part")]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BATCHDET_TEST_RAY_JOB_SUBMIT"),
                    reason="~60 s more (a pip virtualenv per node): set BATCHDET_TEST_RAY_JOB_SUBMIT=1")
def test_ray_job_submit_with_jobs_runtime_env(cluster, s3, narrow_model):
    """The documented `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml
    -- python jobs/detect_job.py …` path: Ray's CLI, the repository as working_dir,
    the requirements from jobs/requirements.txt (all satisfied: nothing downloaded)."""
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    fs.pipe(f"{bucket}/images/a/rocket.jpg", photo("rocket.jpg"))
    fs.pipe(f"{bucket}/images/a/broken.jpg", BAD["broken.jpg"])
    fs.put(str(narrow_model), f"{bucket}/models/narrow.onnx")
    options = [f"--storage-option=endpoint_url={s3.endpoint_url}"]  # credentials: the nodes' environment
    proc = subprocess.run(
        [*ray_cli(), "job", "submit", "--address", cluster.dashboard, "--working-dir", ".",
         "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "jobs/detect_job.py",
         "--dataset", f"a=s3://{bucket}/images/a", "--output", f"s3://{bucket}/out",
         "--model", f"s3://{bucket}/models/narrow.onnx", "--actors", "1", "--threads-per-actor", "2", *options],
        capture_output=True, text=True, cwd=REPO, timeout=300,
        env=client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster.token_file)),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    banner = next(line for line in proc.stdout.splitlines() if line.startswith("batchdet 0"))
    assert "runtime_resources" in banner and str(REPO) not in banner, banner
    table = pads.dataset(f"{bucket}/out", filesystem=fs, format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table()
    assert sorted(table.column("status").to_pylist()) == ["error", "ok"]
