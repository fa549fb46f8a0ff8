"""The AArch64 NEON binary kernels, compiled for ``rpi4`` and run on the session's emulated Raspberry
Pi 4 over RPC, bit-exact against the numpy reference (oracle).

GEMM (``arm_binary``): shapes cover the 2-row tiles and their remainder row, N not a multiple of the
8-output block, K not a multiple of the 128-bit chunk (the zero-padded tail). Convolution
(``arm_binary_conv``): one artifact holds several BinaryConv nodes (C not a multiple of 64, O not
a multiple of the block, strides 1 and 2, symmetric and asymmetric padding, images narrower than 4
pixels, outputs narrower than a block), run at batch 2. The 32-bit ARMv7 build of both kernels is
checked under qemu-arm in ``test_qemu_arm.py``.
"""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from frugalrt.export.single_op import single_op_model
from frugalrt.runtime import reference as ref

RNG = np.random.default_rng(0)


@pytest.mark.emulated
@pytest.mark.parametrize("batch,k,n", [(5, 100, 40), (6, 1024, 64), (3, 2064, 1030)])
def test_neon_binary_gemm_is_exact_on_rpi4(rpi4_device, tmp_path, batch, k, n):
    import frugalrt

    w = ref.pack_bits(RNG.standard_normal((n, k)))
    scale, bias = RNG.random(n).astype(np.float32) + 0.1, RNG.standard_normal(n).astype(np.float32)
    onnx.save(single_op_model("BinaryGemm", [k], {"W_packed": w, "scale": scale, "B": bias}, {"in_features": k}),
              tmp_path / "gemm.onnx")
    frugalrt.compile(tmp_path / "gemm.onnx", "rpi4", tmp_path / "rpi4")
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    x[0, :5] = 0.0  # sign(0) = +1
    x[-1, -3:] = -0.0
    session = frugalrt.load(tmp_path / "rpi4", device=rpi4_device)
    try:
        (y,) = session(x)
    finally:
        session.close()
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, bias, in_features=k))


def _lowered(op: str, x_shape: tuple, consts: dict, attrs: dict, target: str = "rpi4"):
    """The Relax module of ``op`` lowered for ``target`` with a dynamic batch."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering
    from frugalrt.targets.registry import tvm_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), *x_shape), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(get_lowering("ai.frugalrt", op, 1).emit(bb, [x], consts, attrs, tvm_target(target)))
    return bb.get()


def _lowered_asm(op: str, x_shape: tuple, consts: dict, attrs: dict) -> tuple[set, str]:
    """(function names, rpi4 assembly) of ``op`` lowered for rpi4."""
    import tvm

    from frugalrt.targets.registry import tvm_target

    mod = _lowered(op, x_shape, consts, attrs)
    asm = tvm.compile(mod, target=tvm_target("rpi4")).mod.imports[0].inspect_source("asm")
    return {gv.name_hint for gv in mod.functions}, asm


GEMM_NODE = ("BinaryGemm", (300,), {"W_packed": ref.pack_bits(RNG.standard_normal((40, 300))),
                                    "scale": np.ones(40, np.float32)}, {"in_features": 300})
CONV_NODE = ("BinaryConv", (64, 8, 8), {"W_packed": ref.pack_bits(RNG.standard_normal((8, 576))),
                                        "scale": np.ones(8, np.float32)},
             {"in_channels": 64, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]})


@pytest.mark.compile
@pytest.mark.parametrize("target,neon", [("rpi4", True), ("armv7", True), ("rpi-zero", False)])
def test_arm_families_pick_neon_kernels_only_with_neon(target, neon):
    for node, kernel in ((GEMM_NODE, "frugalrt_binary_gemm_neon"), (CONV_NODE, "frugalrt_binary_conv_neon")):
        names = {gv.name_hint for gv in _lowered(*node, target=target).functions}
        assert (kernel in names) == neon, (target, names)


@pytest.mark.compile
def test_rpi4_binary_gemm_uses_cnt():
    names, asm = _lowered_asm(*GEMM_NODE)
    assert "frugalrt_binary_gemm_neon" in names
    assert "\tcnt\t" in asm and "\tuadalp\t" in asm and "\tsri\t" in asm

# (C, H, W, O, kernel, strides, pads [top, left, bottom, right])
CONV_CASES = [(3, 7, 7, 5, (3, 3), (1, 1), (1, 1, 1, 1)), (65, 9, 9, 13, (3, 3), (2, 2), (1, 0, 2, 1)),
              (130, 6, 5, 9, (3, 3), (1, 1), (0, 0, 0, 0)), (64, 16, 16, 20, (3, 3), (1, 1), (1, 1, 1, 1)),
              (64, 8, 8, 8, (3, 3), (2, 2), (1, 1, 1, 1)), (200, 4, 3, 3, (1, 3), (1, 2), (0, 1, 1, 0)),
              (96, 11, 13, 17, (3, 3), (2, 1), (1, 1, 1, 1))]


def conv_model(cases=CONV_CASES, seed: int = 0) -> tuple[onnx.ModelProto, list]:
    """One BinaryConv node per case (input X{i}, output Y{i}); returns the model, its node attributes
    and constants, for the reference."""
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits, params = [], [], [], [], []
    for i, (c, h, w, o, kernel, strides, pads) in enumerate(cases):
        consts = {"W_packed": ref.pack_bits(rng.standard_normal((o, c * kernel[0] * kernel[1]))),
                  "scale": rng.random(o).astype(np.float32) + 0.1, "B": rng.standard_normal(o).astype(np.float32)}
        attrs = {"in_channels": c, "kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads)}
        nodes.append(helper.make_node("BinaryConv", [f"X{i}"] + [f"{k}{i}" for k in consts], [f"Y{i}"],
                                      domain=ref.DOMAIN, **attrs))
        inputs.append(helper.make_tensor_value_info(f"X{i}", TensorProto.FLOAT, ["batch", c, h, w]))
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, None))
        inits += [numpy_helper.from_array(v, f"{k}{i}") for k, v in consts.items()]
        params.append((consts, attrs))
    graph = helper.make_graph(nodes, "convs", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ref.DOMAIN, 1)])
    return model, params


def conv_inputs(batch: int, cases=CONV_CASES, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((batch, c, h, w)).astype(np.float32) for c, h, w, *_ in cases]
    for x in xs:
        x[0, :, 0, :2] = 0.0  # sign(0) = +1
        x[-1, 0, 1, 1] = -0.0
    return xs


def conv_reference(xs: list, params: list) -> list[np.ndarray]:
    return [ref.binary_conv(x, consts["W_packed"], consts["scale"], consts["B"], **attrs)
            for x, (consts, attrs) in zip(xs, params)]


@pytest.mark.emulated
def test_neon_binary_conv_is_exact_on_rpi4(rpi4_device, tmp_path):
    import frugalrt

    model, params = conv_model()
    onnx.save(model, tmp_path / "convs.onnx")
    frugalrt.compile(tmp_path / "convs.onnx", "rpi4", tmp_path / "rpi4")
    xs = conv_inputs(batch=2)
    session = frugalrt.load(tmp_path / "rpi4", device=rpi4_device)
    try:
        ys = session(*xs)
    finally:
        session.close()
    for y, want in zip(ys, conv_reference(xs, params)):
        np.testing.assert_array_equal(y, want)


@pytest.mark.compile
def test_rpi4_binary_conv_uses_cnt():
    names, asm = _lowered_asm(*CONV_NODE)
    assert "frugalrt_binary_conv_neon" in names
    assert "\tcnt\t" in asm and "\tuadalp\t" in asm and "\tsri\t" in asm
