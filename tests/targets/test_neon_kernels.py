"""The AArch64 (NEON ``tbl``) binary GEMM, compiled for ``rpi4`` and run on the session's emulated
Raspberry Pi 4 over RPC, bit-exact against the numpy reference (oracle).

Shapes cover the 4-row tiles and their remainder rows, N and K not multiples of 16, and both weight
layouts (split nibbles; packed nibbles once the split weights outgrow ``SPLIT_MAX_BYTES``).
"""
import numpy as np
import pytest

from frugalrt.export.single_op import single_op_model
from frugalrt.runtime import reference as ref

RNG = np.random.default_rng(0)


@pytest.mark.emulated
@pytest.mark.parametrize("batch,k,n", [(5, 100, 40), (6, 1024, 64), (3, 2064, 1024)])
def test_neon_binary_gemm_is_exact_on_rpi4(rpi4_device, tmp_path, batch, k, n):
    import onnx

    import frugalrt
    from frugalrt.targets.kernels.cpu_binary import OUTS, SPLIT_MAX_BYTES

    w = ref.pack_bits(RNG.standard_normal((n, k)))
    scale, bias = RNG.random(n).astype(np.float32) + 0.1, RNG.standard_normal(n).astype(np.float32)
    onnx.save(single_op_model("BinaryGemm", [k], {"W_packed": w, "scale": scale, "B": bias}, {"in_features": k}),
              tmp_path / "gemm.onnx")
    frugalrt.compile(tmp_path / "gemm.onnx", "rpi4", tmp_path / "rpi4")
    x = RNG.standard_normal((batch, k)).astype(np.float32)
    x[0, :5] = 0.0  # sign(0) = +1
    session = frugalrt.load(tmp_path / "rpi4", device=rpi4_device)
    try:
        (y,) = session(x)
    finally:
        session.close()
    np.testing.assert_array_equal(y, ref.binary_gemm(x, w, scale, bias, in_features=k))
    split_bytes = -(-n // OUTS) * -(-k // 16) * 64
    assert (split_bytes > SPLIT_MAX_BYTES) == (k == 2064)  # the last case takes the packed layout


@pytest.mark.compile
def test_rpi4_lowering_uses_tbl():
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels import get_lowering
    from frugalrt.targets.registry import tvm_target

    target = tvm_target("rpi4")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), 300), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(get_lowering("ai.frugalrt", "BinaryGemm", 1).emit(
            bb, [x], {"W_packed": ref.pack_bits(RNG.standard_normal((40, 300))), "scale": np.ones(40, np.float32)},
            {"in_features": 300}, target))
    assert "frugalrt_binary_gemm_cpu" in {gv.name_hint for gv in bb.get().functions}
    asm = tvm.compile(bb.get(), target=target).mod.imports[0].inspect_source("asm")
    assert "\ttbl\t" in asm
