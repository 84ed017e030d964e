"""A real multi-node Ray cluster on this machine, for tests: one head and
worker nodes, each a separate ``ray start --block`` process, with token
authentication on and everything in a private temp dir.

Teardown never runs ``ray stop`` (which would stop every Ray on the machine,
other people's test clusters included): each node's ``ray start --block``
runs in its own process group (session), every process Ray starts for that
node stays in it, and stopping the cluster signals exactly those groups.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from batchdet.pipeline.run import node_environment
from helpers.photos import photo

REPO = Path(__file__).resolve().parents[2]


def ray_cli() -> list[str]:
    """The `ray` command of this Python (not whatever `ray` is first on PATH)."""
    script = Path(sys.executable).with_name("ray")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free here, so this cluster never
    collides with another Ray on the machine (whose defaults are fixed)."""
    return [
        "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
    ]


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    cache: Path
    args: list[str] = field(default_factory=list)  # what `ray start` was given besides the common flags
    cpus: int = 1


@dataclass
class LocalRayCluster:
    root: Path  # short path: Ray's unix sockets live under it
    token_file: Path
    gcs_port: int
    dashboard_port: int
    nodes: list[Node] = field(default_factory=list)
    node_extra_env: dict[str, str] = field(default_factory=dict)  # the nodes' only (drivers do not get it)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def node_env(self, cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
        env.update({
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
            "RAY_USAGE_STATS_ENABLED": "0", "BATCHDET_MODEL_CACHE": str(cache),
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1",
            **node_environment(),  # as infra/docker/Dockerfile sets for every node
        })
        # jobs run `python …`: make it this interpreter, as on a cluster whose image has one Python
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra or {})
        return env

    def _start(self, name: str, args: list[str], cpus: int) -> Node:
        cache = self.root / f"cache-{name}"
        log = self.root / f"{name}.log"
        cmd = [*ray_cli(), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
               "--num-gpus", "0", "--object-store-memory", str(100 * 1024 * 1024),
               "--temp-dir", str(self.root / "ray"), "--disable-usage-stats", *_node_ports(), *args]
        with open(log, "ab") as out:  # a restarted node's log follows its first life's
            proc = subprocess.Popen(cmd, env=self.node_env(cache, self.node_extra_env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        return Node(name, proc, log, cache, args, cpus)

    def start(self, workers: int = 1, head_cpus: int = 1, worker_cpus: int = 2, timeout: float = 120) -> None:
        self.nodes.append(self._start(
            "head", ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                     str(self.dashboard_port), "--ray-client-server-port", str(free_port())], head_cpus))
        self._wait(lambda: _listening(self.gcs_port), timeout, "the head's GCS")  # workers need only the GCS
        for i in range(workers):
            self.nodes.append(self._start(f"worker{i}", ["--address", f"127.0.0.1:{self.gcs_port}"], worker_cpus))
        self._wait(lambda: len(self.alive_nodes()) == 1 + workers, timeout, f"the dashboard and {workers} worker(s)")

    def restart_dead_workers(self, timeout: float = 120) -> None:
        """Start again, as they were, the worker nodes whose process has
        exited (a test killed them): the cluster is whole again."""
        dead = [i for i, n in enumerate(self.nodes) if n.proc.poll() is not None]
        assert 0 not in dead, "the head node is gone: the cluster cannot be restored"
        if not dead:
            return
        for i in dead:
            old = self.nodes[i]
            _signal_group(old.proc.pid, signal.SIGKILL)  # what is left of its group
            self.nodes[i] = self._start(old.name, old.args, old.cpus)
        self._wait(lambda: len(self.alive_nodes()) == len(self.nodes), timeout, f"{len(dead)} restarted worker(s)")

    def api(self, path: str, token: str | None = "cluster"):
        """GET a dashboard path (with the cluster's token by default); parsed JSON or None."""
        headers = {"Authorization": f"Bearer {self.token if token == 'cluster' else token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.dashboard + path, headers=headers),
                                        timeout=5) as r:
                return json.loads(r.read() or b"null")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def status(self, path: str, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.dashboard + path, headers=headers),
                                        timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def alive_nodes(self) -> list[dict]:
        data = self.api("/api/v0/nodes?limit=100")
        try:
            rows = data["data"]["result"]["result"]
        except (TypeError, KeyError):
            return []
        return [n for n in rows if n.get("state") == "ALIVE"]

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n in self.nodes if n.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text(errors='replace')[-3000:]}" for n in self.nodes)
                reason = f"{dead[0].name} exited" if dead else f"timed out after {timeout:.0f} s"
                raise RuntimeError(f"waiting for {what}: {reason}\n{logs}")
            time.sleep(0.5)

    def ours(self) -> list[int]:
        """Pids of processes this cluster started, wherever they are: Ray puts
        some workers in process groups of their own, but all inherit the nodes'
        environment, which names this cluster's private token file."""
        marker = f"RAY_AUTH_TOKEN_PATH={self.token_file}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "environ").read_bytes().split(b"\0"):
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def stop(self, grace: float = 3) -> None:
        """SIGTERM each node's process group, SIGKILL what is left after
        ``grace`` s, then any other process of this cluster (by pid)."""
        for node in reversed(self.nodes):
            _signal_group(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        for node in self.nodes:
            _signal_group(node.proc.pid, signal.SIGKILL)  # stragglers of that group only
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while Path("/proc/self/environ").exists() and time.monotonic() < deadline:
            pids = self.ours()  # workers Ray put in process groups of their own
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)
        self.nodes.clear()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def make_cluster() -> LocalRayCluster:
    root = Path(tempfile.mkdtemp(prefix="bdray-", dir="/tmp"))  # short: unix socket paths are limited
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    return LocalRayCluster(root=root, token_file=token_file, gcs_port=free_port(), dashboard_port=free_port())


def remove(cluster: LocalRayCluster) -> None:
    shutil.rmtree(cluster.root, ignore_errors=True)


#: The AWS profile under which the shared cluster's nodes hold S3
#: credentials, in a credentials file of their own: a unique value per
#: session, so that a search finding it anywhere knows it came from a job
#: that named it (tests/cluster/test_secrets.py).
NODE_PROFILE = f"marker-{uuid.uuid4().hex}"


#: The shared cluster's GCS declares a node dead after three missed health
#: checks a second apart (Ray's defaults: five, 3 s apart, ~15-30 s): the
#: node-kill test waits for that. A node busy for a few seconds on a loaded
#: 2-core machine still answers in time (each check waits 2 s).
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                          "RAY_health_check_failure_threshold": "3"}


class SharedCluster:
    """The session's one multi-node cluster, for every test that needs one:
    a head (1 CPU) and a worker (2 CPUs), token authentication on, S3
    credentials in the nodes' environment (taken from this process's when it
    starts: the s3 fixture's) and under :data:`NODE_PROFILE` in a credentials
    file. Started on first use; a worker a test killed is started again for
    the next; stopped after the last test that uses it."""

    def __init__(self, credentials_file: Path):
        self.credentials_file = credentials_file
        self.cluster: LocalRayCluster | None = None
        self.left: list[int] = []  # processes that outlived a stop

    def running(self) -> LocalRayCluster:
        if self.cluster is None:
            c = make_cluster()
            c.node_extra_env = {"AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file), **FAST_FAILURE_DETECTION}
            self.cluster = c
            c.start(workers=1, head_cpus=1, worker_cpus=2)
        else:
            self.cluster.restart_dead_workers()
        return self.cluster

    def stop(self) -> None:
        """Stop and remove the cluster (if running); :attr:`left` collects what outlived it."""
        if self.cluster is not None:
            c, self.cluster = self.cluster, None
            try:
                c.stop(grace=0.5)  # thrown away with its folder: Ray's orderly shutdown keeps nothing worth seconds
                self.left += c.ours()
            finally:
                remove(c)


# --- the submitting side ------------------------------------------------------------------------
def client_env(**extra: str) -> dict[str, str]:
    """The submitting shell: no Ray variables unless given (not even RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


def submit_cli(argv: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """``batchdet submit ARGV`` from the repository, as a user types it."""
    return subprocess.run([sys.executable, "-m", "batchdet.cli", "submit", *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


#: The job's images, per dataset (names under ``images/<dataset>/`` in its bucket): photos, and a file that is none.
GOOD = {"rocket.jpg": photo("rocket.jpg"), "cat.png": photo("chelsea.png"), "sub/camera.png": photo("camera.png")}
BAD = {"broken.jpg": b"<html>not an image</html>"}
JOB_IMAGES = {"alpha": GOOD, "beta": BAD | {"astro.png": photo("astronaut.png")}}


@dataclass
class SubmittedJob:
    """One finished ``batchdet submit`` to the shared cluster (tests/conftest.py's
    ``cluster_job``): test_cluster checks what it wrote, test_secrets what the
    cluster kept of it. A second job would prove nothing more and costs a
    driver's and an actor's start on the cluster."""

    proc: subprocess.CompletedProcess
    bucket: str
    images: dict[str, tuple[str, bytes]]  # each image's URL: (its dataset, its bytes)
    model_url: str


def submit_detect_job(cluster: LocalRayCluster, s3, model: Path, folder: Path) -> SubmittedJob:
    """Submit a detect of :data:`JOB_IMAGES` (in a fresh bucket of ``s3``) with
    ``model`` served from that bucket, and wait for it. Part of the job is a
    spec file in ``folder``, the rest flags (which win). Its storage options
    are no secrets: the nodes take the credentials from their own file, under
    the profile :data:`NODE_PROFILE` the job names."""
    fs = s3.filesystem()
    bucket = s3.new_bucket()
    images = {}
    for dataset, files in JOB_IMAGES.items():
        for name, data in files.items():
            fs.pipe(f"{bucket}/images/{dataset}/{name}", data)
            images[f"s3://{bucket}/images/{dataset}/{name}"] = (dataset, data)
    model_url = f"s3://{bucket}/models/{model.name}"
    fs.put(str(model), model_url)
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "datasets": {name: f"s3://{bucket}/images/{name}" for name in JOB_IMAGES},
        "output": f"s3://{bucket}/out", "model": model_url, "batch_size": 16,
        "storage_options": {"endpoint_url": s3.endpoint_url},
    }))
    argv = ["--address", cluster.dashboard, "--config", str(spec), "--",
            "--actors", "1", "--threads-per-actor", "2", "--batch-size", "2", "--storage-option", f"profile={NODE_PROFILE}"]
    proc = submit_cli(argv, client_env(RAY_AUTH_TOKEN_PATH=str(cluster.token_file)))
    return SubmittedJob(proc, bucket, images, model_url)
