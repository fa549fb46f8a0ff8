"""frugalrt profile: per-op arithmetic, local profiling, and the full emulated rpi4 profile
(latency, per-op, footprint, deterministic instruction counts, dense baseline, JSON and plot)."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from frugalrt.cli import main
from frugalrt.runtime.profile import latency_stats, op_breakdown


def test_op_breakdown_subtracts_the_callback_overhead():
    # per call: null_value 0.1 ms (the pure-overhead reference), kernel 5 ms, alloc 0.5 ms; 2 runs
    raw = {"vm.builtin.null_value": [10, 0.001, 0], "kernel": [2, 0.010, 0],
           "vm.builtin.alloc_storage": [4, 0.002, 4096]}
    ops, workspace = op_breakdown(raw, runs=2)
    by_name = {o.name: o for o in ops}
    assert [o.name for o in ops][0] == "kernel"
    assert by_name["kernel"].calls == 1 and by_name["kernel"].ms == pytest.approx((0.010 - 2e-4) / 2 * 1e3)
    assert by_name["vm.builtin.alloc_storage"].ms == pytest.approx((0.002 - 4e-4) / 2 * 1e3)
    assert by_name["vm.builtin.null_value"].ms == pytest.approx(0.0, abs=1e-12)
    assert sum(o.share for o in ops) == pytest.approx(1.0)
    assert workspace == 2048


def test_latency_stats_and_throughput():
    seconds = [0.001 * (i + 1) for i in range(100)]  # 1..100 ms
    stats, throughput = latency_stats(seconds, batch=4)
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(100.0)
    assert stats["median"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["mean"] == pytest.approx(50.5) and stats["std"] == pytest.approx(np.sqrt((100**2 - 1) / 12))
    assert throughput["samples_per_s"] == pytest.approx(4 * 1000 / 50.5)


def frugal_nodes(onnx_path) -> Counter:
    """Oracle for the per-op table: ai.frugalrt nodes of the model, by kernel prefix (BinaryGemm ->
    frugalrt_binary_gemm); each node is one kernel call per inference."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    return Counter("frugalrt_" + re.sub(r"(?<!^)([A-Z])", r"_\1", n.op_type).lower()
                   for n in graph.node if n.domain == "ai.frugalrt")


def kernel_calls(ops, prefixes) -> Counter:
    return Counter({p: sum(o["calls"] for o in ops if o["name"].startswith(p)) for p in prefixes})


def check_latency_figures(report: dict, runs: int) -> None:
    """Figures derived from the samples the report holds, as many as the runs requested."""
    ms = np.asarray(report["samples_ms"])
    assert report["runs"] == len(ms) == runs and (ms > 0).all()
    assert report["latency_ms"]["median"] == pytest.approx(np.median(ms))
    assert report["latency_ms"]["p99"] == pytest.approx(np.percentile(ms, 99))
    assert report["latency_ms"]["min"] == pytest.approx(ms.min()) and report["latency_ms"]["max"] == pytest.approx(ms.max())
    assert report["throughput"]["samples_per_s"] == pytest.approx(report["batch"] * 1e3 / ms.mean())


@pytest.mark.compile
def test_local_profile(digits_host_artifact, digits_onnx):
    """Oracles: the VM's own instruction listing (every call of the straight-line @main runs once per
    inference), the ONNX graph, and the artifact timed separately from Python."""
    import time
    from dataclasses import asdict

    import tvm

    from frugalrt.runtime.artifact import Artifact
    from frugalrt.runtime.loader import load
    from frugalrt.runtime.profile import profile

    report = profile(digits_host_artifact, "local", runs=20, warmup=2)
    assert not report.emulated and report.instructions is None
    check_latency_figures(asdict(report), runs=20)
    artifact = Artifact(digits_host_artifact)
    listing = tvm.runtime.load_module(str(artifact.lib_path))["as_text"]()
    main = listing.split("@main:")[1].split("\n\n")[0].split("\n")
    assert all(line.split()[0] in ("call", "ret") for line in main if line.strip())  # no branches
    assert {o.name: o.calls for o in report.ops} == Counter(re.findall(r"^\s*call\s+(\S+)", listing, re.M))
    nodes = frugal_nodes(digits_onnx)
    assert nodes == {"frugalrt_butterfly": 1, "frugalrt_binary_gemm": 2}
    assert kernel_calls([asdict(o) for o in report.ops], nodes) == nodes
    assert report.workspace_bytes > 0 and report.param_bytes == artifact.manifest["param_bytes"] > 0
    session, inputs, wall = load(digits_host_artifact), artifact.golden()[0], []
    for _ in range(30):
        start = time.perf_counter()
        session(*inputs)
        wall.append(time.perf_counter() - start)
    wall_ms = 1e3 * float(np.median(wall))  # includes Python and copies: measured 1.5x the VM's median
    assert wall_ms / 30 < report.latency_ms["median"] < 3 * wall_ms


@pytest.mark.emulated
def test_rpi4_profile_with_dense_baseline(digits_rpi4_artifact, digits_onnx, digits_dense_onnx, rpi4_device,
                                          tmp_path, capsys):
    from frugalrt.runtime.artifact import Artifact
    from frugalrt.runtime.emulator.count import count_instructions

    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["profile", str(digits_rpi4_artifact), "--device", rpi4_device, "--runs", "20",
                 "--warmup", "2", "--baseline", str(digits_dense_onnx), "--json", str(out_json),
                 "--plot", str(out_png)]) == 0
    text = capsys.readouterr().out
    assert "emulated (not representative)" in text and "speed-up vs baseline" in text
    report = json.loads(out_json.read_text())
    assert report["device_info"] == {"kind": "rpi4-emu", "machine": "aarch64", "emulated": True}
    check_latency_figures(report, runs=20)
    check_latency_figures(report["baseline"], runs=20)
    nodes = frugal_nodes(digits_onnx)
    assert kernel_calls(report["ops"], nodes) == nodes  # one kernel call per ai.frugalrt node
    assert not frugal_nodes(digits_dense_onnx) and sum(kernel_calls(report["baseline"]["ops"], nodes).values()) == 0
    assert report["param_bytes"] == Artifact(digits_rpi4_artifact).manifest["param_bytes"]
    assert report["param_bytes"] < report["baseline"]["param_bytes"]
    count, base = report["instructions"], report["baseline"]["instructions"]
    assert count["exact"] and count["instructions"] > 0
    # the structured model must execute fewer instructions than its dense twin
    assert count["instructions"] < base["instructions"]
    assert f"{count['instructions']:,}" in text and f"{base['instructions'] / count['instructions']:.2f}x" in text
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # deterministic: a recount with a different number of runs gives the same per-inference count
    inputs = Artifact(digits_rpi4_artifact).golden()[0]
    assert count_instructions(Artifact(digits_rpi4_artifact).lib_path, inputs, runs=3)["instructions"] \
        == count["instructions"]
