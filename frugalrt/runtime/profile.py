"""``frugalrt profile``: latency distribution, per-op breakdown and footprint of a compiled artifact.

Latency: ``warmup`` runs, then ``runs`` single-run repeats (or as many as fit in ``duration``
seconds) of the VM's C++ time evaluator *on the device* (``invoke_stateful`` on inputs bound once),
so neither Python nor RPC round trips are timed. Inputs: the golden ones recorded at export, a
file (``.npy``, ``.npz`` keyed by input name) or seeded random ones of a given batch.

Per-op breakdown: TVM 0.27 has no profiler, and an instrument callback (``set_instrument``) costs
microseconds per call, more than a small model's kernels, so it only records the calls of one
inference; each kernel is then timed alone on the arguments it got, in rounds that also time the
whole inference (``frugalrt.vm_kernel_profile``, run *on the device*: a callback cannot cross RPC).
Kernels are named by the ONNX nodes they compute (``opnames.json``, recorded at compile time,
fusions included); the ``VM runtime`` row is the rest of the inference (builtins: allocation,
shape checks; dispatch), measured as the whole minus the kernels of the same rounds. Workspace =
bytes the VM allocates for intermediates per inference (``alloc_storage``). On emulated devices
wall times are labelled "emulated (not representative)" and the deterministic instruction count of
one inference (qemu TCG plugin) is reported as the speed proxy.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import open_device

EMULATED_LABEL = "emulated (not representative)"
RUNTIME = "VM runtime"  # the row of what is not a kernel: builtins (allocation, shape checks), dispatch
COVERAGE_TOLERANCE = 0.15  # the per-op sum must be within this of the median latency, or the report says why
PERCENTILES = (50, 90, 95, 99)
SEED = 0  # of --batch's random inputs
MAX_RUNS = 100_000  # --duration's cap on timed runs (the samples travel back over RPC)


@dataclass
class OpTime:
    name: str  # the ONNX node(s) a kernel computes ("a+b" when fused), else the kernel's symbol
    calls: float  # per inference
    ms: float  # per inference (median over the rounds)
    share: float  # of the median latency
    op_type: str = ""  # ONNX op type(s) of the nodes; "runtime" for the VM runtime row
    kernel: str = ""  # the compiled function (TVM PrimFunc symbol)
    order: int = 0  # position of the call in an inference
    samples_ms: list[float] = field(default_factory=list)  # per round


@dataclass
class ProfileReport:
    artifact: str
    device: str
    target: str
    device_info: dict[str, Any]
    batch: int
    runs: int
    warmup: int
    latency_ms: dict[str, float]
    samples_ms: list[float]
    throughput: dict[str, float]
    param_bytes: int | None
    workspace_bytes: int | None
    ops: list[OpTime] | None
    ops_note: str
    instructions: dict[str, Any] | None = None
    baseline: "ProfileReport | None" = None
    notes: list[str] = field(default_factory=list)
    threads: int | None = None  # TVM runtime threads (None: the device's default)
    inputs: str = "golden"  # golden, a file name, or "random (seed 0)"
    input_shapes: list[list[int]] = field(default_factory=list)
    ops_sum_ms: float | None = None  # kernels + VM runtime, per inference
    kernels_ms: float | None = None  # kernels alone, per inference
    plan_latency_ms: dict[str, float] | None = None  # local: frugalrt.load's call (static plan, no VM), from Python

    @property
    def emulated(self) -> bool:
        return bool(self.device_info.get("emulated"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        lat, label = self.latency_ms, f" [{EMULATED_LABEL}]" if self.emulated else ""
        threads = f", {self.threads} thread(s)" if self.threads else ""
        lines = [f"profile of {self.artifact} ({self.target}) on {self.device}"
                 f" [{self.device_info.get('kind', 'unknown device')}], batch {self.batch}{threads}, "
                 f"inputs {self.inputs}, {self.runs} runs after {self.warmup} warm-up",
                 f"latency ms{label}: " + "  ".join(f"{k} {lat[k]:.4g}" for k in _STATS if k in lat),
                 f"throughput{label}: {self.throughput['inferences_per_s']:.1f} inferences/s, "
                 f"{self.throughput['samples_per_s']:.1f} samples/s",
                 f"parameters {_size(self.param_bytes)}, workspace {_size(self.workspace_bytes)}"]
        if self.instructions:
            i = self.instructions
            lines.append(f"instructions per inference (batch {i['batch']}): {i['instructions']:,} "
                         f"({i['unit']}; {i['scope']}; {i['device']})")
        if self.ops:
            lines.append(f"{'op (ONNX node)':<30}{'type':<14}{'kernel':<28}{'calls':>6}{'ms/inf':>10}{'share':>8}")
            lines += [f"{o.name[:29]:<30}{o.op_type[:13]:<14}{o.kernel[:27]:<28}{o.calls:>6.3g}{o.ms:>10.4f}"
                      f"{o.share:>8.1%}" for o in self.ops]
        lines.append(f"per-op: {self.ops_note}")
        lines += self.notes
        if self.baseline:
            b = self.baseline
            lines += ["", "baseline:", b.table(), "",
                      f"speed-up vs baseline (median latency{label}): "
                      f"{b.latency_ms['median'] / self.latency_ms['median']:.2f}x"]
            if self.instructions and b.instructions:
                lines.append(f"speed-up vs baseline (instructions per inference): "
                             f"{b.instructions['instructions'] / self.instructions['instructions']:.2f}x")
            if self.param_bytes and b.param_bytes:
                lines.append(f"parameter bytes vs baseline: {self.param_bytes / b.param_bytes:.3f}x")
        return "\n".join(lines)

    def csv(self) -> str:
        """One row per op (the report's order), with the latency figures it is measured against."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["name", "op_type", "kernel", "order", "calls", "ms", "share", "latency_median_ms"])
        for o in self.ops or []:
            writer.writerow([o.name, o.op_type, o.kernel, o.order, o.calls, repr(o.ms), repr(o.share),
                             repr(self.latency_ms["median"])])
        return out.getvalue()

    def trace(self) -> str:
        """Chrome trace event JSON (chrome://tracing, Perfetto): the measured rounds laid out in call order,
        one complete event ("ph": "X", ts/dur in µs) per kernel call and one for the VM runtime."""
        ops = sorted(self.ops or [], key=lambda o: o.order)
        rounds = min((len(o.samples_ms) for o in ops), default=0)
        events, ts = [], 0.0
        for r in range(rounds):
            for o in ops:
                dur = o.samples_ms[r] * 1e3
                events.append({"name": o.name, "cat": o.op_type or "op", "ph": "X", "ts": round(ts, 3),
                               "dur": round(dur, 3), "pid": 1, "tid": 1,
                               "args": {"kernel": o.kernel, "round": r, "order": o.order}})
                ts += dur
        meta = {"artifact": self.artifact, "device": self.device, "target": self.target, "batch": self.batch,
                "note": self.ops_note}
        return json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}, indent=0)


_STATS = ("mean", "median", "p50", "p90", "p95", "p99", "min", "max", "std")


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,} B"


def latency_stats(seconds: list[float], batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """mean/median/p50/p90/p95/p99/min/max/std in ms, and throughput from the mean."""
    ms = np.asarray(seconds, np.float64) * 1e3
    stats = {"mean": ms.mean(), "median": np.median(ms), "min": ms.min(), "max": ms.max(), "std": ms.std(),
             **{f"p{q}": np.percentile(ms, q) for q in PERCENTILES}}
    stats = {k: float(stats[k]) for k in _STATS}
    per_s = 1e3 / stats["mean"]
    return stats, {"inferences_per_s": per_s, "samples_per_s": per_s * batch}


def op_breakdown(raw: dict, names: list[dict] | None, latency_ms: float) -> tuple[list[OpTime], int, dict]:
    """Per-op rows from ``vm_kernel_profile``'s JSON: each kernel call named by ``names`` (the
    artifact's ``opnames.json``; None: by symbol), a VM runtime row (whole minus kernels, per round),
    the workspace bytes, and the sums {"kernels", "total"} (ms per inference)."""
    times = np.asarray(raw["times"], np.float64).reshape(len(raw["whole"]), -1) * 1e3
    whole = np.asarray(raw["whole"], np.float64) * 1e3
    symbols = [raw["calls"][i][0] for i in raw["kernels"]]
    labels = _labels(symbols, names)
    ops = [OpTime(name, 1, float(np.median(times[:, k])), 0.0, op_type, symbol, raw["kernels"][k],
                  [float(t) for t in times[:, k]]) for k, (symbol, (name, op_type)) in enumerate(zip(symbols, labels))]
    rest = np.maximum(whole - times.sum(axis=1), 0.0)
    builtins = sum(1 for symbol, _ in raw["calls"] if symbol.startswith("vm.builtin."))
    ops.append(OpTime(RUNTIME, builtins, float(np.median(rest)), 0.0, "runtime", "vm.builtin.*", len(raw["calls"]),
                      [float(t) for t in rest]))
    for o in ops:
        o.share = o.ms / latency_ms if latency_ms > 0 else 0.0
    sums = {"kernels": sum(o.ms for o in ops[:-1]), "total": sum(o.ms for o in ops)}
    workspace = sum(size for _, size in raw["calls"])
    return sorted(ops, key=lambda o: -o.ms), workspace, sums


def _labels(symbols: list[str], names: list[dict] | None) -> list[tuple[str, str]]:
    """(ONNX node names, op types) of each kernel call: the k-th call of a symbol is the k-th entry of
    that symbol in ``names``; calls it does not list keep their symbol (e.g. ``shape_func``)."""
    listed: dict[str, list[dict]] = {}
    for entry in names or []:
        listed.setdefault(entry["kernel"], []).append(entry)
    seen: dict[str, int] = {}
    labels = []
    for symbol in symbols:
        k = seen[symbol] = seen.get(symbol, -1) + 1
        entries = listed.get(symbol, [])
        nodes = entries[k]["nodes"] if k < len(entries) and len(entries) == symbols.count(symbol) else []
        if nodes:
            types = list(dict.fromkeys(n["op_type"] for n in nodes))
            labels.append(("+".join(n["name"] for n in nodes), "+".join(types)))
        else:
            labels.append((symbol, "runtime" if symbol == "shape_func" else "kernel"))
    return labels


class _Driver:
    """The VM of a local or remote session, with its device and a way to bound blocking calls."""

    def __init__(self, session):
        if not hasattr(session, "vm"):
            raise DeviceError(f"{type(session).__name__} cannot be profiled here: profile runs on "
                              "local, rpc:// and tracker:// devices (c-bundles: profile --emulate)")
        import tvm

        self.session, self.vm = session, session.vm
        self.dev = getattr(session, "dev", None) or tvm.cpu()
        self.call: Callable = getattr(session, "call", lambda fn, what: fn())
        self.remote = getattr(session, "remote", None)

    def info(self) -> dict:
        if self.remote is None:
            import platform

            return {"kind": "local", "machine": platform.machine(), "emulated": False}
        from frugalrt.runtime.remote import device_info

        return device_info(self.session)

    def function(self, name: str) -> Callable | None:
        """A global function of the device (None when a remote server lacks it)."""
        if self.remote is None:
            import tvm_ffi

            if name == "frugalrt.vm_kernel_profile":
                from frugalrt.runtime.emulator.serve import vm_kernel_profile

                return vm_kernel_profile
            return tvm_ffi.get_global_func(name)
        try:
            return self.call(lambda: self.remote.get_function(name), "lookup")
        except DeviceError:
            return None

    def set_threads(self, threads: int) -> None:
        """TVM's thread pool on the device: ``threads`` workers (``runtime.config_threadpool``, big cores)."""
        config = self.function("runtime.config_threadpool")
        if config is None:
            raise DeviceError(f"{self.session.__class__.__name__}: the device has no runtime.config_threadpool")
        self.call(lambda: config(1, threads), f"setting {threads} thread(s)")


def profile_session(session, artifact: Artifact, device: str, runs: int = 100, warmup: int = 10,
                    op_runs: int = 20, count: bool = True, inputs: list[np.ndarray] | None = None,
                    threads: int | None = 1, duration: float | None = None,
                    input_label: str = "golden") -> ProfileReport:
    """Profile an open session of ``artifact`` (see the module docstring for the method).

    ``inputs``: default the golden ones; ``threads``: TVM runtime threads (None: leave the device's
    setting); ``duration``: time runs for about that many seconds instead of ``runs``."""
    if hasattr(session, "profile_report"):  # the static runner (adb://, ssh://) times itself on the device
        return session.profile_report(runs, warmup, op_runs, duration, inputs, input_label)
    import tvm

    d = _Driver(session)
    inputs = default_inputs(artifact) if inputs is None else inputs
    artifact.check_inputs(inputs)
    if threads:
        d.set_threads(threads)
    d.call(lambda: d.vm.set_input("main", *[tvm.runtime.tensor(x, d.dev) for x in inputs]), "setting inputs")
    evaluator = lambda number, repeat: d.vm.time_evaluator(  # noqa: E731
        "invoke_stateful", d.dev, number=number, repeat=repeat)
    if warmup:
        d.call(lambda: evaluator(warmup, 1)("main"), f"{warmup} warm-up runs")
    if duration is not None:
        pilot = d.call(lambda: evaluator(1, 3)("main"), "3 pilot runs").results
        runs = max(1, min(MAX_RUNS, math.ceil(duration / max(float(np.median(pilot)), 1e-9))))
    seconds = list(d.call(lambda: evaluator(1, runs)("main"), f"{runs} timed runs").results)
    batch = int(inputs[0].shape[0]) if inputs[0].ndim else 1
    stats, throughput = latency_stats(seconds, batch)
    info = d.info()
    report = ProfileReport(str(artifact.path), device, artifact.target, info, batch, runs, warmup,
                           stats, [s * 1e3 for s in seconds], throughput,
                           artifact.manifest.get("param_bytes"), None, None, "", threads=threads,
                           inputs=input_label, input_shapes=[list(x.shape) for x in inputs])
    _per_op(report, d, artifact, op_runs, threads or 0)
    if getattr(session, "static_plan", None) is not None:
        report.plan_latency_ms = _plan_latency(session, inputs, runs, warmup)
        report.notes.append(f"frugalrt.load(...)(x) runs the static plan (the kernels in order, no VM): median "
                            f"{report.plan_latency_ms['median']:.4g} ms per call from Python, input copy included")
    if info.get("emulated"):
        report.notes.append(f"wall times are {EMULATED_LABEL}: qemu emulates NEON in software; "
                            "compare instruction counts instead")
        if count and info.get("kind") == "rpi4-emu":
            from frugalrt.runtime.emulator.count import count_instructions

            report.instructions = count_instructions(artifact.lib_path, inputs)
    return report


def _plan_latency(session, inputs: list[np.ndarray], runs: int, warmup: int) -> dict[str, float]:
    """Median, min and max ms of ``runs`` Python calls of a local session (what a user's code sees)."""
    import time

    for _ in range(max(warmup, 1)):
        session(*inputs)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session(*inputs)
        samples.append((time.perf_counter() - start) * 1e3)
    return {"median": float(np.median(samples)), "min": min(samples), "max": max(samples)}


def _per_op(report: ProfileReport, d: _Driver, artifact: Artifact, rounds: int, threads: int) -> None:
    """Fill the report's per-op rows, workspace and sums (or say why there are none)."""
    from frugalrt.targets import opnames

    profiler = d.function("frugalrt.vm_kernel_profile")
    if profiler is None:
        report.ops_note = ("unavailable: the server has no frugalrt.vm_kernel_profile (start devices with "
                           "`frugalrt device start`, or restart one started by an older frugalrt)")
        return
    raw = json.loads(d.call(lambda: profiler(d.vm.module, "main", rounds, threads), "per-op profile"))
    names = opnames.load(artifact.path)
    median = report.latency_ms["median"]
    report.ops, report.workspace_bytes, sums = op_breakdown(raw, names, median)
    report.kernels_ms, report.ops_sum_ms = sums["kernels"], sums["total"]
    report.ops_note = (f"each kernel timed alone on the device, once per round in call order ({rounds} rounds, "
                       f"medians), on the arguments of a real call; {RUNTIME} = whole inference "
                       f"minus kernels in the same rounds; per-op sum {sums['total']:.4g} ms = "
                       f"{sums['total'] / median:.0%} of the median latency, kernels alone "
                       f"{sums['kernels'] / median:.0%}")
    if names is None:
        report.notes.append("ops are named by kernel: the artifact has no opnames.json (compiled by an older "
                            "frugalrt; recompile to name them by ONNX node)")
    if abs(sums["total"] / median - 1) > COVERAGE_TOLERANCE:
        report.notes.append(f"per-op sum and median latency differ by more than {COVERAGE_TOLERANCE:.0%}: the "
                            "per-op rounds ran under other conditions than the timed runs (other load on the "
                            "device, frequency scaling), or kernels run faster or slower alone than in an "
                            "inference (caches); rerun on an idle device")


def default_inputs(artifact: Artifact) -> list[np.ndarray]:
    """The golden inputs recorded at export, else zeros with batch 1."""
    golden = artifact.golden()
    if golden:
        return [np.ascontiguousarray(x) for x in golden[0]]
    return [np.zeros([d if isinstance(d, int) else 1 for d in i["shape"]], i["dtype"]) for i in artifact.inputs]


def random_inputs(artifact: Artifact, batch: int, seed: int = SEED) -> list[np.ndarray]:
    """Seeded synthetic inputs with ``batch`` rows (normal floats; 0/1 for integers and booleans)."""
    bound = artifact.manifest.get("batch_bound")
    if isinstance(bound, int) and batch > bound:
        raise ArtifactError(f"--batch {batch} exceeds the artifact's batch_bound {bound} (recompile with "
                            f"--batch-bound {batch})")
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in artifact.inputs:
        shape = spec["shape"]
        if not shape or isinstance(shape[0], int) and shape[0] != batch:
            raise ArtifactError(f"input {spec['name']!r} has a fixed shape {shape}: --batch does not apply")
        shape = [batch] + [d if isinstance(d, int) else 1 for d in shape[1:]]
        dtype = np.dtype(spec["dtype"])
        x = rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 2, shape)
        arrays.append(np.ascontiguousarray(x.astype(dtype)))
    return arrays


def file_inputs(artifact: Artifact, path: str | os.PathLike) -> list[np.ndarray]:
    """Inputs from a ``.npy`` (a one-input model) or ``.npz`` (arrays named after the model's inputs)."""
    names = [spec["name"] for spec in artifact.inputs]
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            arrays = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else {None: data}
    except (OSError, ValueError) as e:
        raise ArtifactError(f"--input {path}: not a readable .npy/.npz file ({e})") from None
    if None in arrays:
        if len(names) != 1:
            raise ArtifactError(f"--input {path}: the model takes {len(names)} inputs ({', '.join(names)}): "
                                "pass an .npz with one array per input name")
        return [np.ascontiguousarray(arrays[None])]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ArtifactError(f"--input {path}: no array named {', '.join(missing)} (it has "
                            f"{', '.join(arrays) or 'none'}; the model's inputs are {', '.join(names)})")
    return [np.ascontiguousarray(arrays[n]) for n in names]


@dataclass
class Workload:
    """What each profiled inference runs on, and how long profiling times it."""

    input: str | os.PathLike | None = None  # .npy/.npz file; None: golden (or ``batch`` random rows)
    batch: int | None = None  # seeded random inputs with this batch
    threads: int | None = 1  # TVM runtime threads (None: the device's default)
    duration: float | None = None  # seconds of timed runs instead of a number of runs

    def inputs(self, artifact: Artifact) -> tuple[list[np.ndarray], str]:
        """The input arrays for ``artifact`` and how to name them in the report."""
        if self.input is not None:
            return file_inputs(artifact, self.input), os.fspath(self.input)
        if self.batch is not None:
            return random_inputs(artifact, self.batch), f"random (seed {SEED})"
        return default_inputs(artifact), "golden" if artifact.golden() else "zeros"


def profile(artifact_dir: str | os.PathLike, device: str = "local", runs: int = 100, warmup: int = 10,
            baseline: str | os.PathLike | None = None, count: bool = True,
            progress: Callable[[str], None] = lambda m: None, workload: Workload | None = None) -> ProfileReport:
    """Profile ``artifact_dir`` on ``device``; ``baseline`` (an ONNX model, e.g. the dense
    equivalent) is compiled for the same target and profiled the same way."""
    workload = workload or Workload()
    artifact = Artifact(artifact_dir)
    inputs, label = workload.inputs(artifact)
    progress(f"profiling {artifact.path} on {device}")
    session = open_device(artifact, device)
    try:
        report = profile_session(session, artifact, device, runs, warmup, count=count, inputs=inputs,
                                 threads=workload.threads, duration=workload.duration, input_label=label)
    finally:
        session.close()
    if baseline is not None:
        with compiled_baseline(baseline, artifact.target, progress) as path:
            report.baseline = profile(path, device, runs, warmup, None, count, progress, workload)
            report.baseline.artifact = str(baseline)
    return report


@contextlib.contextmanager
def compiled_baseline(model: str | os.PathLike, target: str, progress: Callable[[str], None]) -> Iterator[str]:
    """``model`` (e.g. the dense equivalent) compiled for ``target`` into a temporary artifact."""
    from frugalrt.targets.compile import compile as compile_model

    with tempfile.TemporaryDirectory(prefix="frugalrt-baseline-") as tmp:
        progress(f"compiling baseline {model} for {target}")
        path = os.path.join(tmp, "baseline")
        compile_model(model, target, path, progress=progress)
        yield path


def profile_many(artifact_dir: str | os.PathLike, tracker: str, devices: int, runs: int = 100,
                 warmup: int = 10, progress: Callable[[str], None] = lambda m: None,
                 workload: Workload | None = None) -> list[ProfileReport]:
    """Profile on ``devices`` servers of one tracker key at once (each session holds one server)."""
    from frugalrt.runtime.remote import DeviceAddress, tracker_servers

    addr = DeviceAddress.parse(tracker)
    if addr.scheme != "tracker":
        raise DeviceError(f"--devices needs a tracker://HOST:PORT/KEY device, got {tracker!r}")
    found = len(tracker_servers(addr.host, addr.port, addr.key, addr.timeout))
    if found < devices:
        raise DeviceError(f"tracker {addr.host}:{addr.port} has {found} device(s) with key "
                          f"{addr.key!r}, {devices} requested; start more with `frugalrt device start "
                          f"rpi4-emu --tracker {addr.host}:{addr.port} --key {addr.key}`")
    artifact, workload = Artifact(artifact_dir), workload or Workload()
    inputs, label = workload.inputs(artifact)
    sessions = []
    try:
        for i in range(devices):
            progress(f"requesting device {i + 1}/{devices} from {tracker}")
            sessions.append(open_device(artifact, tracker))
        with ThreadPoolExecutor(devices) as pool:
            return list(pool.map(lambda s: profile_session(
                s, artifact, _server_of(s), runs, warmup, count=False, inputs=inputs, threads=workload.threads,
                duration=workload.duration, input_label=label), sessions))
    finally:
        for s in sessions:
            s.close()


def _server_of(session) -> str:
    host, port = session.channel.peer
    return f"rpc://{host}:{port}"


def profile_emulated(artifact_dir: str | os.PathLike, board: str | None = None,
                     baseline: str | os.PathLike | None = None,
                     progress: Callable[[str], None] = lambda m: None) -> dict:
    """Instruction counts of one inference of a C-bundle (or qemu-arm) artifact under qemu, and of
    ``baseline`` compiled for the same target: deterministic, unlike emulated wall time."""
    from frugalrt.targets.cbundle.run import count_instructions

    artifact = Artifact(artifact_dir)
    progress(f"counting instructions of {artifact.path} under qemu")
    result = {"model": count_instructions(artifact, board)}
    if baseline is not None:
        with compiled_baseline(baseline, artifact.target, progress) as path:
            result["baseline"] = count_instructions(path, board)
            result["baseline"]["artifact"] = str(baseline)
        result["instructions_ratio"] = result["baseline"]["instructions"] / result["model"]["instructions"]
    return result


def emulated_table(result: dict) -> str:
    """Printable form of :func:`profile_emulated`'s result."""
    rows = [("", "instructions / inference", "flash bytes", "RAM bytes", "weights bytes")]
    for name in ("model", "baseline"):
        if name in result:
            r = result[name]
            rows.append((r.get("artifact", name), f"{r['instructions']:,}", f"{r['memory']['flash_bytes']:,}",
                         f"{r['memory']['ram_bytes']:,}", f"{r['weights_bytes']:,}"))
    m = result["model"]
    lines = [f"{m['target']} on emulated {m['board']} (qemu; {m['unit']}; batch 1)"]
    lines += ["  ".join(f"{c:>{w}}" for c, w in zip(row, (28, 26, 12, 10, 14))) for row in rows]
    if "instructions_ratio" in result:
        lines.append(f"baseline / model instructions: {result['instructions_ratio']:.2f}x")
    return "\n".join(lines)
