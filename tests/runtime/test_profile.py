"""frugalrt profile: per-op arithmetic, local profiling, and the full emulated rpi4 profile
(latency, per-op, footprint, deterministic instruction counts, dense baseline, JSON and plot)."""
import json

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


@pytest.mark.compile
def test_local_profile(digits_host_artifact):
    from frugalrt.runtime.profile import profile

    report = profile(digits_host_artifact, "local", runs=20, warmup=2)
    assert len(report.samples_ms) == 20 and not report.emulated and report.instructions is None
    kernels = [o for o in report.ops if not o.name.startswith("vm.builtin.")]
    assert kernels and all(o.calls > 0 for o in kernels)
    assert report.workspace_bytes > 0 and report.param_bytes > 0


@pytest.mark.emulated
def test_rpi4_profile_with_dense_baseline(digits_rpi4_artifact, digits_dense_onnx, rpi4_device,
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
    assert len(report["samples_ms"]) == 20 and report["latency_ms"]["p99"] >= report["latency_ms"]["median"]
    assert any(not o["name"].startswith("vm.builtin.") for o in report["ops"])
    assert report["param_bytes"] == Artifact(digits_rpi4_artifact).manifest["param_bytes"]
    count, base = report["instructions"], report["baseline"]["instructions"]
    assert count["exact"] and count["instructions"] > 0
    # the structured model must execute fewer instructions than its dense twin
    assert count["instructions"] < base["instructions"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # deterministic: a recount with a different number of runs gives the same per-inference count
    inputs = Artifact(digits_rpi4_artifact).golden()[0]
    assert count_instructions(Artifact(digits_rpi4_artifact).lib_path, inputs, runs=3)["instructions"] \
        == count["instructions"]
