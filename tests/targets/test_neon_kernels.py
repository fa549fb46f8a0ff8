"""The AArch64 NEON binary kernels, compiled for ``rpi4`` and run on the session's emulated Raspberry
Pi 4 over RPC, bit-exact against the numpy reference (oracle).

GEMM (``arm_binary``): shapes cover the 2-row tiles and their remainder row, N not a multiple of the
8-output block, K not a multiple of the 128-bit chunk (the zero-padded tail). Convolution
(``arm_binary_conv``): one artifact holds several BinaryConv nodes (C not a multiple of 64, O not
a multiple of the block, strides 1 and 2, symmetric and asymmetric padding, ``pad_value`` 1, images
narrower than 4 pixels, outputs narrower than a block), run at batch 2. Packed activations (docs/ops.md:
X as packed sign bytes, Y as the sign bits of the float result, and both) in one more artifact of
convolutions and GEMMs: odd C, O, K, N with random pad bits in X, negative and zero scales, fused
activations. The 32-bit ARMv7 build of both kernels runs the same cases under qemu-arm in
``test_qemu_arm.py``.
"""
import json
from concurrent.futures import ThreadPoolExecutor

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
    w = ref.pack_bits(RNG.standard_normal((n, k)))
    scale, bias = RNG.random(n).astype(np.float32) + 0.1, RNG.standard_normal(n).astype(np.float32)
    model = single_op_model("BinaryGemm", [k], {"W_packed": w, "scale": scale, "B": bias}, {"in_features": k})
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    x[0, :5] = 0.0  # sign(0) = +1
    x[-1, -3:] = -0.0
    (y,) = _run_on_rpi4(model, [x], rpi4_device, tmp_path)
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, bias, in_features=k))


def _lowered(op: str, x_shape: tuple, consts: dict, attrs: dict, target: str = "rpi4", dtype: str = "float32"):
    """The Relax module of ``op`` lowered for ``target`` with a dynamic batch (X of ``dtype``)."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering
    from frugalrt.targets.registry import tvm_target

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), *x_shape), dtype))
    with bb.function("main", [x]):
        bb.emit_func_output(get_lowering("ai.frugalrt", op, 1).emit(bb, [x], consts, attrs, tvm_target(target)))
    return bb.get()


def _lowered_asm(op: str, x_shape: tuple, consts: dict, attrs: dict, dtype: str = "float32") -> tuple[set, str]:
    """(function names, rpi4 assembly) of ``op`` lowered for rpi4."""
    import tvm

    from frugalrt.targets.registry import tvm_target

    mod = _lowered(op, x_shape, consts, attrs, dtype=dtype)
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
    """Float and packed activations alike: the NEON kernels, or the generic ones without NEON."""
    for node, kernel in ((GEMM_NODE, "frugalrt_binary_gemm_neon"), (CONV_NODE, "frugalrt_binary_conv_neon")):
        names = {gv.name_hint for gv in _lowered(*node, target=target).functions}
        assert (kernel in names) == neon, (target, names)
        op, x_shape, consts, attrs = node
        packed_x = (-(-300 // 8),) if op == "BinaryGemm" else (8, 8, 8)
        names = {gv.name_hint for gv in _lowered(op, packed_x, consts, {**attrs, "input_packed": 1, "output_packed": 1},
                                                 target, "uint8").functions}
        assert (f"{kernel}_packed" in names) == neon and any("packed" in name for name in names), (target, names)


@pytest.mark.compile
def test_rpi4_binary_gemm_uses_cnt():
    names, asm = _lowered_asm(*GEMM_NODE)
    assert "frugalrt_binary_gemm_neon" in names  # K = 300: byte counts, ``addp`` (no ``uadalp``)
    assert "\tcnt\t" in asm and "\taddp\t" in asm and "\tsri\t" in asm

# (C, H, W, O, kernel, strides, pads [top, left, bottom, right][, more node attributes])
CONV_CASES = [(3, 7, 7, 5, (3, 3), (1, 1), (1, 1, 1, 1)), (65, 9, 9, 13, (3, 3), (2, 2), (1, 0, 2, 1)),
              (130, 6, 5, 9, (3, 3), (1, 1), (0, 0, 0, 0)), (64, 16, 16, 20, (3, 3), (1, 1), (1, 1, 1, 1)),
              (64, 8, 8, 8, (3, 3), (2, 2), (1, 1, 1, 1)), (200, 4, 3, 3, (1, 3), (1, 2), (0, 1, 1, 0)),
              (96, 11, 13, 17, (3, 3), (2, 1), (1, 1, 1, 1)),
              (65, 9, 9, 13, (3, 3), (2, 2), (1, 0, 2, 1), {"pad_value": 1}),  # padded taps read +1
              (3, 7, 7, 5, (3, 3), (2, 1), (2, 1, 0, 2), {"pad_value": 1})]
IN, OUT, BOTH = {"input_packed": 1}, {"output_packed": 1}, {"input_packed": 1, "output_packed": 1}
RELU, CLIP = {"activation": "relu"}, {"activation": "clip", "activation_min": -0.3, "activation_max": 0.7}
# packed activations (docs/ops.md): X as packed sign bytes, Y as the sign bits of the float result
PACKED_CONV_CASES = [(65, 9, 9, 13, (3, 3), (2, 2), (1, 0, 2, 1), IN),
                     (65, 9, 9, 13, (3, 3), (1, 1), (1, 1, 1, 1), OUT | RELU),
                     (65, 9, 9, 13, (3, 3), (2, 1), (0, 1, 1, 0), BOTH | CLIP),
                     (64, 16, 16, 20, (3, 3), (1, 1), (1, 1, 1, 1), BOTH),
                     (130, 6, 5, 9, (3, 3), (1, 1), (0, 0, 0, 0), IN | RELU),
                     (200, 4, 3, 3, (1, 3), (1, 2), (0, 1, 1, 0), BOTH),  # narrow: two output rows per block
                     (3, 7, 7, 5, (3, 3), (1, 1), (1, 1, 1, 1), BOTH | {"pad_value": 1}),
                     (96, 11, 13, 17, (3, 3), (2, 1), (1, 1, 1, 1), OUT | {"pad_value": 1}),
                     (64, 8, 8, 8, (3, 3), (2, 2), (1, 2, 0, 1), IN | {"pad_value": 1})]
# (K, N, node attributes)
PACKED_GEMM_CASES = [(100, 40, IN), (1030, 70, OUT | CLIP), (77, 13, BOTH | RELU), (256, 64, BOTH)]


def _consts(rng, rows: int, k: int, packed_out: bool) -> dict:
    """Packed weights, scale and bias; a packed Y gets negative and zero scales and a bias that makes
    Y exactly 0 at S = 1 (0.5 * 1 - 0.5), a float Y positive scales."""
    consts = {"W_packed": ref.pack_bits(rng.standard_normal((rows, k))),
              "scale": rng.random(rows).astype(np.float32) + 0.1, "B": rng.standard_normal(rows).astype(np.float32)}
    if packed_out:
        consts["scale"] = rng.standard_normal(rows).astype(np.float32)
        consts["scale"][:2], consts["B"][1] = (0.0, 0.5), -0.5
    return consts


def _value_info(name: str, packed: bool, dims: list):
    return helper.make_tensor_value_info(name, TensorProto.UINT8 if packed else TensorProto.FLOAT, dims)


def conv_model(cases=CONV_CASES, seed: int = 0, gemms=()) -> tuple[onnx.ModelProto, list]:
    """One BinaryConv node per case (input X{i}, output Y{i}), then one BinaryGemm per ``gemms`` case;
    returns the model and each node's (constants, attributes), for the reference."""
    rng = np.random.default_rng(seed)
    nodes, inputs, outputs, inits, params = [], [], [], [], []
    for i, (c, h, w, o, kernel, strides, pads, *more) in enumerate(cases):
        more = more[0] if more else {}
        consts = _consts(rng, o, c * kernel[0] * kernel[1], bool(more.get("output_packed")))
        attrs = {"in_channels": c, "kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads), **more}
        nodes.append(helper.make_node("BinaryConv", [f"X{i}"] + [f"{k}{i}" for k in consts], [f"Y{i}"],
                                      domain=ref.DOMAIN, **attrs))
        packed_in = bool(more.get("input_packed"))
        inputs.append(_value_info(f"X{i}", packed_in, ["batch", h, w, -(-c // 8)] if packed_in else ["batch", c, h, w]))
        outputs.append(_value_info(f"Y{i}", bool(more.get("output_packed")), None))
        inits += [numpy_helper.from_array(v, f"{k}{i}") for k, v in consts.items()]
        params.append((consts, attrs))
    for i, (kdim, n, more) in enumerate(gemms, start=len(cases)):
        consts = _consts(rng, n, kdim, bool(more.get("output_packed")))
        attrs = {"in_features": kdim, **more}
        nodes.append(helper.make_node("BinaryGemm", [f"X{i}"] + [f"{k}{i}" for k in consts], [f"Y{i}"],
                                      domain=ref.DOMAIN, **attrs))
        packed_in = bool(more.get("input_packed"))
        inputs.append(_value_info(f"X{i}", packed_in, ["batch", -(-kdim // 8) if packed_in else kdim]))
        outputs.append(_value_info(f"Y{i}", bool(more.get("output_packed")), None))
        inits += [numpy_helper.from_array(v, f"{k}{i}") for k, v in consts.items()]
        params.append((consts, attrs))
    graph = helper.make_graph(nodes, "convs", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(ref.DOMAIN, 1)])
    return model, params


def _packed(x: np.ndarray, n: int, rng) -> np.ndarray:
    """Packed signs of x's last axis (n of them), with random garbage in the pad bits (to be ignored)."""
    packed = ref.pack_bits(x)
    if n % 8:
        packed[..., -1] |= rng.integers(0, 256, packed.shape[:-1], np.uint8) & np.uint8(0xFF << (n % 8) & 0xFF)
    return packed


def conv_inputs(batch: int, cases=CONV_CASES, seed: int = 1, gemms=()) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    xs = []
    for c, h, w, *_, more in [(*case, {}) if len(case) == 7 else case for case in cases]:
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        x[0, :, 0, :2] = 0.0  # sign(0) = +1
        x[-1, 0, 1, 1] = -0.0
        xs.append(_packed(x.transpose(0, 2, 3, 1), c, rng) if more.get("input_packed") else x)
    for k, _, more in gemms:
        x = rng.standard_normal((batch, k)).astype(np.float32)
        x[0, :5], x[-1, -3:] = 0.0, -0.0
        xs.append(_packed(x, k, rng) if more.get("input_packed") else x)
    return xs


def conv_reference(xs: list, params: list) -> list[np.ndarray]:
    """The numpy reference kernels (the spec, packed activations and pad_value included) on each node."""
    return [(ref.binary_conv if "in_channels" in attrs else ref.binary_gemm)(
        x, consts["W_packed"], consts["scale"], consts["B"], **attrs) for x, (consts, attrs) in zip(xs, params)]


def off_the_test_stack(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread: at each macro call TVMScript walks the whole Python
    stack of its thread (``inspect.getouterframes``, source lines included) while it parses a kernel,
    which under pytest's deep stack and many modules costs ~0.1 s a call; a fresh thread's stack is short."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _run_on_rpi4(model, xs: list, device, tmp_path) -> list:
    import frugalrt

    onnx.save(model, tmp_path / "model.onnx")
    off_the_test_stack(frugalrt.compile, tmp_path / "model.onnx", "rpi4", tmp_path / "rpi4")
    session = frugalrt.load(tmp_path / "rpi4", device=device)
    try:
        return session(*xs)
    finally:
        session.close()


@pytest.mark.emulated
def test_neon_binary_conv_is_exact_on_rpi4(rpi4_device, tmp_path):
    model, params = conv_model()
    xs = conv_inputs(batch=2)
    for y, want in zip(_run_on_rpi4(model, xs, rpi4_device, tmp_path), conv_reference(xs, params), strict=True):
        np.testing.assert_array_equal(y, want)


@pytest.mark.emulated
def test_neon_packed_binary_kernels_are_exact_on_rpi4(rpi4_device, tmp_path):
    """Packed X, packed Y and both, in one artifact: C, O, K, N no multiples of 8 (pad bits of X set at
    random, to be ignored), strides 1, 2 and (2, 1), asymmetric pads, pad_value 1, negative and zero
    scales, fused activations; 3 rows (the GEMM's 2-row tiles and a remainder row)."""
    model, params = conv_model(PACKED_CONV_CASES, seed=3, gemms=PACKED_GEMM_CASES)
    xs = conv_inputs(3, PACKED_CONV_CASES, seed=4, gemms=PACKED_GEMM_CASES)
    for y, want in zip(_run_on_rpi4(model, xs, rpi4_device, tmp_path), conv_reference(xs, params), strict=True):
        assert y.dtype == want.dtype
        np.testing.assert_array_equal(y, want)
    kernels = json.loads((tmp_path / "rpi4" / "opnames.json").read_text())["kernels"]  # the NEON ones, each node
    assert len(kernels) == len(params) and all(k["kernel"].startswith(("frugalrt_binary_conv_neon_packed",
                                                                        "frugalrt_binary_gemm_neon_packed"))
                                               for k in kernels), kernels


@pytest.mark.compile
def test_rpi4_binary_conv_uses_cnt():
    names, asm = _lowered_asm(*CONV_NODE)
    assert "frugalrt_binary_conv_neon" in names
    assert "\tcnt\t" in asm and "\tuadalp\t" in asm and "\tsri\t" in asm


@pytest.mark.compile
@pytest.mark.parametrize("packing", [IN, OUT, BOTH])
def test_rpi4_packed_binary_nodes_use_the_neon_kernels(packing):
    """A packed node keeps the NEON kernel (``cnt`` + ``addp``); a packed Y is a compare (``cmgt``) and,
    in the conv, an ``sri`` per channel; no float transform (``scvtf``) is left."""
    for op, x_shape, consts, attrs in (GEMM_NODE, CONV_NODE):
        c = attrs.get("in_channels", attrs.get("in_features"))
        if packing.get("input_packed"):
            x_shape = (*x_shape[1:], -(-c // 8)) if op == "BinaryConv" else (-(-c // 8),)
        names, asm = _lowered_asm(op, x_shape, consts, {**attrs, **packing}, "uint8" if packing.get("input_packed")
                                  else "float32")
        kernel = {"BinaryConv": "frugalrt_binary_conv_neon_packed", "BinaryGemm": "frugalrt_binary_gemm_neon_packed"}
        assert kernel[op] in names, names
        assert "\tcnt\t" in asm and "\taddp\t" in asm
        if packing.get("output_packed"):
            assert "\tcmgt\t" in asm and "\tscvtf\t" not in asm
