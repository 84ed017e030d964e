"""infra/ and jobs/ checked against the code and against each other (parsed,
never built or applied: no Docker, Kubernetes or AWS here)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from batchdet.cli import build_parser
from batchdet.config import load_config, parse_config
from batchdet.pipeline.run import node_environment

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
IMAGE = f"ghcr.io/your-org/batchdet:{VERSION}"
GPU_IMAGE = f"{IMAGE}-gpu"
SECRET = "batchdet-ray-token"
IMAGE_ROOT = "/opt/batchdet"  # where the Dockerfile puts the repository's jobs/


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict:
    [doc] = [d for d in docs(path) if d.get("kind") == kind]
    return doc


def dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)", dockerfile(), re.M).group(1)


def detect_args(argv: list[str]):
    """Parse with the real `batchdet detect` parser (SystemExit on an unknown flag)."""
    return build_parser().parse_args(["detect", *argv])


# --- the image ------------------------------------------------------------------------------------
def test_dockerfile_builds_on_a_ray_and_python_pyproject_allows():
    """The image's pins within pyproject's bounds (not equal to whatever this
    machine has installed: a newer pip resolve must not fail this test)."""
    [ray_requirement] = [Requirement(d) for d in PROJECT["dependencies"] if Requirement(d).name == "ray"]
    assert ray_requirement.specifier.contains(dockerfile_arg("RAY_VERSION")), ray_requirement
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON\}\$\{VARIANT\}$", dockerfile(), re.M)
    python = re.fullmatch(r"py3(\d+)", dockerfile_arg("PYTHON"))
    assert python and SpecifierSet(PROJECT["requires-python"]).contains(f"3.{python.group(1)}")
    assert re.search(r"^ENV RAY_AUTH_MODE=token", dockerfile(), re.M)  # fails closed without a token
    # every node of the image runs with the Ray settings the embedded Ray has
    for name, value in node_environment().items():
        assert re.search(rf"^ENV {name}={value}$", dockerfile(), re.M), name
        assert f"export {name}={value}" in (REPO / "README.md").read_text(), name  # the local cluster recipe
    # what the image copies exists, and jobs/ lands where the RayJob entrypoint expects it
    for src, dest in re.findall(r"^COPY (?:--\S+ )*(\S+) (\S+)$", dockerfile(), re.M):
        assert (REPO / src).exists(), src
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile(), re.M) and "COPY --chown=ray:users jobs ./jobs" in dockerfile()
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {"!pyproject.toml", "!README.md", "!batchdet/", "!jobs/"} <= set(ignore)


# --- KubeRay ----------------------------------------------------------------------------------------
def cluster_specs() -> dict[str, dict]:
    return {
        "raycluster.yaml": one(INFRA / "kuberay" / "raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": one(INFRA / "kuberay" / "rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    }


def containers(spec: dict):
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        for container in group["template"]["spec"]["containers"]:
            yield name, group, container


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_cluster_shape(name):
    spec = cluster_specs()[name]
    assert spec["rayVersion"] == dockerfile_arg("RAY_VERSION")
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}  # token auth from the Secret
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard is never exposed outside the cluster
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for group_name, group, container in containers(spec):
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, (group_name, "guaranteed QoS: Ray sizes itself from the limits")
        gpu = group_name == "gpu-workers"
        assert container["image"] == (GPU_IMAGE if gpu else IMAGE)
        assert ("nvidia.com/gpu" in limits) == gpu
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations) == gpu
        assert group["template"]["spec"]["serviceAccountName"] == "batchdet"
        env = {e["name"]: e for e in container.get("env", [])}
        assert not {"RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"} & set(env)  # no secrets inline
        assert env["BATCHDET_MODEL_CACHE"]["value"].startswith(
            next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "model-cache"))


def test_rayjob_runs_the_same_cluster_as_raycluster():
    specs = cluster_specs()
    shape = {name: {(g, c["image"], str(c["resources"]), grp.get("minReplicas"), grp.get("maxReplicas"))
                    for g, grp, c in containers(spec)} for name, spec in specs.items()}
    assert shape["raycluster.yaml"] == shape["rayjob.yaml"]
    assert specs["raycluster.yaml"]["autoscalerOptions"] == specs["rayjob.yaml"]["autoscalerOptions"]


def test_rayjob_entrypoint_is_the_repositorys_with_real_detect_flags():
    path = INFRA / "kuberay" / "rayjob.yaml"
    job = one(path, "RayJob")
    python, script, *args = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and script.startswith(f"{IMAGE_ROOT}/")
    assert (REPO / script.removeprefix(f"{IMAGE_ROOT}/")).is_file()  # jobs/detect_job.py, copied by the Dockerfile
    parsed = detect_args(args)
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    # --config names the ConfigMap's key, mounted into the head where the driver runs
    config_dir, key = parsed.config.rsplit("/", 1)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == config_dir)
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = one(path, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    spec = parse_config(yaml.safe_load(config_map["data"][key]), f"{path.name}: ConfigMap")
    assert spec["datasets"] and spec["output"] and spec["model_sha256"]
    assert not spec.get("storage_options", {}).keys() & {"key", "secret", "token"}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]


def test_serviceaccount_uses_irsa_not_keys():
    account = one(INFRA / "kuberay" / "serviceaccount.yaml", "ServiceAccount")
    assert account["metadata"]["name"] == "batchdet"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


# --- AWS cluster launcher --------------------------------------------------------------------------
def launcher() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def test_aws_launcher_token_auth_everywhere():
    config = launcher()
    token_path = "/home/ray/.ray/auth_token"
    assert config["file_mounts"] == {token_path: "~/.ray/auth_token"}  # the token from a local file
    options = config["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options and f"-e RAY_AUTH_TOKEN_PATH={token_path}" in options
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and f"RAY_AUTH_TOKEN_PATH={token_path}" in c for c in start)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "--dashboard-port=8265" in head_start


def test_aws_launcher_node_types():
    config = launcher()
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert types["head"]["resources"] == {"CPU": 0}
    profiles = {t["node_config"]["IamInstanceProfile"]["Arn"] for t in types.values()}
    assert len(profiles) == 1 and profiles.pop().endswith(":instance-profile/batchdet-ray-node")
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"] <= config["max_workers"]
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "GPU" not in types["cpu_worker"]["resources"]
    # the same images as on Kubernetes, and the same model reference
    assert config["docker"]["image"] == IMAGE
    assert types["gpu_worker"]["docker"]["worker_image"] == GPU_IMAGE
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]
    head_env = {e["name"]: e.get("value") for e in
                cluster_specs()["raycluster.yaml"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"-e BATCHDET_MODEL={head_env['BATCHDET_MODEL']}" in config["docker"]["run_options"]


def test_aws_iam_policy_is_s3_only():
    import json

    policy = json.loads((INFRA / "aws" / "iam-policy.json").read_text())
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert actions and all(a.startswith("s3:") for a in actions) and "s3:*" not in actions


# --- MinIO ---------------------------------------------------------------------------------------
def test_minio_compose_matches_the_example_and_stays_on_loopback():
    compose = yaml.safe_load((INFRA / "minio" / "compose.yaml").read_text())
    minio = compose["services"]["minio"]
    assert all(p.startswith("127.0.0.1:") for p in minio["ports"])
    assert re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\S+", minio["image"])
    example = load_config(REPO / "jobs" / "examples" / "minio-local.yaml")
    options = example["storage_options"]
    assert options["key"] == minio["environment"]["MINIO_ROOT_USER"]
    assert options["secret"] == minio["environment"]["MINIO_ROOT_PASSWORD"]
    assert options["endpoint_url"] == "http://127.0.0.1:9000" and "127.0.0.1:9000:9000" in minio["ports"]
    bucket = example["output"].split("/")[2]
    assert f"mc mb --ignore-existing local/{bucket}" in " ".join(compose["services"]["setup"]["command"])


# --- jobs/ -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_job_specs_validate(path):
    kwargs = load_config(path)
    assert kwargs["datasets"] and kwargs["output"]


def test_gpu_example_fits_the_gpu_workers():
    spec = load_config(REPO / "jobs" / "examples" / "gpu-workers.yaml")
    gpu = next(g for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert spec["gpus_per_actor"] <= limits["nvidia.com/gpu"]
    assert spec["threads_per_actor"] <= int(limits["cpu"])
    assert spec["actors"][1] <= gpu["maxReplicas"] * limits["nvidia.com/gpu"] / spec["gpus_per_actor"]


def test_runtime_env_yaml():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {"tests", ".git", "*.onnx", "infra", "docs"} <= set(env["excludes"])
    [requirement] = env["pip"]["packages"]
    assert requirement == "-r ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/jobs/requirements.txt"
    assert not {k.upper() for k in env.get("env_vars", {})} & {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"}
    # the requirements are pyproject's, without Ray (the cluster has it) and the test extras
    wanted = [d for d in PROJECT["dependencies"] if not d.startswith("ray")]
    listed = [line.strip() for line in (REPO / "jobs" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == wanted


def test_job_entrypoint_takes_detect_arguments():
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "detect_job.py"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("batchdet 0") and "usage: batchdet detect" in proc.stdout
    assert "--config FILE" in proc.stdout and "--dataset NAME=URL" in proc.stdout


def test_documented_commands_use_real_flags():
    """Every `batchdet submit`/`detect_job.py` line in the docs parses."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *INFRA.rglob("*.md"),
                                             *(REPO / "jobs").rglob("*.yaml"), *INFRA.rglob("*.yaml")])
    text = text.replace("\\\n", " ")
    lines = re.findall(r"(batchdet submit [^\n`|]*|python jobs/detect_job.py [^\n`|]*)", text)
    assert len(lines) > 5
    parser = build_parser()
    for line in lines:
        if "[" in line or "<" in line or "..." in line or "…" in line:  # a synopsis, not a command
            continue
        words = [w for w in shlex.split(line.split("#")[0].split(" &&")[0], posix=True) if w not in ("\\",)]
        words = [w.replace("$PWD", str(REPO)) for w in words]
        if words[0] == "python":
            detect_args(words[2:])
        else:
            args = parser.parse_args(words[1:])
            assert args.command == "submit"
            if args.detect_args:
                detect_args([a for a in args.detect_args if a != "--"])


# --- every manifest: token auth; every file: documented ---------------------------------------------
def test_token_auth_is_on_in_every_ray_manifest():
    ray_files = {p.relative_to(REPO).as_posix() for p in INFRA.rglob("*.yaml")} - {"infra/minio/compose.yaml"}
    checked = set()
    for path in sorted(INFRA.rglob("*.yaml")):
        rel = path.relative_to(REPO).as_posix()
        for doc in docs(path):
            if doc.get("kind") == "RayCluster":
                assert doc["spec"]["authOptions"]["mode"] == "token", rel
                checked.add(rel)
            elif doc.get("kind") == "RayJob":
                assert doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token", rel
                checked.add(rel)
            elif "available_node_types" in doc:
                assert "-e RAY_AUTH_MODE=token" in doc["docker"]["run_options"], rel
                checked.add(rel)
            elif doc.get("kind") in ("ServiceAccount", "ConfigMap"):
                checked.add(rel)
    assert checked == ray_files
    # the Secret every manifest names is the one the READMEs tell you to create
    for readme in (INFRA / "kuberay" / "README.md", REPO / "README.md"):
        assert f"kubectl create secret generic {SECRET} --from-literal=auth_token=" in readme.read_text()


def test_every_infra_file_is_explained():
    guide = (REPO / "README.md").read_text()
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    assert len(files) >= 12
    for path in files:
        assert f"`{path.relative_to(REPO).as_posix()}`" in guide, path
    for directory in ("docker", "kuberay", "aws", "minio"):
        assert (INFRA / directory / "README.md").is_file()
