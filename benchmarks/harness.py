"""What every benchmark script shares, in one module: the machine and commit a
figure belongs to; the synthesized photos and the models they time; /proc
readers (CPU and memory of a process tree, how busy everyone else was); the
bare onnxruntime loops at Ray's worker niceness; ``detect`` run in a fresh
process; the small arithmetic the scripts' figures are made of; and the
report (a table printed row by row as the measurements come, then each target
met or missed, as JSON and Markdown).

Only public APIs are used: Ray's (``ray.init``, ``ray.shutdown``) and
batchdet's (``detect`` and its options, ``on_progress``). Processes are told
apart by what batchdet knows of them, not by Ray's process titles (which Ray
does not document): the driver, the process that called ``detect``, against
every other process of the run (Ray's daemons and workers).

Run as ``harness.py --detect-child SPEC`` it is the child :func:`run_detect` starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
#: real photographs (public domain and CC0; their README.md names each one's source)
TEST_PHOTOS = HERE.parent / "tests" / "photos"
WIDTH, HEIGHT = 640, 480
#: Other people's load (cores) above which a phase's timings are flagged as noisy.
NOISY_CORES = 0.3


# --- where a figure comes from ----------------------------------------------------
def machine_info() -> dict:
    """CPU model and the flags that decide onnxruntime's speed (AVX-512, VNNI,
    AMX), memory and versions: figures are only comparable on one machine."""
    import onnxruntime
    import ray

    cpu_model = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("", platform.machine(), platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx")) or "vnni" in f]
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_flags": flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def commit() -> str:
    """The checkout's commit (``-dirty`` with local changes), or "unknown" outside git."""
    try:
        return subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def header() -> dict:
    """The part of every results JSON that says where the figures come from; printed too."""
    info = {"machine": machine_info(), "commit": commit()}
    m = info["machine"]
    print(f"machine: {m['nproc']} CPUs, {m['cpu_model']} ({' '.join(m['cpu_flags'])}), commit {info['commit']}",
          flush=True)
    return info


def print_rows(table: Callable[[list[dict]], str], measurements: Iterable[dict]) -> list[dict]:
    """Print ``table``'s header, then each measurement's row as it arrives
    (runs are long: a reader should see each row when it is measured); return them all."""
    print(table([]), flush=True)
    results = []
    for result in measurements:
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
    return results


def parser(doc: str, sizes: str, what: str) -> argparse.ArgumentParser:
    """A script's arguments: ``--sizes`` (comma-separated numbers of ``what``) and ``--json``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", default=sizes, help=f"comma-separated numbers of {what}")
    p.add_argument("--json", dest="json_out", help="write the figures here")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model arguments that ``resolve_model`` reads: ``--model``, ``--channels-divisor``, ``--smooth``."""
    p.add_argument("--model", help="ONNX model (default: the full stand-in, built once into the cache)")
    p.add_argument("--channels-divisor", type=int, default=1, help="stand-in width divisor (8 for a fast smoke run)")
    p.add_argument("--smooth", action="store_true",
                   help="the smooth stand-in (detections stable enough to compare; docs/model.md, \"Stand-ins\")")


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    """The arguments every measuring script takes: the model, where to work and where to write."""
    add_model_args(p)
    p.add_argument("--workdir", help="images, outputs and logs (default: work/ beside --out)")
    p.add_argument("--out", default=out)


def workdir(args: argparse.Namespace) -> Path:
    """``--workdir``, else ``work/`` beside ``--out``; created."""
    folder = Path(args.workdir) if args.workdir else Path(args.out).parent / "work"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def begin(args: argparse.Namespace) -> tuple[Path, float, dict]:
    """A measuring script's start: its work folder (:func:`workdir`), the clock
    its ``elapsed_s`` is read from, and its results' :func:`header` (printed)."""
    return workdir(args), time.time(), header()


def quick_model(args: argparse.Namespace) -> None:
    """``--quick``'s model: the narrow stand-in (width divisor 16), unless ``--model`` or a divisor is given."""
    if args.channels_divisor == 1 and not args.model:
        args.channels_divisor = 16


def command(argv: list[str] | None) -> str:
    """The command line that made a result, for its report."""
    return " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])


def write_json(path: Path, value) -> None:
    """``value`` as indented JSON at ``path`` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


# --- images ---------------------------------------------------------------------
def photo_files(folder: str | None, names: Sequence[str], count: int) -> list[Path]:
    """The first ``count`` JPEG/PNG files of ``folder`` (``--photos``), else
    the files ``names`` of the repository's test photographs (tests/photos)."""
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        files = [TEST_PHOTOS / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:  # a name the script lists that is not there would silently shrink the set
            raise SystemExit(f"not in {TEST_PHOTOS}: {', '.join(missing)}")
    if not files:
        raise SystemExit(f"no JPEG or PNG photos in {folder}")
    return files[:count]


def natural_image(rng: np.random.Generator, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A 640×480 RGB picture with the statistics of a photograph rather than a
    drawing: 1/f amplitude spectrum texture (as natural scenes have), a sky
    gradient above a horizon, a few soft-edged objects and sensor noise. Its
    JPEG is about as large and as slow to decode as a typical COCO photo's."""

    def pink(alpha: float) -> np.ndarray:
        fy = np.fft.fftfreq(height)[:, None]
        fx = np.fft.rfftfreq(width)[None, :]
        f = np.sqrt(fx**2 + fy**2)
        f[0, 0] = 1.0
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**alpha
        field = np.fft.irfft2(spectrum, s=(height, width))
        return (field - field.mean()) / (field.std() + 1e-9)

    y = np.linspace(0.0, 1.0, height)[:, None, None]
    horizon = rng.uniform(0.3, 0.6)
    sky = np.array([90, 150, 225]) * (1 - y) + np.array([200, 210, 225]) * y
    ground_colour = rng.uniform(50, 150, 3)
    texture = pink(1.0)[:, :, None]
    colour = np.stack([pink(1.4), pink(1.4), pink(1.4)], axis=-1)
    ground = ground_colour + 28 * texture + 12 * colour
    sky = sky + 6 * pink(1.6)[:, :, None]
    mask = (y > horizon + 0.03 * pink(1.8)[:, :, None]).astype(np.float64)
    pixels = sky * (1 - mask) + ground * mask
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(3, 7)):  # objects: shaded ellipses with their own texture
        cx, cy = rng.uniform(0, width), rng.uniform(height * horizon, height)
        rx, ry = rng.uniform(20, 140), rng.uniform(20, 110)
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        alpha = np.clip((1.0 - inside) * 6, 0, 1)[:, :, None]
        shade = 0.6 + 0.4 * np.clip(1 - (yy - (cy - ry)) / (2 * ry), 0, 1)[:, :, None]
        obj = rng.uniform(0, 255, 3) * shade + 20 * texture
        pixels = pixels * (1 - alpha) + obj * alpha
    pixels += rng.normal(0, 3, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def synthesize(folder: Path, count: int, seed: int = 0, quality: int = 90) -> list[Path]:
    """``count`` JPEGs in ``folder`` (kept between runs: same seed, same files)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img-{seed}-{i:04d}.jpg"
        if not path.exists():
            rng = np.random.default_rng([seed, i])
            tmp = path.with_suffix(".tmp")
            Image.fromarray(natural_image(rng)).save(tmp, format="JPEG", quality=quality)
            tmp.replace(path)
        paths.append(path)
    return paths


def dataset_folder(workdir: Path, files: list[Path], count: int) -> Path:
    """A folder holding exactly the first ``count`` images (hard links)."""
    folder = workdir / f"dataset-{count}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in files[:count]:
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copy2(f, folder / f.name)
    return folder


def folder_bytes(folder: Path) -> int:
    """The bytes of the files in ``folder``: what a run's read tasks hand to
    its inference actors through the object store (the files, encoded)."""
    return sum(p.stat().st_size for p in folder.iterdir())


# --- models ---------------------------------------------------------------------
def resolve_model(args: argparse.Namespace, workdir: Path) -> Path:
    """``--model``, else the stand-in at ``--channels-divisor``, smooth with
    ``--smooth`` (built once, cached)."""
    if args.model:
        return Path(args.model).resolve()
    from batchdet.model.fetch import resolve_model_path
    from batchdet.model.standin import write_standin

    name = ("standin-ssd1200" + ("-smooth" if args.smooth else "")
            + ("" if args.channels_divisor == 1 else f"-div{args.channels_divisor}") + ".onnx")
    path = resolve_model_path(None).with_name(name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building the stand-in ({name}) ...", flush=True)
        write_standin(path, seed=0, channels_divisor=args.channels_divisor, smooth=args.smooth)
    return path


def model_config(args: argparse.Namespace, model: Path) -> dict:
    """What a result records of the model it timed."""
    from batchdet.model.spec import check_model

    info = check_model(model)
    return {"model": str(model), "model_sha256": info.sha256, "model_kind": info.kind, "parameters": info.parameters,
            "channels_divisor": None if args.model else args.channels_divisor}


def near_free_model(path: Path) -> Path:
    """A model that meets batchdet's interface and costs ~1 ms: the mean of
    each channel decides three boxes, so nothing is constant-folded away.
    What remains of a run's time with it is the pipeline's own cost."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from batchdet.model.spec import INPUT_NAME, INPUT_SIZE

    def const(name: str, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["mean"], axes=[1, 2, 3], keepdims=0),  # [1]
        helper.make_node("Mul", ["mean", "tiny"], ["shift"]),
        helper.make_node("Add", ["boxes_c", "shift"], ["bboxes"]),  # [1,3,4] + [1]
        helper.make_node("Add", ["scores_c", "shift"], ["scores"]),
        helper.make_node("Identity", ["labels_c"], ["labels"]),
    ]
    graph = helper.make_graph(
        nodes, "near_free",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("bboxes", TensorProto.FLOAT, [1, 3, 4]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 3]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3])],
        [const("tiny", [1e-6]), const("boxes_c", [[[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8], [0, 0, 1, 1]]]),
         const("scores_c", [[0.9, 0.6, 0.3]]), const("labels_c", [[1, 3, 18]], np.int64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def threads(args: argparse.Namespace) -> int:
    """``--threads``, else one per CPU, at most 4."""
    return args.threads or min(os.cpu_count() or 1, 4)


# --- /proc: CPU, memory, other people's load -------------------------------------
def busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine so far, in clock ticks."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle


class Phase:
    """Wall time of a phase and how many cores other people's processes used meanwhile."""

    def __init__(self, own_cpu_seconds: Callable[[], float]):
        self.own = own_cpu_seconds  # CPU seconds used so far by what we measure

    def __enter__(self) -> "Phase":
        self.t0, self.j0, self.c0 = time.perf_counter(), busy_jiffies(), self.own()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        busy = (busy_jiffies() - self.j0) / os.sysconf("SC_CLK_TCK")
        self.foreign_cores = others_cores(busy, self.own() - self.c0, self.wall)


def others_cores(busy_s: float, own_s: float, wall_s: float) -> float:
    """Cores the rest of the machine used: its busy CPU seconds less ours, over the wall time."""
    return max(0.0, (busy_s - own_s) / wall_s) if wall_s > 0 else 0.0


def own_cpu() -> float:
    """CPU seconds of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def own_and_children_cpu() -> float:
    """CPU seconds of this process and of its children it has waited for."""
    return sum(os.times()[:4])


def proc_children() -> dict[int, list[int]]:
    """ppid → child pids, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(PSS, RSS) in bytes from /proc/PID/smaps_rollup, or None if gone."""
    pss = rss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    except OSError:
        return None
    return (pss, rss) if pss is not None and rss is not None else None


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def peak_rss_kb() -> int:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` over fork and exec, so a child would report the
    parent's peak instead of its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux


def rss_bytes() -> int:
    """This process's resident bytes now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TreeSampler(threading.Thread):
    """CPU seconds of every process of a tree, and with ``memory`` its peak
    memory, read from /proc every ``interval`` s and once more at the end: a
    process that exits in between keeps its last reading.

    Memory is the sum of PSS (proportional set size), which splits each
    shared page among the processes mapping it, so Ray's object store (a
    shared mapping held by the raylet and the workers reading from it) counts
    once; summed RSS is given too. Processes are grouped by :func:`role`.
    """

    def __init__(self, pid: int, interval: float = 0.5, memory: bool = True):
        super().__init__(daemon=True)
        self.root, self.interval, self.memory = pid, interval, memory
        self.peak_pss = self.peak_rss = self.peak_processes = self.samples = 0
        self.peak_by_role: dict[str, int] = {}
        self.cpu_seen: dict[int, float] = {}
        self._halt = threading.Event()

    def tree(self) -> list[int]:
        """The root and all its descendants now."""
        children = proc_children()
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def role(self, pid: int) -> str:
        """``driver`` for the root (the process that called ``detect``), ``ray`` for every other."""
        return "driver" if pid == self.root else "ray"

    def sample(self) -> None:
        """One reading of every process of the tree; the peaks kept."""
        pss = rss = n = 0
        by_role: dict[str, int] = {}
        for pid in self.tree():
            cpu = proc_cpu_seconds(pid)
            mem = proc_memory(pid) if self.memory else (0, 0)
            if cpu is None or mem is None:
                continue
            self.cpu_seen[pid] = cpu
            pss, rss, n = pss + mem[0], rss + mem[1], n + 1
            by_role[self.role(pid)] = by_role.get(self.role(pid), 0) + mem[0]
        if n:
            self.samples += 1
            if pss > self.peak_pss:  # where the peak's memory was: what grows with the dataset
                self.peak_by_role = by_role
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, n)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the driver and of the rest, each process at its last reading."""
        by_role: dict[str, float] = {}
        for pid, cpu in self.cpu_seen.items():
            by_role[self.role(pid)] = by_role.get(self.role(pid), 0.0) + cpu
        return by_role

    def run(self) -> None:
        # Reading smaps_rollup costs ~50 ms of CPU a pass (the kernel walks
        # every process's page tables), all taken from the pipeline being
        # measured: hence memory samples seconds apart. At niceness 19, below
        # Ray's workers (15), it does not preempt the actors whenever it
        # wakes, as it would at 0.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop sampling, after one last reading now."""
        self._halt.set()
        self.join()
        self.sample()


# --- detect in a fresh process ----------------------------------------------------------
def detect_child(spec: dict) -> None:
    """The child :func:`run_detect` starts: one ``detect`` on an embedded Ray
    this process starts itself, so that the CPU of every process of the run
    can be read before Ray stops (its workers go with it), and so that the
    run is on Ray at any size (``detect`` runs on a Ray its caller started;
    alone, it would run a small set in-process). Writes the run's record to
    ``spec["result"]`` as JSON."""
    import ray

    from batchdet.api import detect
    from batchdet.pipeline.run import local_ray_options

    polls: list[tuple[float, int, float | None]] = []  # (seconds since the start, images done, rate)
    sampler = TreeSampler(os.getpid(), memory=False)
    t = time.perf_counter()
    ray.init(**local_ray_options())
    ray_start = time.perf_counter() - t
    sampler.start()
    result = detect(spec["datasets"], spec["output"], **spec["options"],
                    on_progress=lambda p: polls.append((time.perf_counter() - t, p.done, p.rate)))
    wall = time.perf_counter() - t
    sampler.stop()
    ray.shutdown()
    write_json(Path(spec["result"]), {
        "wall_s": wall, "ray_start_s": ray_start, "progress": polls, "cpu_s_by_role": sampler.cpu_by_role(),
        "driver_rss_mb": peak_rss_kb() / 1024, "files": len(result.files),
        "datasets": {name: dataclasses.asdict(c) for name, c in result.datasets.items()}})


def run_detect(datasets: dict[str, str], output: Path, result: Path, options: dict, memory_interval: float = 5.0,
               source: str | None = None) -> dict:
    """``detect`` in a fresh process (its own embedded Ray), its process tree
    sampled from here for peak memory; ``source``: another checkout of
    batchdet to run instead of this one. The child's record (:func:`detect_child`)
    with the memory, the whole process's wall time and the cores others used."""
    shutil.rmtree(output, ignore_errors=True)
    spec = {"datasets": datasets, "output": str(output), "result": str(result), "options": options}
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1")
    if source:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    log = result.with_suffix(".log")
    with open(log, "w") as logf, Phase(lambda: 0.0) as ph:
        # Ray puts the driver's working directory first on its workers' path: run there
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--detect-child", json.dumps(spec)],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=source)
        sampler = TreeSampler(proc.pid, memory_interval)
        sampler.start()
        code = proc.wait()
        sampler.stop()
    if code != 0:
        raise SystemExit(f"detect over {datasets} failed (exit {code}); see {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    record = json.loads(result.read_text())
    cpu = sum(record["cpu_s_by_role"].values())
    return {**record, "cpu_s": cpu, "process_wall_s": ph.wall, "others_cores": max(0.0, ph.foreign_cores - cpu / ph.wall),
            "peak_memory_bytes": sampler.peak_pss, "peak_rss_sum_bytes": sampler.peak_rss,
            "peak_processes": sampler.peak_processes, "peak_memory_by_role": sampler.peak_by_role,
            "memory_samples": sampler.samples}


def progress_figures(polls: list[tuple[float, int, float | None]], wall_s: float) -> dict:
    """What ``detect``'s progress reports (``on_progress``, about once a
    second) say of a run: when the first images were done (start-up: Ray,
    actors, model load, a first block), the rate once running (batchdet's
    own, from the first finished block to the last: None with one block),
    and the tail from the last report to ``detect``'s return (the commit)."""
    done = [(t, rate) for t, n, rate in polls if n > 0]
    if not done:
        return {"first_done_s": None, "steady_images_per_s": None, "tail_s": None}
    return {"first_done_s": done[0][0], "steady_images_per_s": done[-1][1], "tail_s": wall_s - done[-1][0]}


# --- arithmetic every script's figures are made of ----------------------------------------
def marginal(small: dict, large: dict, key: str) -> float:
    """Per extra image between two runs (``images`` each): the change of ``key`` over the change of images."""
    return (large[key] - small[key]) / (large["images"] - small["images"])


def marginal_rate(small: dict, large: dict) -> float | None:
    """Extra images over extra wall time between two runs: start-up and the
    final commit, paid once per run, cancel. None if the larger was not slower."""
    extra = large["wall_s"] - small["wall_s"]
    return (large["images"] - small["images"]) / extra if extra > 0 else None


def growth(small: float, large: float) -> float:
    """How much ``large`` exceeds ``small``, as a fraction of it."""
    return large / small - 1


def grouped_marginal(small: dict[str, float], large: dict[str, float], extra: int) -> dict[str, float]:
    """Per key of either, the change from ``small`` to ``large`` per one of ``extra`` (missing keys: 0)."""
    return {k: (large.get(k, 0.0) - small.get(k, 0.0)) / extra for k in sorted(set(small) | set(large))}


# --- timing ---------------------------------------------------------------------
def min_per_item(fns: dict, items: list, reps: int) -> dict[str, float]:
    """Seconds per item for each function, interleaved item by item; per item
    the fastest of ``reps`` tries (the least disturbed), then the mean over items."""
    best = {name: [float("inf")] * len(items) for name in fns}
    for _ in range(reps):
        for i, item in enumerate(items):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(item)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
    return {name: statistics.fmean(v) for name, v in best.items()}


# --- bare onnxruntime -----------------------------------------------------------------
def float_session(model: Path, threads: int):
    """The model as given (float input ``image``) with batchdet's session options."""
    import onnxruntime as ort

    from batchdet.pipeline.inference import session_options

    return ort.InferenceSession(str(model), session_options(threads), providers=["CPUExecutionProvider"])


def ready_inputs(files: list[Path]) -> list[np.ndarray]:
    """The model's float32 inputs of ``files``, prepared ahead: the bare loops time the model alone."""
    from batchdet.pipeline.preprocess import preprocess

    return [preprocess(f.read_bytes())[0] for f in files]


def timed_runs(session, inputs: list[np.ndarray]) -> list[float]:
    """Seconds of each ``session.run`` over ``inputs``."""
    from batchdet.model.spec import INPUT_NAME

    times = []
    for x in inputs:
        t = time.perf_counter()
        session.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - t)
    return times


#: Ray runs its workers at this niceness (its ``worker_niceness``, 15 unless
#: RAY_worker_niceness says otherwise); the bare loop runs at the same, so
#: that other people's processes take CPU from both alike.
RAY_WORKER_NICENESS = 15


def niced_executor(nice: int, workers: int = 1):
    """``workers`` threads at niceness ``nice`` (Linux: niceness is per thread,
    and the threads onnxruntime starts inherit their creator's) for the bare runs."""
    from concurrent.futures import ThreadPoolExecutor

    def init() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)  # who=0: this thread only
        except (AttributeError, OSError):
            pass

    return ThreadPoolExecutor(max_workers=workers, initializer=init)


def bare_segment(session, inputs: list[np.ndarray], label: str) -> dict:
    """One session over ``inputs``. One image first, kept out of the rate:
    after minutes idle the session's first run is slower (1.33x the segment's
    mean in one run), which is no property of the loop."""
    rewarm = timed_runs(session, inputs[:1])[0]
    c0 = own_cpu()
    with Phase(own_cpu) as ph:
        times = timed_runs(session, inputs)
    seg = {"label": label, "images": len(times), "wall_s": ph.wall, "s_per_image": statistics.fmean(times),
           "times": times, "rewarm_s": rewarm,
           "cpu_s_per_image": (own_cpu() - c0) / len(times),
           "images_per_s": len(times) / sum(times), "foreign_cpu_cores": ph.foreign_cores}
    print(f"  bare {label}, one session: {seg['s_per_image']:.3f} s/image  "
          f"(others used {ph.foreign_cores:.2f} cores)", flush=True)
    return seg


def bare_split_segment(sessions: list, inputs: list[np.ndarray], label: str, pool) -> dict:
    """The other layout of the same CPUs: one single-threaded session per CPU,
    all looping over the inputs at once (``pool``: a thread each). Its rate is
    every image over the wall time from first start to last finish."""
    for session in sessions:
        timed_runs(session, inputs[:1])  # re-warm, as bare_segment does
    c0 = own_cpu()
    with Phase(own_cpu) as ph:
        t = time.perf_counter()
        times = [f.result() for f in [pool.submit(timed_runs, s, inputs) for s in sessions]]
        wall = time.perf_counter() - t
    n = sum(len(t) for t in times)
    seg = {"label": label, "images": n, "wall_s": wall, "s_per_image": wall / n,
           "session_s_per_image": statistics.fmean(x for t in times for x in t),
           "cpu_s_per_image": (own_cpu() - c0) / n, "images_per_s": n / wall, "foreign_cpu_cores": ph.foreign_cores}
    print(f"  bare {label}, {len(sessions)} single-thread sessions: {seg['s_per_image']:.3f} s/image  "
          f"(others used {ph.foreign_cores:.2f} cores)", flush=True)
    return seg


def _bare_path_worker(model: str, files: list[str], spawned: float, barrier, out) -> None:
    """One process of :func:`bare_path_segment`: a 1-thread session, one warm-up image, then the timed loop."""
    os.nice(RAY_WORKER_NICENESS)  # as Ray's workers run
    from batchdet.pipeline.inference import OnnxBackend
    from batchdet.pipeline.preprocess import prepare

    backend = OnnxBackend(model, threads=1).load()
    loaded = time.time() - spawned  # a bare loop's own start-up: interpreter, imports, session
    buffer = np.empty((1, 3, 1200, 1200), np.float32)  # reused, as an actor's
    backend.predict(prepare(Path(files[0]).read_bytes(), out=buffer).tensor)
    barrier.wait()
    t, c = time.perf_counter(), time.process_time()
    for f in files:
        backend.predict(prepare(Path(f).read_bytes(), out=buffer).tensor)
    out.put((time.perf_counter() - t, time.process_time() - c, len(files), loaded))


def bare_path_segment(model: Path, folder: Path, per_process: int) -> dict:
    """The whole per-image path with no Ray (read the file → ``prepare`` →
    ``session.run``) in one process per CPU, each a 1-thread
    session at Ray's worker niceness (batchdet's CPU layout), all started together."""
    import multiprocessing

    cpus = os.cpu_count() or 1
    files = sorted(str(p) for p in folder.iterdir())
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(cpus + 1), ctx.Queue()  # + this process: the phase starts with the timed loops
    procs = [ctx.Process(target=_bare_path_worker, args=(str(model), files[i::cpus][:per_process], time.time(),
                                                         barrier, out)) for i in range(cpus)]
    for p in procs:
        p.start()
    barrier.wait()
    with Phase(own_cpu) as ph:
        results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return bare_path_figures(results, ph.foreign_cores, ph.wall)


def bare_path_figures(results: list[tuple[float, float, int, float]], busy_cores: float, wall_s: float) -> dict:
    """A bare path segment's figures from each process's (wall s, CPU s,
    images, start-up s): all images over the slowest process's wall time, CPU
    per image, and the cores others used (the phase counts the workers as others)."""
    images = sum(r[2] for r in results)
    cpu = sum(r[1] for r in results)
    return {"processes": len(results), "images": images, "images_per_s": images / max(r[0] for r in results),
            "cpu_ms_per_image": 1e3 * cpu / images, "start_up_s": max(r[3] for r in results),
            "others_cores": max(0.0, busy_cores - cpu / wall_s)}


# --- report ----------------------------------------------------------------------------------
def judge(targets: dict[str, tuple[str, float]], values: dict[str, float | None],
          loads: dict[str, float]) -> dict[str, dict]:
    """Each target's value, whether it is met, and whether others' load left it reliable."""
    judged = {}
    for name, (op, bound) in targets.items():
        value = values[name]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        judged[name] = {"value": value, "target": f"{op} {bound}", "met": met, "others_cores": loads[name],
                        "reliable": loads[name] <= NOISY_CORES}
    return judged


def table(rows: list[tuple[str, str, str]], targets: dict[str, dict]) -> str:
    """``rows`` (measure, value, note) aligned, then a line of targets."""
    rows = [("measure", "value", "note"), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append("targets: " + ", ".join(
        f"{k} {v['target']}: {'n/a' if v['value'] is None else round(v['value'], 3)} "
        f"{'met' if v['met'] else ('MISSED' if v['met'] is False else '')}"
        f"{'' if v['reliable'] else ' (noisy: others used ' + format(v['others_cores'], '.2f') + ' cores)'}"
        for k, v in targets.items()))
    return "\n".join(lines)


def markdown(rows: list[tuple[str, str, str]], res: dict) -> str:
    """The rows, the targets and the machine, as Markdown (written beside the JSON)."""
    out = ["| measure | value | note |", "| --- | --- | --- |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", "| target | value | met | others' load (cores) |", "| --- | --- | --- | --- |"]
    for k, v in res["targets"].items():
        val = "n/a" if v["value"] is None else f"{v['value']:.3f}"
        met = "n/a" if v["met"] is None else ("yes" if v["met"] else "**no**")
        out.append(f"| {k} {v['target']} | {val} | {met} | {v['others_cores']:.2f}"
                   f"{'' if v['reliable'] else ' (noisy)'} |")
    m = res["machine"]
    out += ["", f"Machine: {m['nproc']} CPUs, {m['cpu_model']} ({' '.join(m['cpu_flags'])}), "
                f"{m['memory_gb']} GB; Python {m['python']}, onnxruntime {m['onnxruntime']}, Ray {m['ray']}. "
                f"Commit {res['commit']}. Command: `{res['config']['command']}`."]
    return "\n".join(out) + "\n"


def write_report(out: Path, res: dict, rows: list[tuple[str, str, str]]) -> None:
    """The results as JSON at ``out`` and Markdown beside it; the table printed."""
    write_json(out, res)
    out.with_suffix(".md").write_text(markdown(rows, res))
    print()
    print(table(rows, res["targets"]))
    print(f"\nwritten: {out}  ({res['elapsed_s']:.0f} s)")


if __name__ == "__main__" and sys.argv[1:2] == ["--detect-child"]:
    detect_child(json.loads(sys.argv[2]))
