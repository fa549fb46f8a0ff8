"""The static runner's JSON as a :class:`ProfileReport`, so adb/ssh devices print like the others.

The runner times each inference with CLOCK_MONOTONIC around ``model_run`` alone (latency), and
the kernels in a separate pass of ``model_run_timed`` (per-op: each kernel's median over the runs,
one clock read pair subtracted per call, with each run's time for the trace). Rows are named by the
ONNX nodes each step computes (recorded in the bundle's ``plan.json`` and built into the runner),
else by kernel; steps of the same name are summed into one row (``calls`` per inference).
"""
from __future__ import annotations

from frugalrt.errors import DeviceError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.profile import EMULATED_LABEL, OpTime, ProfileReport, latency_stats
from frugalrt.runtime.transports import DeviceUrl


def op_label(op: dict) -> tuple[str, str]:
    """(ONNX node names, op types) of a runner step, "+"-joined like the VM's rows; its kernel name
    and no type when the runner has no nodes for it (built before they were recorded)."""
    nodes = op.get("nodes") or []
    if not nodes:
        return op["name"], ""
    return "+".join(n["name"] for n in nodes), "+".join(dict.fromkeys(n["op_type"] for n in nodes))


def op_table(ops: list[dict], latency_ms: float) -> list[OpTime]:
    """Per-op rows (steps of the same name summed, per run too; share of ``latency_ms``), slowest first."""
    rows: dict[str, OpTime] = {}
    for op in ops:
        name, op_type = op_label(op)
        row = rows.setdefault(name, OpTime(name, 0, 0.0, 0.0, op_type, op["kernel"], op["step"],
                                           [0.0] * len(op.get("samples_ms") or [])))
        if op["kernel"] not in row.kernel.split("+"):
            row.kernel += f"+{op['kernel']}"
        row.calls += 1
        row.ms += op["ms"]
        row.samples_ms = [a + b for a, b in zip(row.samples_ms, op.get("samples_ms") or [])]
    for row in rows.values():
        row.share = row.ms / latency_ms if latency_ms > 0 else 0.0
    return sorted(rows.values(), key=lambda o: -o.ms)


def profile_report(result: dict, artifact: Artifact, device: str, address: DeviceUrl,
                   input_label: str = "golden") -> ProfileReport:
    samples = result.get("samples_ms") or []
    if not samples:
        raise DeviceError(f"device {device}: the runner timed no runs (its JSON has no samples_ms)")
    batch = int(result.get("batch", 1))
    stats, throughput = latency_stats([ms / 1e3 for ms in samples], batch)
    info = {"kind": f"static runner over {address.scheme}", "machine": result.get("machine", "unknown"),
            "emulated": address.emulated, "runner": address.runner, "cflags": result.get("cflags", ""),
            "clock": result.get("clock", "")}
    ops = op_table(result.get("ops") or [], stats["median"]) or None
    note = (f"clock reads around each kernel call over {result.get('op_runs')} runs on the device, medians; "
            f"{result.get('timer_overhead_ns')} ns (one clock read pair) subtracted per call") if ops else \
        "unavailable: the runner ran no per-op pass"
    unnamed = sum(not op.get("nodes") for op in result.get("ops") or [])
    if ops and unnamed:
        note += (f"; {unnamed} of {len(result['ops'])} kernel calls have no recorded ONNX node and are named by "
                 "kernel (all of them in a runner built by an older frugalrt: recompile)")
    report = ProfileReport(str(artifact.path), device, artifact.target, info, batch, len(samples),
                           int(result.get("warmup", 0)), stats, list(samples), throughput,
                           artifact.manifest.get("param_bytes"),
                           int(result.get("arena_bytes", 0)) + int(result.get("workspace_bytes", 0)), ops, note)
    report.inputs = input_label
    if ops:
        report.ops_sum_ms = report.kernels_ms = sum(o.ms for o in ops)
        report.notes.append(f"per-op sum {report.ops_sum_ms:.4g} ms vs median latency {stats['median']:.4g} ms "
                            "(workspace = the runner's static arena + kernel workspace)")
    check = result.get("validation")
    if check:
        worst = max((o["max_abs"] or 0.0 for o in check["outputs"]), default=0.0)
        report.notes.append(f"golden check on the device: {'passed' if check['passed'] else 'FAILED'} "
                            f"({result.get('samples')} samples, max abs {worst:.3g})")
    if address.emulated:
        report.notes.append(f"wall times are {EMULATED_LABEL}: the device is an emulator")
    return report
