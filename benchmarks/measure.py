"""What the measuring scripts share beyond harness.py: the synthesized photos
and the model they time, /proc readers (CPU, memory, how busy everyone else
was) and onnxruntime's bare loop at Ray's worker niceness, and the report
(a table of measures, then each target met or missed) every script prints
and writes as JSON and Markdown."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT = 640, 480
#: Other people's load (cores) above which a phase's timings are flagged as noisy.
NOISY_CORES = 0.3


# --- images ---------------------------------------------------------------------
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


# --- model ----------------------------------------------------------------------
def resolve_model(args: argparse.Namespace, workdir: Path) -> Path:
    """``--model``, else the stand-in at ``--channels-divisor`` (built once, cached)."""
    if args.model:
        return Path(args.model).resolve()
    from batchdet.model.fetch import resolve_model_path
    from batchdet.model.standin import write_standin

    name = "standin-ssd1200.onnx" if args.channels_divisor == 1 else f"standin-ssd1200-div{args.channels_divisor}.onnx"
    path = resolve_model_path(None).with_name(name)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building the stand-in ({name}) ...", flush=True)
        write_standin(path, seed=0, channels_divisor=args.channels_divisor)
    return path


def model_config(args: argparse.Namespace, model: Path) -> dict:
    """What a result records of the model it timed."""
    from batchdet.model.spec import check_model

    info = check_model(model)
    return {"model": str(model), "model_sha256": info.sha256, "model_kind": info.kind, "parameters": info.parameters,
            "channels_divisor": None if args.model else args.channels_divisor}


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

    def __init__(self, own_cpu_seconds):
        self.own = own_cpu_seconds  # callable: CPU seconds used so far by what we measure

    def __enter__(self):
        self.t0, self.j0, self.c0 = time.perf_counter(), busy_jiffies(), self.own()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy = (busy_jiffies() - self.j0) / os.sysconf("SC_CLK_TCK")
        self.foreign_cores = max(0.0, (busy - (self.own() - self.c0)) / self.wall) if self.wall > 0 else 0.0


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


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
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def proc_name(pid: int) -> str:
    """A process's role: Ray names its workers ``ray::<task or actor>``; others
    by their program (``raylet``, ``gcs_server``, ``python``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(" ")[0]
    script = next((a.decode(errors="replace") for a in argv[1:2] if a.endswith(b".py")), "")
    return " ".join(filter(None, [Path(first).name, Path(script).name]))


class TreeSampler(threading.Thread):
    """Peak memory of a process and all its descendants, sampled every ``interval`` s.

    PSS (proportional set size) splits each shared page among the processes
    mapping it, so the sum counts Ray's object store (a shared mapping held
    by the raylet and the workers reading from it) once. RSS summed is given
    too; it counts shared pages once per process. Read from /proc directly
    (smaps_rollup), so Linux only and no dependency.
    """

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root = pid
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_processes = 0
        self.peak_by_process: dict[str, int] = {}
        self.samples = 0
        self.cpu_seen: dict[int, float] = {}
        self._halt = threading.Event()

    def tree(self) -> list[int]:
        children = proc_children()
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(children.get(pid, []))
        return pids

    def sample(self) -> None:
        pss = rss = n = 0
        by_process: dict[str, int] = {}
        for pid in self.tree():
            mem = proc_memory(pid)
            cpu = proc_cpu_seconds(pid)
            if mem is None or cpu is None:
                continue
            pss += mem[0]
            rss += mem[1]
            n += 1
            self.cpu_seen[pid] = cpu
            name = proc_name(pid)
            by_process[name] = by_process.get(name, 0) + mem[0]
        if n:
            self.samples += 1
            if pss > self.peak_pss:  # where the peak's memory was: what grows with the dataset
                self.peak_by_process = dict(sorted(by_process.items(), key=lambda kv: -kv[1]))
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, n)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_seen.values())

    def run(self) -> None:
        # Reading smaps_rollup costs ~50 ms of CPU a pass (the kernel walks
        # every process's page tables), all taken from the pipeline being
        # measured: 0.07 core at one pass a second (perf sched), hence the
        # 5-s default. At niceness 19, below Ray's workers (15), it does not
        # preempt the actors whenever it wakes, as it would at 0.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


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
    from batchdet.pipeline.preprocess import preprocess

    return [preprocess(f.read_bytes())[0] for f in files]


def timed_runs(session, inputs: list[np.ndarray]) -> list[float]:
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
    """One image first, kept out of the rate: after minutes idle the session's
    first run is slower (1.33x the segment's mean in one run), which is no
    property of the loop."""
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, res))
    print()
    print(table(rows, res["targets"]))
    print(f"\nwritten: {out}  ({res['elapsed_s']:.0f} s)")


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    """The arguments every measuring script takes: the model, where to work and where to write."""
    p.add_argument("--model", help="ONNX model (default: the full stand-in, built once into the cache)")
    p.add_argument("--channels-divisor", type=int, default=1, help="stand-in width divisor (8 for a fast smoke run)")
    p.add_argument("--workdir", help="images, outputs and logs (default: work/ beside --out)")
    p.add_argument("--out", default=out)


def workdir(args: argparse.Namespace) -> Path:
    """``--workdir``, else ``work/`` beside ``--out``; created."""
    folder = Path(args.workdir) if args.workdir else Path(args.out).parent / "work"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def command(argv: list[str] | None) -> str:
    """The command line that made a result, for its report."""
    return " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
