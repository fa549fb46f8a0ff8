"""PERF's fast CPU kernels (kernels/cpu_*.py) vs the numpy reference (oracle).

Every kernel is compiled for an x86 CPU named explicitly, never for the CPU LLVM detects here, so
the same kernels are tested on any machine: ``x86-64`` (baseline: generic kernels, SSE2 only),
``haswell`` (AVX2: the ``vpshufb`` table GEMM and the byte-count conv) and ``icelake-server``
(AVX-512 VPOPCNTDQ: the ``vpopcntd`` GEMM and conv). A kernel *runs* where this CPU has every ISA
extension its target enables (``x86_cpu(...).runs_here``, tests/conftest.py; Haswell code runs on
AVX-512 machines too) and is otherwise skipped with the reason; whatever the machine,
``test_lowerings_pick_the_x86_kernels`` compiles each CPU's kernels and inspects their assembly.

Butterfly within 1e-5 relative (the 8x8 blocks change the order of additions), BinaryGemm and
BinaryConv bit-exact. Shapes cover every pass layout (block only, radix-8 + 1/2-stage tails),
padding, truncation, the row tiles and their remainder, N not a multiple of 16 and K not of 16,
odd channel counts, strides 1 and 2 and asymmetric pads, ``pad_value`` 0 and 1. The binary kernels
with packed activations (docs/ops.md: X as packed sign bytes, Y as the packed sign bits of the float
result after the fused activation) are checked against the reference's ``input_packed`` /
``output_packed``, with negative and zero scales, a bias putting Y exactly on 0, and garbage in X's
pad bits (ignored).
"""
import numpy as np
import pytest

from frugalrt.runtime import reference as ref

pytestmark = pytest.mark.compile
RNG = np.random.default_rng(0)
GENERIC, AVX2, AVX512 = "x86-64", "haswell", "icelake-server"  # LLVM mcpu of each x86 kernel family
INSPECTED = "test_lowerings_pick_the_x86_kernels"
CLIP = {"activation": "clip", "activation_min": -0.3, "activation_max": 0.7}
RELU = {"activation": "relu"}  # (a packed Y of relu is all +1: every bit 0)
PACKINGS = {"in": (1, 0), "out": (0, 1), "in+out": (1, 1)}  # name -> (input_packed, output_packed)


def binary_consts(rows: int, k: int):
    """Packed weights [rows, ceil(k/8)], scale and bias: scales of either sign, a zero one, and a 0.5 whose
    bias -0.5 puts Y exactly on 0 at S = 1."""
    w = ref.pack_bits(RNG.standard_normal((rows, k)))
    scale, bias = RNG.standard_normal(rows).astype(np.float32), RNG.standard_normal(rows).astype(np.float32)
    scale[0], scale[1], bias[1], scale[2] = 0.0, 0.5, -0.5, -abs(scale[2])
    return w, scale, bias


def packed_case(x: np.ndarray, rows: int, k: int, channel_axis: int, packing: str, activation: dict):
    """(X as the kernel takes it, :func:`binary_consts`, Packing); a packed X has its pad bits set (they must
    be ignored). The activation goes into a packed Y only (a float Y gets it from the lowering,
    kernels/activation.py)."""
    from frugalrt.targets.kernels.packing import Packing

    pin, pout = PACKINGS[packing]
    w, scale, bias = binary_consts(rows, k)
    if pin:
        channels = x.shape[channel_axis]
        x = ref.pack_bits(np.moveaxis(x, channel_axis, -1))
        x[..., -1] |= np.uint8(0xFF << (channels % 8) & 0xFF if channels % 8 else 0)
    return x, w, scale, bias, Packing(bool(pin), bool(pout), activation if pout else {})


def packed_attrs(packing) -> dict:
    return {"input_packed": int(packing.input), "output_packed": int(packing.output), **packing.activation}


def run(func, target, *arrays):
    import tvm

    lib = tvm.compile(func, target=target)
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    lib(*args)
    return args[-1].numpy()


@pytest.mark.parametrize("n,width,out,batch", [
    (8, 5, 8, 3), (16, 16, 10, 2), (32, 20, 32, 9), (64, 64, 64, 1), (512, 300, 512, 10), (2048, 2048, 1000, 3),
    (1024, 20, 600, 2),  # mostly zero padding: blocks of it are skipped in two passes
])
@pytest.mark.parametrize("cpu", [GENERIC, AVX2], indirect=True)  # every x86 target picks this kernel
def test_butterfly_cpu_matches_reference(cpu, n, width, out, batch):
    from frugalrt.targets.kernels.butterfly import stage_coefficients
    from frugalrt.targets.kernels.cpu_butterfly import butterfly_primfunc, repack

    tw = (RNG.standard_normal((n.bit_length() - 1, n // 2, 2, 2)) / np.sqrt(2)).astype(np.float32)
    bias = RNG.standard_normal(out).astype(np.float32)
    x = RNG.standard_normal((batch, width)).astype(np.float32)
    blocks, stream = repack(*stage_coefficients(tw))
    y = run(butterfly_primfunc(n, width, out), cpu.target, x, blocks, stream, bias, np.zeros((batch, out), np.float32))
    expected = ref.butterfly(x, tw, bias, out_features=out)
    assert np.abs(y - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("split", [True, False])  # one nibble per byte / two (large weights)
@pytest.mark.parametrize("m,k,n", [(1, 8, 3), (5, 100, 40), (4, 1000, 64), (9, 4096, 48), (13, 64, 2000),
                                   (3, 200, 96), (6, 1024, 320)])
@pytest.mark.parametrize("cpu", [AVX2], indirect=True)  # the table kernel: AVX2 intrinsics
def test_binary_gemm_cpu_is_exact(cpu, m, k, n, split):
    from frugalrt.targets.kernels.cpu_binary import (OUTS, binary_gemm_primfunc, nibble_tables, padded_scale_bias,
                                                     repack_weights)

    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[0, : min(k, 5)] = 0.0  # sign(0) = +1
    w = ref.pack_bits(RNG.standard_normal((n, k)))
    scale, bias = RNG.random(n).astype(np.float32) + 0.1, RNG.standard_normal(n).astype(np.float32)
    n_pad = -(-n // OUTS) * OUTS
    y = run(binary_gemm_primfunc(k, n, n_pad, split), cpu.target, x, repack_weights(w, n_pad, split), nibble_tables(),
            *padded_scale_bias(scale, bias, n_pad), np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, bias, in_features=k))


def test_nibble_tables_count_differing_bits():
    from frugalrt.targets.kernels.cpu_binary import nibble_tables

    tables = nibble_tables()
    for byte in (0x00, 0x5A, 0xF3):
        for lane in range(32):
            nibble = byte & 15 if lane < 16 else byte >> 4
            assert tables[byte, lane] == bin(nibble ^ (lane % 16)).count("1")


@pytest.mark.parametrize("cpu", [AVX2], indirect=True)
def test_binary_gemm_cpu_all_differing_bits_stay_exact(cpu):
    """x = -w everywhere: every step adds its maximum (8), the worst case for the u8 accumulators."""
    from frugalrt.targets.kernels.cpu_binary import kernel_inputs

    w = RNG.standard_normal((32, 2048)).astype(np.float32)
    x = -w[:5].copy()
    wp, scale = ref.pack_bits(w), np.ones(32, np.float32)
    func, consts = kernel_inputs(wp, scale, None, 2048)
    y = run(func, cpu.target, x, *consts, np.zeros((5, 32), np.float32))
    np.testing.assert_array_equal(y, ref.binary_gemm(x, wp, scale, None, in_features=2048))
    assert (y[np.arange(5), np.arange(5)] == -2048).all()


@pytest.mark.parametrize("packing,activation", [("in", {}), ("out", {}), ("in+out", CLIP), ("out", RELU),
                                                ("in+out", {})])
@pytest.mark.parametrize("m,k,n", [(1, 8, 3), (5, 100, 40), (9, 4096, 48), (13, 65, 200), (6, 1024, 320)])
@pytest.mark.parametrize("cpu", [AVX2], indirect=True)
def test_binary_gemm_cpu_with_packed_activations_is_exact(cpu, m, k, n, packing, activation):
    from frugalrt.targets.kernels.cpu_binary import kernel_inputs

    x, w, scale, bias, pk = packed_case(RNG.standard_normal((m, k)).astype(np.float32), n, k, 1, packing, activation)
    expected = ref.binary_gemm(x, w, scale, bias, in_features=k, **packed_attrs(pk))
    func, consts = kernel_inputs(w, scale, bias, k, pk)
    np.testing.assert_array_equal(run(func, cpu.target, x, *consts, np.zeros_like(expected)), expected)


# (AVX512, 16) is the shipped kernel (vpopcntd on zmm); elsewhere LLVM legalizes the same TIR (16 lanes, or 8),
# so its logic is checked bit-exact on AVX2-only and baseline machines too. Shapes: K not a multiple of 32 (a tail
# word) or 64, N with whole 48-column blocks, a partial block with whole vectors and single columns, batch
# remainders of the 4-row tiles.
@pytest.mark.parametrize("cpu,lanes", [(AVX512, 16), (AVX2, 16), (AVX2, 8), (GENERIC, 16)], indirect=["cpu"])
@pytest.mark.parametrize("m,k,n", [(1, 8, 3), (5, 100, 40), (9, 4096, 48), (13, 64, 200), (7, 33, 97),
                                   (6, 1000, 1024), (2, 2050, 113)])
def test_binary_gemm_vpopcnt_tir_is_exact(cpu, m, k, n, lanes):
    from frugalrt.targets.kernels.cpu_binary_vpopcnt import kernel_inputs

    x = RNG.standard_normal((m, k)).astype(np.float32)
    x[0, : min(k, 5)] = 0.0  # sign(0) = +1
    x[-1, : min(k, 3)] = -0.0
    w = ref.pack_bits(RNG.standard_normal((n, k)))
    scale, bias = RNG.random(n).astype(np.float32) + 0.1, RNG.standard_normal(n).astype(np.float32)
    func, consts = kernel_inputs(w, scale, bias, k, lanes)
    y = run(func, cpu.target, x, *consts, np.zeros((m, n), np.float32))
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, bias, in_features=k))


@pytest.mark.parametrize("cpu,lanes", [(AVX512, 16), (AVX2, 16), (AVX2, 8)], indirect=["cpu"])
@pytest.mark.parametrize("packing,activation", [("in", {}), ("out", CLIP), ("in+out", {}), ("in+out", RELU)])
@pytest.mark.parametrize("m,k,n", [(1, 8, 3), (5, 100, 40), (9, 4096, 48), (7, 33, 97), (6, 1000, 1024),
                                   (2, 2050, 113)])
def test_binary_gemm_vpopcnt_with_packed_activations_is_exact(cpu, m, k, n, lanes, packing, activation):
    from frugalrt.targets.kernels.cpu_binary_vpopcnt import kernel_inputs

    x, w, scale, bias, pk = packed_case(RNG.standard_normal((m, k)).astype(np.float32), n, k, 1, packing, activation)
    expected = ref.binary_gemm(x, w, scale, bias, in_features=k, **packed_attrs(pk))
    func, consts = kernel_inputs(w, scale, bias, k, lanes, pk)
    np.testing.assert_array_equal(run(func, cpu.target, x, *consts, np.zeros_like(expected)), expected)


def test_vpopcnt_kernel_compiles_for_avx512_xeons(x86_cpu):
    """Compile-only, on any machine: the lowerings pick the 512-bit kernels, which count with ``vpopcntd``."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering

    xeon = x86_cpu(AVX512).target
    w, wc = ref.pack_bits(RNG.standard_normal((40, 300))), ref.pack_bits(RNG.standard_normal((8, 3 * 9)))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), 300), "float32"))
    img = relax.Var("img", relax.TensorType((1, 3, 6, 6), "float32"))
    with bb.function("main", [x, img]):
        y = get_lowering("ai.frugalrt", "BinaryGemm", 1).emit(
            bb, [x], {"W_packed": w, "scale": np.ones(40, np.float32)}, {"in_features": 300}, xeon)
        z = get_lowering("ai.frugalrt", "BinaryConv", 1).emit(
            bb, [img], {"W_packed": wc, "scale": np.ones(8, np.float32)},
            {"in_channels": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, xeon)
        bb.emit_func_output(relax.Tuple([y, z]))
    mod = bb.get()
    assert {"frugalrt_binary_gemm_vpopcnt", "frugalrt_binary_conv_cpu"} <= {gv.name_hint for gv in mod.functions}
    asm = tvm.compile(mod, target=xeon).mod.imports[0].inspect_source("asm")
    functions = asm.split(".Lfunc_end")  # one chunk per function
    for name in ("frugalrt_binary_gemm_vpopcnt", "frugalrt_binary_conv_cpu"):
        assert any(f"{name}" in f and "vpopcntd\t%zmm" in f for f in functions), name


@pytest.mark.parametrize("b,c,hw,o,kernel,strides,pads,bias,pad_value", [(*case, 0) for case in [
    (2, 3, (6, 5), 4, (3, 2), (2, 1), (1, 0, 1, 1), False),
    (1, 37, (9, 11), 10, (3, 3), (1, 1), (1, 1, 1, 1), True),
    (2, 37, (9, 11), 13, (3, 3), (2, 2), (1, 1, 1, 1), True),
    (1, 250, (5, 6), 9, (3, 3), (1, 1), (2, 1, 0, 1), False),  # 36 steps: two u8 flushes
    (1, 5, (4, 4), 6, (2, 2), (2, 2), (0, 0, 0, 0), True),
    (1, 7, (12, 13), 5, (3, 3), (2, 3), (0, 2, 1, 0), False),
    (3, 64, (10, 21), 8, (3, 3), (1, 1), (1, 1, 1, 1), True),
    (1, 65, (19, 37), 7, (3, 3), (1, 1), (1, 1, 1, 1), True),  # 37 columns: whole blocks, a clamped last vector
    (2, 33, (20, 40), 9, (3, 3), (2, 2), (1, 1, 1, 1), False),
    (1, 64, (17, 17), 16, (3, 3), (1, 1), (0, 0, 0, 0), True),  # 15 columns: narrower than a 16-lane vector
    (1, 40, (7, 61), 6, (3, 3), (1, 1), (1, 1, 1, 1), False),  # a 48-column block, then 13 (a clamped vector)
    (1, 19, (5, 56), 5, (3, 3), (1, 1), (1, 1, 1, 1), True),  # a 48-column block, then 8 (two channels a vector)
]] + [  # padded taps read +1
    (2, 3, (6, 5), 4, (3, 2), (2, 1), (1, 0, 1, 1), True, 1),
    (2, 37, (9, 11), 13, (3, 3), (2, 2), (1, 1, 1, 1), True, 1),
    (1, 7, (12, 13), 5, (3, 3), (2, 3), (0, 2, 1, 0), False, 1),
    (1, 19, (5, 56), 5, (3, 3), (1, 1), (1, 1, 1, 1), True, 1),
])
# 4 lanes: the AVX2 variant; 16: the AVX-512 (vpopcntd) one, also legalized by LLVM for AVX2, and at 8 lanes (AVX2
# intrinsics: no baseline variant, the generic conv serves x86-64 and runs in tests/targets/test_kernels.py)
@pytest.mark.parametrize("cpu,lanes", [(AVX2, 4), (AVX512, 16), (AVX2, 16), (AVX2, 8)], indirect=["cpu"])
def test_binary_conv_cpu_is_exact(cpu, b, c, hw, o, kernel, strides, pads, bias, pad_value, lanes):
    from frugalrt.targets.kernels.cpu_binary_conv import binary_conv_primfunc, repack

    x = RNG.standard_normal((b, c, *hw)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0
    wp = ref.pack_bits(RNG.standard_normal((o, c * kernel[0] * kernel[1])))
    scale = RNG.random(o).astype(np.float32) + 0.1
    b_vec = RNG.standard_normal(o).astype(np.float32) if bias else None
    words, row_ids, offset = repack(wp, c, *kernel, *hw, strides, pads, lanes, pad_value)
    o_pad = words.shape[-1]
    attrs = {"in_channels": c, "kernel_shape": kernel, "strides": strides, "pads": pads, "pad_value": pad_value}
    expected = ref.binary_conv(x, wp, scale, b_vec, **attrs)
    bias_p = np.zeros(o_pad, np.float32) if b_vec is None else np.pad(b_vec, (0, o_pad - o))
    y = run(binary_conv_primfunc(c, *hw, o, *kernel, strides, pads, offset.shape[0], lanes), cpu.target, x, words,
            row_ids, offset, np.pad(scale, (0, o_pad - o)), bias_p, np.zeros(expected.shape, np.float32))
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("b,c,hw,o,kernel,strides,pads,pad_value,packing,activation", [
    (2, 3, (6, 5), 4, (3, 2), (2, 1), (1, 0, 1, 1), 0, "in+out", CLIP),
    (1, 37, (9, 11), 13, (3, 3), (1, 1), (1, 1, 1, 1), 0, "in", {}),
    (1, 37, (9, 11), 13, (3, 3), (1, 1), (1, 1, 1, 1), 1, "out", RELU),
    (2, 37, (9, 11), 13, (3, 3), (2, 2), (1, 1, 1, 1), 1, "in+out", {}),
    (1, 65, (12, 13), 40, (3, 3), (2, 3), (0, 2, 1, 0), 0, "in+out", {}),  # 40 channels: a 32-channel group and 8
    (1, 65, (12, 13), 5, (3, 3), (2, 3), (0, 2, 1, 0), 1, "out", CLIP),
    (1, 64, (17, 17), 64, (3, 3), (1, 1), (0, 0, 0, 0), 0, "in+out", {}),  # 15 columns (narrow); u32 stores
    (1, 19, (5, 56), 33, (3, 3), (1, 1), (1, 1, 1, 1), 0, "out", {}),  # 48 + 8 columns
    (1, 19, (5, 56), 33, (3, 3), (1, 1), (1, 1, 1, 1), 1, "in", {}),
    (1, 40, (7, 61), 96, (3, 3), (1, 1), (2, 1, 0, 1), 0, "in+out", CLIP),  # 61 columns: a clamped last vector
    (1, 250, (5, 6), 9, (3, 3), (1, 1), (2, 1, 0, 1), 1, "in+out", {}),  # two u8 flushes (AVX2)
])
@pytest.mark.parametrize("cpu,lanes", [(AVX2, 4), (AVX512, 16), (AVX2, 16), (AVX2, 8)], indirect=["cpu"])
def test_binary_conv_cpu_with_packed_activations_is_exact(cpu, b, c, hw, o, kernel, strides, pads, pad_value, packing,
                                                         activation, lanes):
    from frugalrt.targets.kernels.cpu_binary_conv import kernel_inputs

    x = RNG.standard_normal((b, c, *hw)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0
    x, w, scale, bias, pk = packed_case(x, o, c * kernel[0] * kernel[1], 1, packing, activation)
    attrs = {"in_channels": c, "kernel_shape": kernel, "strides": strides, "pads": pads, "pad_value": pad_value}
    expected = ref.binary_conv(x, w, scale, bias, **attrs, **packed_attrs(pk))
    func, consts = kernel_inputs(w, scale, bias, c, *hw, kernel, strides, pads, lanes, pad_value, pk)
    np.testing.assert_array_equal(run(func, cpu.target, x, *consts, np.zeros_like(expected)), expected)


# mcpu -> (BinaryGemm kernel, an instruction its asm holds), (BinaryConv kernel, ditto), registers no code may use.
# The butterfly kernel serves every x86 CPU. Baseline code must not touch ymm/zmm (it runs on any x86-64), AVX2
# code no zmm (it runs on AVX2-only CPUs); AVX-512 without VPOPCNTDQ (x86-64-v4, Skylake-X) keeps the table
# kernel; with VPOPCNTDQ both count with vpopcntd on zmm.
_TABLE = (("frugalrt_binary_gemm_cpu", "vpshufb"), ("frugalrt_binary_conv_cpu", "vpsadbw"))
_VPOPCNT = (("frugalrt_binary_gemm_vpopcnt", "vpopcntd\t%zmm"), ("frugalrt_binary_conv_cpu", "vpopcntd\t%zmm"))
PICKS = {
    "x86-64": (("frugalrt_binary_gemm", None), ("frugalrt_binary_conv", None), ("%ymm", "%zmm")),
    "x86-64-v3": (*_TABLE, ("%zmm",)), "haswell": (*_TABLE, ("%zmm",)), "znver3": (*_TABLE, ("%zmm",)),
    "x86-64-v4": (*_TABLE, ()), "skylake-avx512": (*_TABLE, ()),
    "icelake-server": (*_VPOPCNT, ()), "sapphirerapids": (*_VPOPCNT, ()),
}


@pytest.mark.parametrize("mcpu", sorted(PICKS))
def test_lowerings_pick_the_x86_kernels(x86_cpu, mcpu):
    """Each named x86 CPU gets its kernels (never the host's choice): compiled and inspected everywhere,
    run through the Relax VM against the reference where this CPU can run the code."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering

    cpu = x86_cpu(mcpu)
    (gemm, gemm_instruction), (conv, conv_instruction), forbidden = PICKS[mcpu]
    tw = RNG.standard_normal((6, 32, 2, 2)).astype(np.float32)
    w, wc = ref.pack_bits(RNG.standard_normal((32, 64))), ref.pack_bits(RNG.standard_normal((4, 27)))
    scale = np.ones(32, np.float32)
    conv_attrs = {"in_channels": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), 64), "float32"))
    img = relax.Var("img", relax.TensorType((tvm.tirx.Var("batch", "int64"), 3, 6, 6), "float32"))
    with bb.function("main", [x, img]):
        y = get_lowering("ai.frugalrt", "Butterfly", 1).emit(bb, [x], {"twiddles": tw}, {"out_features": 64},
                                                             cpu.target)
        z = get_lowering("ai.frugalrt", "BinaryGemm", 1).emit(bb, [x], {"W_packed": w, "scale": scale},
                                                              {"in_features": 64}, cpu.target)
        c = get_lowering("ai.frugalrt", "BinaryConv", 1).emit(
            bb, [img], {"W_packed": wc, "scale": scale[:4]}, conv_attrs, cpu.target)
        bb.emit_func_output(relax.Tuple([y, z, c]))
    mod = bb.get()
    names = {gv.name_hint for gv in mod.functions}
    assert {"frugalrt_butterfly_cpu", gemm, conv} <= names, names
    assert not {"frugalrt_binary_gemm", "frugalrt_binary_gemm_cpu", "frugalrt_binary_gemm_vpopcnt"} - {gemm} & names
    lib = tvm.compile(mod, target=cpu.target)
    functions = lib.mod.imports[0].inspect_source("asm").split(".Lfunc_end")  # one chunk per function
    for name, instruction in ((gemm, gemm_instruction), (conv, conv_instruction)):
        if instruction:  # a fast kernel holds its instruction
            assert any(name in f and instruction in f for f in functions), (mcpu, name, instruction)
    for register in forbidden:  # and nothing the named CPU lacks
        assert not any(register in f for f in functions), (mcpu, register)
    if not cpu.runs_here:
        pytest.skip(f"{mcpu} code compiled and inspected, not run: this CPU lacks {cpu.lacks}")
    vm = relax.VirtualMachine(lib, tvm.cpu())
    xs = RNG.standard_normal((3, 64)).astype(np.float32)
    xs[0, :5] = 0.0  # sign(0) = +1
    imgs = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    got = [t.numpy() for t in vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(imgs))]
    expected = ref.butterfly(xs, tw, out_features=64)
    assert np.abs(got[0] - expected).max() <= 1e-5 * np.abs(expected).max()
    np.testing.assert_array_equal(got[1], ref.binary_gemm(xs, w, scale, in_features=64))
    np.testing.assert_array_equal(got[2], ref.binary_conv(imgs, wc, scale[:4], None, **conv_attrs))


@pytest.mark.parametrize("mcpu", sorted(PICKS))
def test_lowerings_pick_the_x86_kernels_for_packed_nodes(x86_cpu, mcpu):
    """Packed activations get the same kernel family as float ones (``*_packed``): two chains of three
    binary layers, float -> packed -> packed -> float, compiled, inspected and (where this CPU can) run."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering

    cpu = x86_cpu(mcpu)
    (gemm, gemm_instruction), (conv, conv_instruction), forbidden = PICKS[mcpu]
    gemm, conv = f"{gemm}_packed", f"{conv}_packed"
    gemms = [(64, 45, {"output_packed": 1, **CLIP}), (45, 37, {"input_packed": 1, "output_packed": 1}),
             (37, 13, {"input_packed": 1})]  # (K, N, attributes)
    convs = [(3, 11, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "output_packed": 1, "pad_value": 1}),
             (11, 37, {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 2, 1], "input_packed": 1,
                       "output_packed": 1, **RELU}),
             (37, 5, {"kernel_shape": [2, 2], "input_packed": 1})]  # (C, O, attributes)
    consts = [binary_consts(n, k * int(np.prod(a.get("kernel_shape", 1)))) for k, n, a in gemms + convs]
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), 64), "float32"))
    img = relax.Var("img", relax.TensorType((tvm.tirx.Var("batch", "int64"), 3, 9, 8), "float32"))
    with bb.function("main", [x, img]):
        y, z = x, img
        for (k, n, attrs), (w, scale, bias) in zip(gemms, consts):
            y = get_lowering("ai.frugalrt", "BinaryGemm", 1).emit(
                bb, [y], {"W_packed": w, "scale": scale, "B": bias}, {"in_features": k, **attrs}, cpu.target)
        for (c, o, attrs), (w, scale, bias) in zip(convs, consts[len(gemms):]):
            z = get_lowering("ai.frugalrt", "BinaryConv", 1).emit(
                bb, [z], {"W_packed": w, "scale": scale, "B": bias}, {"in_channels": c, **attrs}, cpu.target)
        bb.emit_func_output(relax.Tuple([y, z]))
    mod = bb.get()
    names = [gv.name_hint for gv in mod.functions]
    assert [sum(name.startswith(kernel) for name in names) for kernel in (gemm, conv)] == [3, 3], names
    lib = tvm.compile(mod, target=cpu.target)
    functions = lib.mod.imports[0].inspect_source("asm").split(".Lfunc_end")
    for name, instruction in ((gemm, gemm_instruction), (conv, conv_instruction)):
        if instruction:
            assert any(name in f and instruction in f for f in functions), (mcpu, name, instruction)
    for register in forbidden:
        assert not any(register in f for f in functions), (mcpu, register)
    if not cpu.runs_here:
        pytest.skip(f"{mcpu} code compiled and inspected, not run: this CPU lacks {cpu.lacks}")
    vm = relax.VirtualMachine(lib, tvm.cpu())
    xs, imgs = RNG.standard_normal((3, 64)).astype(np.float32), RNG.standard_normal((2, 3, 9, 8)).astype(np.float32)
    xs[0, :5] = 0.0  # sign(0) = +1
    got = [t.numpy() for t in vm["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(imgs))]
    y, z = xs, imgs
    for (k, n, attrs), (w, scale, bias) in zip(gemms, consts):
        y = ref.binary_gemm(y, w, scale, bias, in_features=k, **attrs)
    for (c, o, attrs), (w, scale, bias) in zip(convs, consts[len(gemms):]):
        z = ref.binary_conv(z, w, scale, bias, in_channels=c, **attrs)
    np.testing.assert_array_equal(got[0], y)
    np.testing.assert_array_equal(got[1], z)


# the table kernel's u16 counters reach 65520; beyond, the generic fallback. vpopcnt: u64 counters, any K.
@pytest.mark.parametrize("mcpu,k,kernel", [(AVX2, 65520, "frugalrt_binary_gemm_cpu"),
                                           (AVX2, 65536, "frugalrt_binary_gemm"),
                                           (AVX512, 65536, "frugalrt_binary_gemm_vpopcnt")])
def test_binary_gemm_with_huge_k_stays_exact(x86_cpu, mcpu, k, kernel):
    """Every bit differs: the counters reach K. The x86 entry must not let them overflow."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering

    cpu = x86_cpu(mcpu)
    x = -np.ones((1, k), np.float32)  # every bit differs from the all-positive weights: S = -K
    w, scale = ref.pack_bits(np.ones((2, k))), np.ones(2, np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((1, k), "float32"))
    with bb.function("main", [xv]):
        bb.emit_func_output(get_lowering("ai.frugalrt", "BinaryGemm", 1).emit(
            bb, [xv], {"W_packed": w, "scale": scale}, {"in_features": k}, cpu.target))
    assert kernel in {gv.name_hint for gv in bb.get().functions}
    cpu.require(INSPECTED)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=cpu.target), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, in_features=k))
    assert y[0, 0] == -k


@pytest.mark.parametrize("op,consts,attrs,x_shape,match", [
    ("BinaryConv", {"W_packed": np.zeros((4, 4), np.uint8), "scale": np.ones(4, np.float32)},
     {"in_channels": 3, "kernel_shape": [3, 3]}, (1, 3, 2, 2), "output 0x0"),
    ("BinaryConv", {"W_packed": np.zeros((4, 3), np.uint8), "scale": np.ones(4, np.float32)},
     {"in_channels": 3, "kernel_shape": [3, 3]}, (1, 3, 6, 6), r"expects \[O, 4\]"),
    ("Butterfly", {"twiddles": np.zeros((3, 4, 2, 2), np.float32)}, {"out_features": 9}, (1, 8), "exceed N=8"),
])
@pytest.mark.parametrize("mcpu", [GENERIC, AVX2, AVX512])
def test_lowerings_reject_inconsistent_shapes(x86_cpu, mcpu, op, consts, attrs, x_shape, match):
    from tvm import relax

    from frugalrt.errors import UnsupportedOpError
    from frugalrt.targets.kernels import get_lowering

    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with pytest.raises(UnsupportedOpError, match=match), bb.function("main", [xv]):
        get_lowering("ai.frugalrt", op, 1).emit(bb, [xv], consts, attrs, x86_cpu(mcpu).target)


def test_kernel_scratch_is_not_heap_memory(scratch_in_registers):
    """Every CPU kernel keeps its scratch in registers (tests/targets/conftest.py says why)."""
    from frugalrt.targets.kernels import arm_binary, cpu_binary, cpu_binary_conv, cpu_binary_vpopcnt, cpu_butterfly
    from frugalrt.targets.kernels.packing import Packing

    w = ref.pack_bits(RNG.standard_normal((8, 3 * 9)))
    neon = [ref.pack_bits(RNG.standard_normal((40, 1000))), np.ones(40, np.float32), None, 1000]
    words, row_ids, offset = cpu_binary_conv.repack(w, 3, 3, 3, 6, 6, [1, 1], [1, 1, 1, 1])
    wide = cpu_binary_conv.repack(w, 3, 3, 3, 6, 6, [1, 1], [1, 1, 1, 1], cpu_binary_vpopcnt.LANES)[2]
    packed = Packing(True, True)
    kernels = {
        "gemm x86": cpu_binary.binary_gemm_primfunc(1000, 40, 48, True),
        "gemm x86 packed nibbles": cpu_binary.binary_gemm_primfunc(1000, 40, 48, False),
        "gemm aarch64": arm_binary.kernel_inputs(*neon, "aarch64")[0],
        "gemm armv7": arm_binary.kernel_inputs(*neon, "arm")[0],
        "gemm vpopcnt": cpu_binary_vpopcnt.vpopcnt_gemm_primfunc(300, 40, 64),
        "conv": cpu_binary_conv.binary_conv_primfunc(3, 6, 6, 8, 3, 3, [1, 1], [1, 1, 1, 1], offset.shape[0]),
        "conv vpopcnt": cpu_binary_conv.binary_conv_primfunc(3, 6, 6, 8, 3, 3, [1, 1], [1, 1, 1, 1], wide.shape[0],
                                                             cpu_binary_vpopcnt.LANES),
        "butterfly": cpu_butterfly.butterfly_primfunc(1024, 1000, 1000),
        "gemm x86 packed": cpu_binary.binary_gemm_primfunc(1000, 40, 48, True, packed),
        "gemm vpopcnt packed": cpu_binary_vpopcnt.vpopcnt_gemm_primfunc(300, 40, 64, packing=packed),
        "conv packed": cpu_binary_conv.binary_conv_primfunc(37, 6, 6, 40, 3, 3, [1, 1], [1, 1, 1, 1], offset.shape[0],
                                                            packing=packed),
        "conv vpopcnt packed": cpu_binary_conv.binary_conv_primfunc(37, 6, 6, 40, 3, 3, [1, 1], [1, 1, 1, 1],
                                                                    wide.shape[0], cpu_binary_vpopcnt.LANES, packed),
    }
    for name, func in kernels.items():
        scratch_in_registers(name, func)
