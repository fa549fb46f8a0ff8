"""frugalrt profile: per-op arithmetic, local profiling, and the full emulated rpi4 profile
(latency, per-op, footprint, deterministic instruction counts, dense baseline, JSON and plot)."""
import json
import re
from collections import Counter

import numpy as np
import pytest

from frugalrt.cli import main
from frugalrt.runtime.profile import RUNTIME, latency_stats, op_breakdown


def test_op_breakdown_names_kernels_by_onnx_node_and_keeps_the_vm_runtime_apart():
    # one inference: 2 builtins, shape_func, one kernel serving two nodes, a fused kernel; 2 rounds
    raw = {"calls": [["vm.builtin.alloc_storage", 4096], ["shape_func", 0], ["gemm", 0], ["vm.builtin.null_value", 0],
                     ["gemm", 0], ["fused_max_min", 0]],
           "kernels": [1, 2, 4, 5], "whole": [10e-6, 12e-6],
           "times": [[0.0, 3e-6, 3e-6, 1e-6], [0.0, 4e-6, 3e-6, 1e-6]]}
    names = [{"kernel": "gemm", "nodes": [{"name": "fc1", "op_type": "Gemm"}]},
             {"kernel": "gemm", "nodes": [{"name": "fc2", "op_type": "Gemm"}]},
             {"kernel": "fused_max_min", "nodes": [{"name": "clip", "op_type": "Clip"},
                                                   {"name": "relu", "op_type": "Relu"}]}]
    ops, workspace, sums = op_breakdown(raw, names, latency_ms=0.011)
    by_name = {o.name: o for o in ops}
    assert set(by_name) == {"fc1", "fc2", "clip+relu", "shape_func", RUNTIME}
    assert by_name["clip+relu"].op_type == "Clip+Relu" and by_name["fc2"].kernel == "gemm"
    assert by_name["fc1"].ms == pytest.approx(3.5e-3) and by_name["fc1"].samples_ms == pytest.approx([3e-3, 4e-3])
    assert by_name[RUNTIME].samples_ms == pytest.approx([3e-3, 4e-3]) and by_name[RUNTIME].calls == 2
    assert sums["total"] == pytest.approx(sum(o.ms for o in ops)) and workspace == 4096
    assert [o.order for o in sorted(ops, key=lambda o: o.order)] == [1, 2, 4, 5, 6]
    unnamed, _, _ = op_breakdown(raw, None, latency_ms=0.011)  # an artifact without opnames.json
    assert {o.name for o in unnamed} == {"gemm", "fused_max_min", "shape_func", RUNTIME}


def test_latency_stats_and_throughput():
    seconds = [0.001 * (i + 1) for i in range(100)]  # 1..100 ms
    stats, throughput = latency_stats(seconds, batch=4)
    assert stats["min"] == pytest.approx(1.0) and stats["max"] == pytest.approx(100.0)
    assert stats["median"] == stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05) and stats["p99"] == pytest.approx(99.01)
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
    return Counter({p: sum(o["calls"] for o in ops if o["kernel"].startswith(p)) for p in prefixes})


def check_latency_figures(report: dict, runs: int) -> None:
    """Figures derived from the samples the report holds, as many as the runs requested."""
    ms = np.asarray(report["samples_ms"])
    assert report["runs"] == len(ms) == runs and (ms > 0).all()
    lat = report["latency_ms"]
    assert lat["median"] == lat["p50"] == pytest.approx(np.median(ms))
    assert lat["p99"] == pytest.approx(np.percentile(ms, 99))
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["latency_ms"]["min"] == pytest.approx(ms.min()) and report["latency_ms"]["max"] == pytest.approx(ms.max())
    assert report["throughput"]["samples_per_s"] == pytest.approx(report["batch"] * 1e3 / ms.mean())


def onnx_nodes(onnx_path) -> dict[str, str]:
    import onnx

    return {n.name: n.op_type for n in onnx.load(str(onnx_path)).graph.node}


def check_ops(report: dict, artifact) -> None:
    """Per-op rows: named by ONNX nodes of the artifact's model (or the VM runtime / shape function),
    each frugal node once, and per round the rows add up to a whole inference timed in that round."""
    from frugalrt.runtime.artifact import Artifact

    nodes = onnx_nodes(Artifact(artifact).onnx_path)
    named = [o for o in report["ops"] if o["op_type"] not in ("runtime",)]
    for o in named:
        assert all(nodes.get(n) for n in o["name"].split("+")), o  # real nodes of the model
        assert set(o["op_type"].split("+")) == {nodes[n] for n in o["name"].split("+")}
    frugal = {n for n, t in nodes.items() if t in ("Butterfly", "BinaryGemm")}
    assert Counter(n for o in named for n in o["name"].split("+") if n in frugal) == Counter(frugal)
    rounds = np.array([o["samples_ms"] for o in report["ops"]]).sum(axis=0)
    assert report["ops_sum_ms"] == pytest.approx(sum(o["ms"] for o in report["ops"]))
    # the accounting: the rows of the same rounds add up to the whole inference of those rounds (15%)
    assert abs(report["ops_sum_ms"] / np.median(rounds) - 1) < 0.15


@pytest.mark.compile
def test_local_profile_outputs_agree(digits_host_artifact, tmp_path, capsys):
    """Oracles: the VM's own instruction listing (each kernel call once per inference), the ONNX
    graph (op names and types), and the JSON, CSV and trace of one run against each other."""
    import csv

    import tvm

    from frugalrt.runtime.artifact import Artifact

    out = {k: tmp_path / f"p.{k}" for k in ("json", "csv")}
    out["trace"] = tmp_path / "trace.json"
    assert main(["profile", str(digits_host_artifact), "--runs", "50", "--warmup", "2"]
                + [a for k, p in out.items() for a in (f"--{k}", str(p))]) == 0
    text = capsys.readouterr().out
    report = json.loads(out["json"].read_text())
    check_latency_figures(report, runs=50)
    check_ops(report, digits_host_artifact)
    assert report["threads"] == 1 and report["inputs"] == "golden" and report["input_shapes"] == [[7, 64]]
    artifact = Artifact(digits_host_artifact)
    listing = tvm.runtime.load_module(str(artifact.lib_path))["as_text"]()
    calls = Counter(re.findall(r"^\s*call\s+(\S+)", listing.split("@main:")[1].split("\n\n")[0], re.M))
    assert Counter(o["kernel"] for o in report["ops"] if o["name"] != RUNTIME) == \
        Counter({k: n for k, n in calls.items() if not k.startswith("vm.builtin.")})
    assert report["workspace_bytes"] > 0 and report["param_bytes"] == artifact.manifest["param_bytes"] > 0
    rows = list(csv.DictReader(out["csv"].open()))
    assert [(r["name"], r["kernel"], float(r["ms"])) for r in rows] == \
        [(o["name"], o["kernel"], pytest.approx(o["ms"])) for o in report["ops"]]
    trace = json.loads(out["trace"].read_text())["traceEvents"]
    assert trace and all(e["ph"] == "X" and e["dur"] >= 0 for e in trace)
    by_order = {o["order"]: o for o in report["ops"]}
    for e in trace:  # one event per op and round, its duration the round's measurement
        op = by_order[e["args"]["order"]]
        assert e["name"] == op["name"] and e["dur"] == pytest.approx(op["samples_ms"][e["args"]["round"]] * 1e3, abs=1e-3)
    assert len(trace) == len(report["ops"]) * len(report["ops"][0]["samples_ms"])
    assert all(b["ts"] >= a["ts"] + a["dur"] - 1e-3 for a, b in zip(trace, trace[1:]))
    assert "node_butterfly" in text and "p95" in text


@pytest.mark.compile
def test_profile_inputs_from_a_file_or_a_random_batch(digits_host_artifact, tmp_path, capsys):
    from frugalrt.runtime.artifact import Artifact

    x = Artifact(digits_host_artifact).golden()[0][0][:3]
    np.savez(tmp_path / "in.npz", input=x)
    np.save(tmp_path / "in.npy", x)
    for source, rows in ((["--input", str(tmp_path / "in.npz")], 3), (["--input", str(tmp_path / "in.npy")], 3),
                         (["--batch", "5", "--threads", "2"], 5)):
        out = tmp_path / "p.json"
        assert main(["profile", str(digits_host_artifact), "--runs", "5", "--warmup", "1", "--json", str(out)]
                    + source) == 0
        report = json.loads(out.read_text())
        assert report["batch"] == rows and report["input_shapes"] == [[rows, 64]]
    assert report["threads"] == 2 and report["inputs"] == "random (seed 0)"
    capsys.readouterr()
    np.savez(tmp_path / "bad.npz", other=x)
    for args, message in ((["--runs", "5", "--duration", "1"], "pass one"), (["--batch", "0"], "integer >= 1"),
                          (["--input", str(tmp_path / "bad.npz")], "no array named input"),
                          (["--input", "in.npz", "--batch", "2"], "pass one"), (["--duration", "-1"], "positive")):
        assert main(["profile", str(digits_host_artifact)] + args) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


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
    check_ops(report, digits_rpi4_artifact)
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
