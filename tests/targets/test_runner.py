"""Static runners (emulated tier): one small model's runners for every ARM target, run under qemu-user.

The bundle (TVM's C kernels) is built once; each target's runners are cross-compiled from it and
run directly under the qemu CPU of their target (Cortex-A72/A53/A57, Cortex-A7/A9, ARM1176 for the
ARMv6 Pi Zero, Cortex-R5F for the no-NEON builds). Outputs are checked against the golden vectors
and ONNX Runtime with frugalrt validate's tolerance.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from frugalrt.targets.runner import RUNNER_BUILDS

pytestmark = [pytest.mark.compile, pytest.mark.emulated]
BUILDS = [(target, build) for target, builds in RUNNER_BUILDS.items() for build in builds]
UNAME = {"qemu-aarch64": "aarch64", "arm1176": "armv6l", "cortex-a7": "armv7l", "cortex-a9": "armv7l",
         "cortex-r5f": "armv7l"}


def tiny_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Butterfly 16->32, BatchNorm, binary 32x32, dense 32->10: every kernel family, tiny."""
    from frugalrt.nn import BinaryLinear, ButterflyLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(ButterflyLinear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                BinaryLinear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    return model, torch.randn(5, 16)


@pytest.fixture(scope="module")
def runners(tmp_path_factory, need_tools):
    """{(target, file): path} of every runner, built from one bundle of the tiny model."""
    import frugalrt
    from frugalrt.export.metadata import read_golden
    from frugalrt.targets.cbundle import build_bundle
    from frugalrt.targets.registry import get_target
    from frugalrt.targets.runner import build_runners

    need_tools(*sorted({b.cc for _, b in BUILDS} | {b.qemu[0] for _, b in BUILDS}), why="static runners")
    tmp = tmp_path_factory.mktemp("runners")
    torch_model, x = tiny_model()
    frugalrt.export(torch_model, (x,), tmp / "m.onnx")
    model = onnx.load(str(tmp / "m.onnx"))
    build_bundle(model, get_target("armv7"), tmp / "bundle")
    paths = {}
    for target in RUNNER_BUILDS:
        (tmp / target).mkdir()
        for entry in build_runners(model, target, tmp / target, golden=read_golden(model), bundle=tmp / "bundle"):
            paths[target, entry["file"]] = tmp / target / entry["file"]
    return {"paths": paths, "model": model, "onnx": tmp / "m.onnx", "golden": read_golden(model),
            "plan": json.loads((tmp / "bundle" / "plan.json").read_text())}


def run(build, path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*build.qemu, str(path), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_every_arm_target_has_runners():
    from frugalrt.targets.registry import TARGETS

    arm = {n for n, t in TARGETS.items() if t.tvm.get("mtriple", "").startswith(("aarch64", "arm"))}
    assert arm == set(RUNNER_BUILDS) == {"rpi4", "rpi3", "android-arm64", "android-armv7", "armv7", "rpi-zero"}
    assert {t for t, builds in RUNNER_BUILDS.items() if len(builds) == 2} == {"armv7", "android-armv7"}


def test_every_arm_runner_is_statically_linked(runners, need_tools):
    need_tools("file", why="checking the runners' ELF headers")
    assert len(runners["paths"]) == len(BUILDS) == 8
    for (target, name), path in runners["paths"].items():
        info = subprocess.run(["file", str(path)], capture_output=True, text=True).stdout
        assert "statically linked" in info, (target, info)
        assert ("aarch64" in info) == (RUNNER_BUILDS[target][0].cc.startswith("aarch64")), info


@pytest.mark.parametrize("target,build", BUILDS, ids=[f"{t}-{b.file}" for t, b in BUILDS])
def test_runner_matches_golden_and_times_under_qemu(runners, target, build, tmp_path):
    from frugalrt.runtime.validate import accumulation_length, compare

    proc = run(build, runners["paths"][target, build.file], "--runs", "20", "--warmup", "2", "--op-runs", "5",
               "--output", str(tmp_path / "out.bin"), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == result  # --json writes what it prints
    golden_in, golden_out = runners["golden"]
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(golden_out[0].shape)
    check = compare("y", got, golden_out[0], "binary", accumulation=accumulation_length(runners["model"]))
    assert check.passed and check.max_abs < 1e-4, check
    (on_device,) = result["validation"]["outputs"]
    assert result["validation"]["passed"] and on_device["outside"] == 0 and on_device["argmax_agreement"] == 1.0
    assert on_device["max_abs"] == pytest.approx(check.max_abs, abs=1e-9)  # the device judged the same values
    assert on_device["tolerance"] == pytest.approx(check.tolerance, rel=1e-6)
    assert result["target"] == target and result["samples"] == golden_in[0].shape[0] == 5
    assert result["machine"] == UNAME.get(build.qemu[-1], UNAME.get(build.qemu[0]))
    lat = result["latency_ms"]
    assert result["runs"] == len(result["samples_ms"]) == 20 and result["warmup"] == 2
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"] < 1000
    assert lat["p50"] == lat["median"] == pytest.approx(np.median(result["samples_ms"]), rel=1e-6)
    assert lat["min"] <= lat["mean"] <= lat["max"]
    steps = runners["plan"]["steps"]
    assert [op["kernel"] for op in result["ops"]] == [s["kernel"] for s in steps]
    assert all(op["ms"] >= 0 for op in result["ops"]) and sum(op["ms"] for op in result["ops"]) > 0
    for op in result["ops"]:  # each run's time of the step (the trace), its median the row's time
        assert len(op["samples_ms"]) == 5 and op["ms"] == pytest.approx(np.median(op["samples_ms"]), abs=1e-9)
    assert [op["nodes"] for op in result["ops"]] == [s["nodes"] for s in steps]  # the bundle's, built in
    check_step_nodes(result["ops"], runners["model"])
    assert result["arena_bytes"] == runners["plan"]["arena_bytes"] and result["status"] == "ok"


def check_step_nodes(ops: list[dict], model: onnx.ModelProto) -> None:
    """Every step names real nodes of the ONNX graph (with their op types), and each compute node
    (Butterfly, BinaryGemm, Gemm: one kernel each) is named by exactly one step, in graph order."""
    types = {n.name: n.op_type for n in model.graph.node}
    assert all(op["nodes"] for op in ops), ops
    assert all(types[n["name"]] == n["op_type"] for op in ops for n in op["nodes"]), ops
    compute = ("Butterfly", "BinaryGemm", "Gemm")
    assert [n["name"] for op in ops for n in op["nodes"] if n["op_type"] in compute] == \
        [n.name for n in model.graph.node if n.op_type in compute]


def test_runner_steps_become_rows_named_by_onnx_node():
    """Steps of one node (a converter's chain the bundle did not fuse) make one row, summed per run;
    a fused kernel lists its nodes; a step without nodes (an older runner) keeps its kernel name."""
    from frugalrt.runtime.runner_report import op_table

    gemm, clip, relu = ({"name": n, "op_type": t} for n, t in (("fc", "Gemm"), ("clip", "Clip"), ("relu", "Relu")))
    ops = [{"step": 0, "name": "transpose", "kernel": "frt_transpose", "nodes": [gemm], "ms": 1.0,
            "samples_ms": [1.0, 2.0]},
           {"step": 1, "name": "matmul", "kernel": "frt_matmul", "nodes": [gemm], "ms": 2.0, "samples_ms": [2.0, 3.0]},
           {"step": 2, "name": "fused", "kernel": "frt_fused", "nodes": [clip, relu], "ms": 0.5,
            "samples_ms": [0.5, 0.5]},
           {"step": 3, "name": "old", "kernel": "frt_old", "ms": 0.25}]
    rows = {r.name: r for r in op_table(ops, latency_ms=4.0)}
    fc = rows["fc"]
    assert (fc.op_type, fc.kernel, fc.calls, fc.order) == ("Gemm", "frt_transpose+frt_matmul", 2, 0)
    assert (fc.ms, fc.share, fc.samples_ms) == (3.0, 0.75, [3.0, 5.0])
    assert rows["clip+relu"].op_type == "Clip+Relu"
    assert (rows["old"].op_type, rows["old"].kernel, rows["old"].samples_ms) == ("", "frt_old", [])


def test_runner_on_an_input_file_matches_onnx_runtime(runners, tmp_path):
    from frugalrt.runtime import ort
    from frugalrt.runtime.validate import accumulation_length, compare
    from frugalrt.targets.cbundle import write_inputs

    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    write_inputs(tmp_path / "in.bin", [x])
    (want,) = ort.run(runners["onnx"], [x])
    build = RUNNER_BUILDS["rpi-zero"][0]
    proc = run(build, runners["paths"]["rpi-zero", "runner"], "--input", "in.bin", "--output", "out.bin",
               "--runs", "0", "--op-runs", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["input"] == "file" and result["samples"] == 3 and "validation" not in result
    assert result["runs"] == 0 and result["latency_ms"] is None and result["ops"] == []
    got = np.fromfile(tmp_path / "out.bin", np.float32).reshape(want.shape)
    assert compare("y", got, want, "binary", accumulation=accumulation_length(runners["model"])).passed


def test_neon_runner_needs_neon_and_the_noneon_one_does_not(runners):
    """Under qemu's Cortex-R5F (VFPv3-D16, no NEON) the NEON build dies of SIGILL; runner-noneon passes."""
    noneon = RUNNER_BUILDS["armv7"][1]
    assert noneon.file == "runner-noneon" and noneon.qemu[-1] == "cortex-r5f"
    proc = run(noneon, runners["paths"]["armv7", "runner"], "--runs", "1")
    assert proc.returncode in (-4, 132), (proc.returncode, proc.stderr[-300:])  # SIGILL
    assert run(noneon, runners["paths"]["armv7", "runner-noneon"], "--runs", "1").returncode == 0


def test_runner_duration_mode_and_bad_arguments(runners, tmp_path):
    build = RUNNER_BUILDS["android-arm64"][0]
    path = runners["paths"]["android-arm64", "runner"]
    result = json.loads(run(build, path, "--seconds", "0.3", "--op-runs", "0").stdout)
    assert result["runs"] == len(result["samples_ms"]) >= 1 and result["seconds"] == 0.3
    assert sum(result["samples_ms"]) <= 300 + max(result["samples_ms"])
    bad = run(build, path, "--runs", "many")
    assert bad.returncode == 2 and "bad or missing value for: --runs" in bad.stderr
    missing = run(build, path, "--input", str(tmp_path / "nope.bin"))
    assert missing.returncode == 3 and "cannot read inputs from" in missing.stderr


def test_no_runner_for_models_it_cannot_run():
    from onnx import TensorProto, helper

    from frugalrt.targets.runner import unsupported_reason

    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    assert "input 'x' is not float32" in unsupported_reason(model)
