"""``frugalrt profile``: latency distribution, per-op breakdown and footprint of a compiled artifact.

Latency: ``warmup`` runs, then ``runs`` single-run repeats of the VM's C++ time evaluator *on the
device* (``invoke_stateful`` on inputs bound once), so neither Python nor RPC round trips are timed.
Per-op breakdown: TVM 0.27 has no profiler, so the VM runs under ``set_instrument`` with a callback
that times each packed call (kernels and ``vm.builtin.*``). A callback cannot cross RPC, so on
devices started by frugalrt it runs *on the device* (``frugalrt.vm_op_profile``, registered by the
server); the callback's own cost (the mean of the cheapest call, a no-op builtin) is subtracted per
call. Workspace = bytes the VM allocates for intermediates per inference (``alloc_storage``).
On emulated devices wall times are labelled "emulated (not representative)" and the deterministic
instruction count of one inference (qemu TCG plugin) is reported as the speed proxy.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from frugalrt.errors import DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import open_device

EMULATED_LABEL = "emulated (not representative)"


@dataclass
class OpTime:
    name: str
    calls: float  # per inference
    ms: float  # per inference, instrumentation overhead removed
    share: float  # of the summed per-op time


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

    @property
    def emulated(self) -> bool:
        return bool(self.device_info.get("emulated"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        lat, label = self.latency_ms, f" [{EMULATED_LABEL}]" if self.emulated else ""
        lines = [f"profile of {self.artifact} ({self.target}) on {self.device}"
                 f" [{self.device_info.get('kind', 'unknown device')}], batch {self.batch}, "
                 f"{self.runs} runs after {self.warmup} warm-up",
                 f"latency ms{label}: " + "  ".join(f"{k} {lat[k]:.4g}" for k in
                                                   ("mean", "median", "p90", "p99", "min", "max", "std")),
                 f"throughput{label}: {self.throughput['inferences_per_s']:.1f} inferences/s, "
                 f"{self.throughput['samples_per_s']:.1f} samples/s",
                 f"parameters {_size(self.param_bytes)}, workspace {_size(self.workspace_bytes)}"]
        if self.instructions:
            i = self.instructions
            lines.append(f"instructions per inference (batch {i['batch']}): {i['instructions']:,} "
                         f"({i['unit']}; {i['scope']}; {i['device']})")
        if self.ops:
            lines.append(f"{'op':<28}{'calls':>7}{'ms/inf':>10}{'share':>8}")
            lines += [f"{o.name[:27]:<28}{o.calls:>7.3g}{o.ms:>10.4f}{o.share:>8.1%}" for o in self.ops]
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


def _size(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,} B"


def latency_stats(seconds: list[float], batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """mean/median/p90/p99/min/max/std in ms, and throughput from the mean."""
    ms = np.asarray(seconds, np.float64) * 1e3
    stats = {"mean": ms.mean(), "median": np.median(ms), "p90": np.percentile(ms, 90),
             "p99": np.percentile(ms, 99), "min": ms.min(), "max": ms.max(), "std": ms.std()}
    stats = {k: float(v) for k, v in stats.items()}
    per_s = 1e3 / stats["mean"]
    return stats, {"inferences_per_s": per_s, "samples_per_s": per_s * batch}


def op_breakdown(raw: dict[str, list], runs: int) -> tuple[list[OpTime], int]:
    """Per-op table from ``vm_op_profile``'s ``{symbol: [calls, seconds, bytes]}`` over ``runs``."""
    overhead = min((seconds / calls for calls, seconds, _ in raw.values() if calls), default=0.0)
    net = {name: max(seconds - calls * overhead, 0.0) for name, (calls, seconds, _) in raw.items()}
    total = sum(net.values()) or 1.0
    ops = [OpTime(name, calls / runs, net[name] / runs * 1e3, net[name] / total)
           for name, (calls, _, _) in raw.items()]
    workspace = sum(b for _, _, b in raw.values()) // runs
    return sorted(ops, key=lambda o: -o.ms), workspace


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

    def op_profiler(self) -> Callable | None:
        if self.remote is None:
            from frugalrt.runtime.emulator.serve import vm_op_profile

            return vm_op_profile
        try:
            return self.call(lambda: self.remote.get_function("frugalrt.vm_op_profile"), "lookup")
        except DeviceError:
            return None


def profile_session(session, artifact: Artifact, device: str, runs: int = 100, warmup: int = 10,
                    op_runs: int = 10, count: bool = True) -> ProfileReport:
    """Profile an open session of ``artifact`` (see the module docstring for the method)."""
    import tvm

    d = _Driver(session)
    inputs = _inputs(artifact)
    artifact.check_inputs(inputs)
    d.call(lambda: d.vm.set_input("main", *[tvm.runtime.tensor(x, d.dev) for x in inputs]), "setting inputs")
    evaluator = lambda number, repeat: d.vm.time_evaluator(  # noqa: E731
        "invoke_stateful", d.dev, number=number, repeat=repeat)
    if warmup:
        d.call(lambda: evaluator(warmup, 1)("main"), f"{warmup} warm-up runs")
    seconds = list(d.call(lambda: evaluator(1, runs)("main"), f"{runs} timed runs").results)
    batch = int(inputs[0].shape[0]) if inputs[0].ndim else 1
    stats, throughput = latency_stats(seconds, batch)
    info = d.info()
    ops, workspace, note = None, None, "unavailable: the server has no frugalrt.vm_op_profile " \
                                       "(start devices with `frugalrt device start`)"
    profiler = d.op_profiler()
    if profiler is not None:
        raw = json.loads(d.call(lambda: profiler(d.vm.module, "main", op_runs), "per-op profile"))
        ops, workspace = op_breakdown(raw, op_runs)
        note = (f"set_instrument over {op_runs} runs, timed on the device; callback overhead "
                "subtracted per call; vm.builtin.* = VM bookkeeping")
    report = ProfileReport(str(artifact.path), device, artifact.target, info, batch, runs, warmup,
                           stats, [s * 1e3 for s in seconds], throughput,
                           artifact.manifest.get("param_bytes"), workspace, ops, note)
    if info.get("emulated"):
        report.notes.append(f"wall times are {EMULATED_LABEL}: qemu emulates NEON in software; "
                            "compare instruction counts instead")
        if count and info.get("kind") == "rpi4-emu":
            from frugalrt.runtime.emulator.count import count_instructions

            report.instructions = count_instructions(artifact.lib_path, inputs)
    return report


def _inputs(artifact: Artifact) -> list[np.ndarray]:
    """The golden inputs recorded at export, else zeros with batch 1."""
    golden = artifact.golden()
    if golden:
        return [np.ascontiguousarray(x) for x in golden[0]]
    return [np.zeros([d if isinstance(d, int) else 1 for d in i["shape"]], i["dtype"]) for i in artifact.inputs]


def profile(artifact_dir: str | os.PathLike, device: str = "local", runs: int = 100, warmup: int = 10,
            baseline: str | os.PathLike | None = None, count: bool = True,
            progress: Callable[[str], None] = lambda m: None) -> ProfileReport:
    """Profile ``artifact_dir`` on ``device``; ``baseline`` (an ONNX model, e.g. the dense
    equivalent) is compiled for the same target and profiled the same way."""
    artifact = Artifact(artifact_dir)
    progress(f"profiling {artifact.path} on {device}")
    session = open_device(artifact, device)
    try:
        report = profile_session(session, artifact, device, runs, warmup, count=count)
    finally:
        session.close()
    if baseline is not None:
        with compiled_baseline(baseline, artifact.target, progress) as path:
            report.baseline = profile(path, device, runs, warmup, None, count, progress)
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
                 warmup: int = 10, progress: Callable[[str], None] = lambda m: None) -> list[ProfileReport]:
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
    artifact = Artifact(artifact_dir)
    sessions = []
    try:
        for i in range(devices):
            progress(f"requesting device {i + 1}/{devices} from {tracker}")
            sessions.append(open_device(artifact, tracker))
        with ThreadPoolExecutor(devices) as pool:
            return list(pool.map(lambda s: profile_session(s, artifact, _server_of(s), runs, warmup,
                                                           count=False), sessions))
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
