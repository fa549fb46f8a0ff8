"""Every ai.frugalrt op imported from ONNX and compiled for each x86 kernel family vs the numpy
reference (oracle), batch 1 and 7.

The CPUs are named explicitly (never the one LLVM detects here), so every kernel family is covered
whatever the machine: ``x86-64`` (generic kernels), ``haswell`` (AVX2 table GEMM, byte-count conv)
and ``icelake-server`` (AVX-512 ``vpopcntq`` GEMM and conv). A case runs where this CPU has what its
code may use and is skipped otherwise (tests/targets/test_cpu_kernels.py compiles and inspects the
kernels of every CPU on any machine). Each case is one single-node ONNX model (``single_op_model``),
compiled once (module fixture) and run on several batches, with zeros in X to pin sign(0) = +1.
"""
import numpy as np
import pytest

from frugalrt.export.single_op import single_op_model
from frugalrt.runtime import reference as ref

pytestmark = pytest.mark.compile
BATCHES = (1, 7)
CPUS = ("x86-64", "haswell", "icelake-server")  # generic, AVX2, AVX-512 VPOPCNTDQ kernels
RNG = np.random.default_rng(0)


def butterfly(n, width, out, bias):
    tw = RNG.standard_normal((n.bit_length() - 1, n // 2, 2, 2)).astype(np.float32)
    consts = {"twiddles": tw, **({"B": RNG.standard_normal(out).astype(np.float32)} if bias else {})}
    return ("Butterfly", [width], consts, {"out_features": out},
            lambda x: ref.butterfly(x, tw, consts.get("B"), out_features=out))


def binary_gemm(k, n, bias):
    w = ref.pack_bits(RNG.standard_normal((n, k)))
    consts = {"W_packed": w, "scale": RNG.random(n).astype(np.float32) + 0.1,
              **({"B": RNG.standard_normal(n).astype(np.float32)} if bias else {})}
    return ("BinaryGemm", [k], consts, {"in_features": k},
            lambda x: ref.binary_gemm(x, w, consts["scale"], consts.get("B"), in_features=k))


def binary_conv(c, hw, o, kernel, strides, pads, bias, pad_value=0):
    w = ref.pack_bits(RNG.standard_normal((o, c * kernel[0] * kernel[1])))
    consts = {"W_packed": w, "scale": RNG.random(o).astype(np.float32) + 0.1,
              **({"B": RNG.standard_normal(o).astype(np.float32)} if bias else {})}
    attrs = {"in_channels": c, "kernel_shape": kernel, "strides": strides, "pads": pads,
             **({"pad_value": pad_value} if pad_value else {})}
    return ("BinaryConv", [c, *hw], consts, attrs,
            lambda x: ref.binary_conv(x, w, consts["scale"], consts.get("B"), **attrs))


CASES = {
    "butterfly-16": butterfly(16, 16, 16, bias=False),
    "butterfly-32-pad20-out12-bias": butterfly(32, 20, 12, bias=True),
    "butterfly-2": butterfly(2, 1, 2, bias=True),
    "butterfly-256-in64": butterfly(256, 64, 256, bias=True),
    "gemm-64x8-bias": binary_gemm(64, 8, bias=True),
    "gemm-70x5": binary_gemm(70, 5, bias=False),
    "gemm-200x33-bias": binary_gemm(200, 33, bias=True),
    "conv-3c-6x5-k3x2-s2x1-pad-asym": binary_conv(3, (6, 5), 4, [3, 2], [2, 1], [1, 0, 1, 1], bias=False),
    "conv-2c-7x7-k3-pad1-bias": binary_conv(2, (7, 7), 3, [3, 3], [1, 1], [1, 1, 1, 1], bias=True),
    "conv-5c-4x4-k2-s2-bias": binary_conv(5, (4, 4), 6, [2, 2], [2, 2], [0, 0, 0, 0], bias=True),
    "conv-16c-5x5-k3-pad1": binary_conv(16, (5, 5), 8, [3, 3], [1, 1], [1, 1, 1, 1], bias=False),
    "conv-3c-6x5-k3x2-s2x1-pad-asym-one": binary_conv(3, (6, 5), 4, [3, 2], [2, 1], [1, 0, 1, 1], False, pad_value=1),
    "conv-65c-7x9-k3-s2-pad-one-bias": binary_conv(65, (7, 9), 13, [3, 3], [2, 2], [1, 1, 2, 1], True, pad_value=1),
}


@pytest.fixture(scope="module", params=[(case, cpu) for cpu in CPUS for case in sorted(CASES)],
                ids=lambda p: f"{p[1]}-{p[0]}")
def compiled(request, x86_cpu):
    import tvm
    from tvm import relax

    from frugalrt.targets.importer import import_onnx

    case, mcpu = request.param
    cpu = x86_cpu(mcpu)
    cpu.require("tests/targets/test_cpu_kernels.py::test_lowerings_pick_the_x86_kernels")
    op, x_dims, consts, attrs, oracle = CASES[case]
    target = cpu.target
    mod = import_onnx(single_op_model(op, x_dims, consts, attrs), target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    return (lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()), x_dims, oracle


@pytest.mark.parametrize("batch", BATCHES)
def test_op_matches_reference(compiled, batch):
    run, x_dims, oracle = compiled
    x = RNG.standard_normal((batch, *x_dims)).astype(np.float32)
    x.flat[::5] = 0.0  # sign(0) = +1
    got, want = run(x), oracle(x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_c_target_popcount_calls_frugalrt_helper():
    """The C codegen lowers tirx.popcount to frugalrt_popcount{32,64}, which the C bundle's shim defines."""
    import tvm

    from frugalrt.targets.importer import import_onnx

    op, x_dims, consts, attrs, _ = CASES["gemm-70x5"]
    target = tvm.target.Target({"kind": "c"})
    mod = import_onnx(single_op_model(op, x_dims, consts, attrs), target)
    source = tvm.compile(mod, target=target).mod.imports[0].inspect_source()
    assert "frugalrt_popcount32(" in source and "__builtin_popcount" not in source
