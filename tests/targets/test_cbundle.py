"""C bundles for Cortex-M: arena planning (fast), bundle generation (compile), qemu boards (emulated)."""
from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from frugalrt.errors import DeviceError, TargetError
from frugalrt.targets.cbundle.arena import Slot, lifetimes_of, plan_arena
from frugalrt.targets.cbundle.boards import BOARDS, KB, get_platform
from frugalrt.targets.cbundle.memory import check_fits
from frugalrt.targets.cbundle.program import Step

# The emulated tier needs these; without them its tests skip, naming what to install.
DEBIAN_PACKAGES = {"qemu-system-arm": "qemu-system-arm", "arm-none-eabi-gcc": "gcc-arm-none-eabi",
                   "newlib": "libnewlib-arm-none-eabi"}


def missing_arm_tools(*tools: str) -> list[str]:
    """``tool (Debian package)`` for each of ``tools`` not installed ("newlib": arm-none-eabi's C library)."""
    missing = []
    for tool in tools:
        if tool == "newlib":
            gcc = shutil.which("arm-none-eabi-gcc")
            found = gcc and subprocess.run([gcc, "-print-file-name=librdimon.a"], capture_output=True,
                                           text=True).stdout.strip() != "librdimon.a"
        else:
            found = shutil.which(tool) is not None
        if not found:
            missing.append(f"{tool} (Debian package {DEBIAN_PACKAGES[tool]})")
    return missing


@pytest.fixture(scope="session")
def cortex_m_tools() -> None:
    """Skip (with the reason) tests that build firmware and run it under qemu-system-arm."""
    missing = missing_arm_tools("arm-none-eabi-gcc", "newlib", "qemu-system-arm")
    if missing:
        pytest.skip(f"Cortex-M emulation needs {', '.join(missing)}: apt-get install "
                    + " ".join(m.split("package ")[1].rstrip(")") for m in missing))

# --- fast: the arena planner against brute-force checks ------------------------------------------


def _overlaps(a: Slot, b: Slot) -> bool:
    live = a.first <= b.last and b.first <= a.last
    return live and a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes


@pytest.mark.parametrize("seed", range(5))
def test_arena_never_overlaps_live_tensors(seed):
    rng = np.random.default_rng(seed)
    sizes, spans = {}, {}
    for i in range(12):
        first = int(rng.integers(0, 10))
        sizes[f"t{i}"] = int(rng.integers(1, 5000))
        spans[f"t{i}"] = (first, first + int(rng.integers(0, 4)))
    slots, arena = plan_arena(sizes, spans)
    assert {s.name for s in slots} == set(sizes)
    assert all(s.offset % 16 == 0 and s.offset + s.nbytes <= arena for s in slots)
    assert not any(_overlaps(a, b) for a in slots for b in slots if a is not b)
    assert arena <= sum((n + 15) // 16 * 16 for n in sizes.values())


def test_arena_reuses_memory_along_a_chain():
    # a -> b -> c -> d: each tensor only lives across two steps, so two slots suffice.
    steps = [Step("k0", ["in", "a"], ["a"]), Step("k1", ["a", "b"], ["b"]), Step("k2", ["b", "c"], ["c"]),
             Step("k3", ["c", "out"], ["out"])]
    spans = lifetimes_of(steps, lambda n: n in "abc")
    assert spans == {"a": (0, 1), "b": (1, 2), "c": (2, 3)}
    slots, arena = plan_arena({"a": 1024, "b": 1024, "c": 1024}, spans)
    assert arena == 2048


def test_fit_check_names_the_figures():
    plan = {"weights_bytes": 1100 * KB, "arena_bytes": 4 * KB, "workspace_bytes": 0, "io_bytes": 64,
            "num_kernels": 2}
    with pytest.raises(TargetError, match=r"netduinoplus2 \(1024 KB flash, 128 KB RAM\).*~11\d\d KB flash"):
        check_fits(plan, get_platform("netduinoplus2"))
    check_fits(plan, get_platform("mps2-an386"))  # 4 MB: fits


def test_too_big_hint_names_a_board_that_is_bigger():
    plan = {"weights_bytes": 1100 * KB, "arena_bytes": 4 * KB, "workspace_bytes": 0, "io_bytes": 64,
            "num_kernels": 2}
    with pytest.raises(TargetError, match=r"or a bigger board: mps2-an386 \(4096 KB flash, 4096 KB RAM, "
                                          r"--board mps2-an386\)$"):
        check_fits(plan, get_platform("netduinoplus2"))
    plan["weights_bytes"] = 5000 * KB  # fits no board: the hint must not send it to the board that failed
    for board in ("netduinoplus2", "mps2-an386", "mps2-an500"):
        with pytest.raises(TargetError) as refused:
            check_fits(plan, get_platform(board))
        message = str(refused.value)
        assert "bigger board" not in message and "\n" not in message
        assert message.endswith("no board here is bigger than " + board if board != "netduinoplus2" else
                                "no board here is big enough (the largest, mps2-an386, has 4096 KB flash, "
                                "4096 KB RAM)"), message


# --- compile-time refusals: what a bundle cannot run fails `frugalrt compile`, not the firmware -----


def _one_matmul(x_type=TensorProto.FLOAT, x_shape=("batch", 8), y_type=TensorProto.FLOAT, k=8, n=4):
    """x -> [Cast to float] -> MatMul(w) -> [Cast to y_type] -> y."""
    nodes, x_name = [], "x"
    if x_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        x_name = "xf"
    nodes.append(helper.make_node("MatMul", [x_name, "w"], ["yf" if y_type != TensorProto.FLOAT else "y"]))
    if y_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["yf"], ["y"], to=y_type))
    w = numpy_helper.from_array(np.ones((k, n), np.float32), "w")
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", x_type, list(x_shape))],
                              [helper.make_tensor_value_info("y", y_type, [x_shape[0], n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


REFUSALS = {
    "int64 input": (_one_matmul(x_type=TensorProto.INT64),
                    "m.onnx: input 'x' is int64 [batch, 8]: cortex-m4 bundles take and return float32 tensors only "
                    "(model_run(const float *in, float *out)); cast it to float32 inside the model, or compile "
                    "for a target with the TVM runtime (host, rpi4)"),
    "fixed batch 3": (_one_matmul(x_shape=(3, 8)),
                      "m.onnx: input 'x' is float32 [3, 8], a fixed batch of 3: cortex-m4 bundles run one sample "
                      "per model_run call and support batch 1 or a dynamic batch (frugalrt export's default); "
                      "export with batch 1 or a dynamic batch dimension"),
    "int64 output": (_one_matmul(y_type=TensorProto.INT64),
                     "m.onnx: output 'y' is int64 [batch, 4]: cortex-m4 bundles take and return float32 tensors "
                     "only (model_run(const float *in, float *out)); cast it to float32 inside the model, or "
                     "compile for a target with the TVM runtime (host, rpi4)"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_compile_refuses_what_the_firmware_cannot_run(case, tmp_path, capsys, monkeypatch):
    """Refused before TVM is even loaded: one line naming the input, its dtype and shape, what works."""
    from frugalrt.cli import main

    model, message = REFUSALS[case]
    monkeypatch.chdir(tmp_path)
    onnx.save(model, "m.onnx")
    assert main(["compile", "m.onnx", "--target", "cortex-m4", "--out", "m4"]) == 2
    assert capsys.readouterr().err.strip() == f"frugalrt compile: error: {message}"
    assert not (tmp_path / "m4").exists()
    import frugalrt

    with pytest.raises(TargetError) as refused:  # the Python API, for cortex-m7 and a board
        frugalrt.compile("m.onnx", "cortex-m7", "m7", board="mps2-an500")
    assert str(refused.value) == message.replace("cortex-m4", "cortex-m7")


def test_fixed_batch_1_and_float_models_pass_the_check():
    from frugalrt.targets.cbundle.check import check_bundle_model
    from frugalrt.targets.registry import get_target

    for target in ("cortex-m4", "cortex-m7"):
        check_bundle_model(_one_matmul(x_shape=(1, 8)), get_target(target))
        check_bundle_model(_one_matmul(), get_target(target), "netduinoplus2")
    check_bundle_model(_one_matmul(x_type=TensorProto.INT64), get_target("host"))  # the TVM runtime takes int64


@pytest.mark.parametrize("target, board, message", [
    ("host", "netduinoplus2", "--board netduinoplus2: boards are for the Cortex-M targets (cortex-m4, cortex-m7); "
                              "target host has none"),
    ("cortex-m4", "stm32", "unknown board 'stm32' for target cortex-m4; boards: mps2-an386, mps2-an500, "
                           "netduinoplus2"),
    ("cortex-m4", "armv7", "unknown board 'armv7' for target cortex-m4; boards: mps2-an386, mps2-an500, "
                           "netduinoplus2"),
])
def test_compile_refuses_a_board_it_cannot_use(target, board, message, tmp_path, capsys):
    from frugalrt.cli import main

    onnx.save(_one_matmul(), tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", target, "--out", str(tmp_path / "a"),
                 "--board", board]) == 2
    assert capsys.readouterr().err.strip() == f"frugalrt compile: error: {message}"


@pytest.mark.compile
def test_compile_for_a_board_too_small_is_refused_with_a_bigger_board(tmp_path, capsys):
    """`compile --board netduinoplus2` of 1.25 MB of weights: refused at compile, hint mps2-an386."""
    from frugalrt.cli import main

    onnx.save(_too_big_model(), tmp_path / "big.onnx")
    assert main(["compile", str(tmp_path / "big.onnx"), "--target", "cortex-m4", "--out", str(tmp_path / "m4"),
                 "--board", "netduinoplus2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines of import and build
    assert err.startswith("frugalrt compile: error: model does not fit netduinoplus2 (1024 KB flash, 128 KB RAM): "
                          "needs ~1") and "weights 1280.0 KB" in err and "\n" not in err
    assert err.endswith("or a bigger board: mps2-an386 (4096 KB flash, 4096 KB RAM, --board mps2-an386)")
    assert not (tmp_path / "m4").exists()


@pytest.mark.compile
def test_compile_for_a_board_that_fits_records_it(tmp_path):
    import frugalrt
    from frugalrt.targets.cbundle.run import platform_of

    onnx.save(_one_matmul(), tmp_path / "m.onnx")
    artifact = frugalrt.compile(tmp_path / "m.onnx", "cortex-m4", tmp_path / "m4", board="netduinoplus2")
    plan = json.loads((artifact.lib_path / "plan.json").read_text())
    assert plan["board"] == "netduinoplus2" and plan["estimate"]["flash_bytes"] <= 1024 * KB
    assert platform_of(artifact, "qemu").name == "netduinoplus2"  # `validate --emulate` runs it there
    assert platform_of(artifact, "qemu:mps2-an386").name == "mps2-an386"


# --- compile tier: bundles of the digits example ----------------------------------------------


@pytest.fixture(scope="module")
def digits_bundle(digits_onnx, tmp_path_factory):
    """The digits example compiled for cortex-m4 (the bundle is the artifact's library)."""
    import frugalrt

    return frugalrt.compile(digits_onnx, "cortex-m4", tmp_path_factory.mktemp("m4") / "m4")


def _binary_float32_bytes(model: onnx.ModelProto) -> int:
    """float32 bytes of the BinaryGemm/BinaryConv weights, from the packed initializers' shapes."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("BinaryGemm", "BinaryConv"):
            k = next(helper.get_attribute_value(a) for a in node.attribute if a.name in ("in_features",))
            total += 4 * shapes[node.input[1]][0] * k
    return total


@pytest.mark.compile
def test_bundle_is_a_static_c_project(digits_bundle):
    bundle = digits_bundle.lib_path
    plan = json.loads((bundle / "plan.json").read_text())
    header = (bundle / "model.h").read_text()
    assert "#define MODEL_INPUT_SIZE 64" in header and "#define MODEL_OUTPUT_SIZE 10" in header
    assert "int model_run(const float *in, float *out);" in header
    driver = (bundle / "model.c").read_text()
    assert "malloc" not in driver and "malloc" not in (bundle / "frugalrt_runtime.c").read_text()
    assert plan["num_steps"] == driver.count("frugalrt_call(")
    assert plan["arena_bytes"] <= plan["unplanned_bytes"]
    for f in ("Makefile", "README.md", "boards/netduinoplus2.ld", "boards/startup_cortexm.c",
              "include/tvm/ffi/c_api.h", "include/dlpack/dlpack.h"):
        assert (bundle / f).is_file(), f


@pytest.mark.compile
def test_binary_weights_stay_bit_packed(digits_bundle):
    plan = json.loads((digits_bundle.lib_path / "plan.json").read_text())
    float_bytes = _binary_float32_bytes(onnx.load(digits_bundle.onnx_path))
    assert float_bytes > 0
    assert plan["binary_weights_bytes"] * 25 <= float_bytes


def _too_big_model():
    """One float Gemm 512 -> 640: 1.25 MB of weights, more than the STM32F405's 1 MB flash."""
    w = numpy_helper.from_array(np.zeros((512, 640), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 640])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.compile
def test_netduinoplus2_refuses_a_model_too_big_before_building(tmp_path):
    from frugalrt.targets.cbundle import build_bundle
    from frugalrt.targets.registry import get_target

    with pytest.raises(TargetError, match=r"does not fit netduinoplus2 .*weights 1280\.0 KB"):
        build_bundle(_too_big_model(), get_target("cortex-m4"), tmp_path / "b", board="netduinoplus2")
    assert not (tmp_path / "b").exists()


# --- emulated tier: the boards under qemu-system-arm ------------------------------------------


@pytest.fixture(scope="module")
def binary_conv_artifact(tmp_path_factory):
    """A small CNN with a binary convolution (stride 2, padding 1), compiled for cortex-m4."""
    import torch
    from torch import nn

    import frugalrt
    from frugalrt.nn import BinaryConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Hardtanh(), BinaryConv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    out = tmp_path_factory.mktemp("conv")
    frugalrt.export(model, (torch.randn(3, 1, 8, 8),), out / "conv.onnx")
    return frugalrt.compile(out / "conv.onnx", "cortex-m4", out / "m4")


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("model", ["digits_bundle", "binary_conv_artifact"])
def test_bundle_matches_pytorch_on_board(model, board, request):
    import frugalrt

    artifact = request.getfixturevalue(model)
    report = frugalrt.validate(artifact.path, device=f"qemu:{board}")
    assert report.passed, report
    golden_in, golden_out = artifact.golden()
    (y,) = frugalrt.load(artifact.path, device=f"qemu:{board}")(*golden_in)
    np.testing.assert_allclose(y, golden_out[0], rtol=1e-4, atol=1e-4)  # PyTorch recorded at export


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
def test_cli_validate_emulate(digits_bundle, capsys):
    from frugalrt.cli import main

    assert main(["validate", str(digits_bundle.path), "--emulate", "--board", "netduinoplus2"]) == 0


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
def test_binary_weights_in_flash_of_the_firmware(digits_bundle):
    from frugalrt.targets.cbundle.run import build_firmware

    platform = get_platform("netduinoplus2")
    elf = build_firmware(digits_bundle.lib_path, platform)
    plan = json.loads((digits_bundle.lib_path / "plan.json").read_text())
    binary = {f"frugalrt_{b['name']}" for b in plan["buffers"] if b["kind"] == "const" and b["dtype"][0] in "ui"}
    nm = subprocess.run([platform.nm_tool, "-S", str(elf)], capture_output=True, text=True, check=True).stdout
    sizes = {p[3]: (int(p[0], 16), int(p[1], 16)) for p in map(str.split, nm.splitlines()) if len(p) == 4}
    flash_lo, flash_bytes = platform.flash
    assert binary and all(flash_lo <= sizes[s][0] < flash_lo + flash_bytes for s in binary)
    assert sum(sizes[s][1] for s in binary) * 25 <= _binary_float32_bytes(onnx.load(digits_bundle.onnx_path))


def _broken_firmware(bundle, tmp_path, statement: str):
    from frugalrt.targets.cbundle.run import build_firmware

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    main = broken / "test" / "frugalrt_main.c"
    main.write_text(main.read_text().replace("int main(void) {", "int main(void) {\n  " + statement, 1))
    platform = get_platform("netduinoplus2")
    return build_firmware(broken, platform), platform


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
@pytest.mark.parametrize("statement, message", [("__builtin_trap();", "faulted"),
                                                ("for (;;) {}", "did not finish")])
def test_faulting_or_hanging_firmware_ends_with_device_error(digits_bundle, tmp_path, statement, message):
    from frugalrt.targets.cbundle.run import run_firmware

    elf, platform = _broken_firmware(digits_bundle.lib_path, tmp_path, statement)
    with pytest.raises(DeviceError, match=message):  # a hang ends through run_firmware's own timeout
        run_firmware(elf, platform, [np.zeros((1, 64), np.float32)], [[1, 10]], timeout=5)


@pytest.fixture(scope="module")
def digits_dense_artifact(digits_dense_onnx, tmp_path_factory):
    """The dense twin of the digits example (``make_model(dense=True)``), compiled for cortex-m4."""
    import frugalrt

    return frugalrt.compile(digits_dense_onnx, "cortex-m4", tmp_path_factory.mktemp("dense") / "m4")


@pytest.fixture(scope="module")
def instruction_counts(cortex_m_tools, digits_bundle, digits_dense_artifact):
    """``count_instructions`` on netduinoplus2 of the frugal and the dense digits model, counted once."""
    from frugalrt.targets.cbundle.run import count_instructions

    return (count_instructions(digits_bundle.path, "netduinoplus2"),
            count_instructions(digits_dense_artifact.path, "netduinoplus2"))


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
def test_instruction_counts_frugal_and_dense(instruction_counts):
    frugal, dense = instruction_counts
    assert 0 < frugal["instructions"] < dense["instructions"]
    print(f"\nnetduinoplus2, one inference ({frugal['unit']}): frugal {frugal['instructions']}, "
          f"dense {dense['instructions']}; flash {frugal['memory']['flash_bytes']} vs "
          f"{dense['memory']['flash_bytes']} B")


@pytest.mark.emulated
@pytest.mark.usefixtures("cortex_m_tools")
def test_cli_profile_emulate_reports_frugal_and_dense_counts(digits_bundle, digits_dense_onnx, instruction_counts,
                                                            tmp_path):
    from frugalrt.cli import main

    out = tmp_path / "profile.json"
    assert main(["profile", str(digits_bundle.path), "--emulate", "--board", "netduinoplus2",
                 "--baseline", str(digits_dense_onnx), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    frugal, dense = (c["instructions"] for c in instruction_counts)
    # the CLI's own qemu runs give the fixture's counts: counting is deterministic
    assert (report["model"]["instructions"], report["baseline"]["instructions"]) == (frugal, dense)
    assert report["instructions_ratio"] == pytest.approx(dense / frugal)
