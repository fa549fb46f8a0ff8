"""Standard ops at library speed (``frugalrt.targets.kernels.standard``): the dense / batched matmul,
convolution, softmax, LayerNorm and GELU kernels vs numpy (float64 oracle), the Relax rewrite, and whole
models (a transformer block, a small CNN) vs ONNX Runtime.

Kernels are compiled for x86 CPUs named explicitly (``x86-64``: SSE2, 4 lanes, no FMA; ``haswell``: AVX2 +
FMA; ``skylake-avx512``: AVX-512) with the configuration :func:`standard.target_isa` picks for each, and run
where this CPU has the ISA (``x86_cpu(...).runs_here``, tests/conftest.py); everywhere,
``test_kernels_compile_to_the_family_isa`` compiles them for each CPU and for ``rpi4`` (NEON) and inspects
the assembly. Shapes: M = 1, 7, 13 (row blocks and the rows left over) through one compiled kernel
(dynamic batch), K and N not multiples of the vector width, K over several cache blocks, N over
panel groups and a partial panel.

Tolerances: a float32 sum of K products carries about eps32 * sqrt(K) times its scale of rounding
error, so matmuls pass within ``8 eps32 sqrt(K) max|ref|`` (``max|ref|`` of |x| @ |w| for the
scale); softmax 1e-6 absolute (values <= 1); LayerNorm ``8 eps32 sqrt(n) max|ref|``; GELU and erf
``2.5e-7 max(1, |x|) + 4 eps32 |ref|`` (the rational erf is accurate to ~1e-7; ``x (1 + erf)`` scales it).
"""
import math

import numpy as np
import pytest

pytestmark = pytest.mark.compile
RNG = np.random.default_rng(0)
EPS32 = float(np.finfo(np.float32).eps)
GENERIC, AVX2, AVX512 = "x86-64", "haswell", "skylake-avx512"
INSPECTED = "test_kernels_compile_to_the_family_isa"


def isa_of(target):
    from frugalrt.targets.kernels.standard import target_isa

    return target_isa(target)


def build(func, target):
    import tvm

    return tvm.compile(func, target=target)


def call(lib, *arrays):
    import tvm

    args = [tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu()) for a in arrays]
    lib(*args)
    return args[-1].numpy()


def assert_matmul_close(y, x, w, bias=None):
    """``y`` vs float64 ``x @ w (+ bias)`` within 8 eps32 sqrt(K) times the scale of the sum."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    expected = x64 @ w64 + (0 if bias is None else bias)
    scale = (np.abs(x64) @ np.abs(w64)).max() + (0 if bias is None else np.abs(bias).max())
    k = x.shape[-1]
    err = np.abs(y - expected).max()
    assert err <= 8 * EPS32 * math.sqrt(k) * scale, (err, scale)


def test_isa_per_target(x86_cpu):
    from frugalrt.targets.registry import tvm_target

    assert isa_of(x86_cpu(GENERIC).target).name == "sse"
    assert isa_of(x86_cpu(AVX2).target).name == "avx2"
    assert isa_of(x86_cpu(AVX512).target).name == "avx512"
    assert isa_of(tvm_target("rpi4")).name == "neon"
    for name in ("armv7", "rpi-zero", "cortex-m4", "cuda"):  # TVM's default legalization there
        assert isa_of(tvm_target(name)) is None, name


# --- kernels vs numpy -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,bias", [(1, 1, False), (5, 10, True), (17, 33, False), (64, 64, True),
                                      (300, 77, True), (260, 130, False), (1024, 10, True)])
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_dense_matches_numpy(cpu, k, n, bias):
    from frugalrt.targets.kernels.cpu_dense import dense_primfunc, pack_panels, padded_bias

    cfg = isa_of(cpu.target).dense
    w = RNG.standard_normal((k, n)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32) if bias else None
    lib = build(dense_primfunc(k, n, cfg), cpu.target)
    wp, bp = pack_panels(w, cfg.nr), padded_bias(b, n, cfg.nr)
    for m in (1, 7, 13, 2 * cfg.mr + 3):  # one kernel, dynamic batch: row blocks and the rows left over
        x = RNG.standard_normal((m, k)).astype(np.float32)
        y = call(lib, x, wp, bp, np.zeros((m, n), np.float32))
        assert_matmul_close(y, x, w, b)


@pytest.mark.parametrize("k,n,transpose", [(13, 5, True), (33, 70, False), (64, 64, False), (64, 64, True),
                                           (300, 17, False), (16, 50, True)])
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_batch_matmul_matches_numpy(cpu, k, n, transpose):
    from frugalrt.targets.kernels.cpu_dense import batch_matmul_primfunc

    lib = build(batch_matmul_primfunc(k, n, isa_of(cpu.target).dense, transpose), cpu.target)
    for batch, m in ((3, 7), (1, 1), (2, 20)):  # batch and M dynamic
        a = RNG.standard_normal((batch, m, k)).astype(np.float32)
        b = RNG.standard_normal((batch, n, k) if transpose else (batch, k, n)).astype(np.float32)
        y = call(lib, a, b, np.zeros((batch, m, n), np.float32))
        for i in range(batch):
            assert_matmul_close(y[i], a[i], b[i].T if transpose else b[i])


def conv_reference(x, w, bias, stride, pads):
    """float64 NCHW convolution (OIHW weights, pads top, left, bottom, right)."""
    top, left, bottom, right = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    o, _, kh, kw = w.shape
    oh, ow = (xp.shape[2] - kh) // stride + 1, (xp.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], o, oh, ow)) + bias.reshape(1, o, 1, 1)
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            y += np.einsum("oc,bchw->bohw", w[:, :, i, j].astype(np.float64), window)
    return y


@pytest.mark.parametrize("c,o,hw,kernel,stride,pads", [
    (3, 32, (32, 32), (3, 3), 1, (1, 1, 1, 1)),  # a 3-channel stem
    (3, 16, (20, 21), (3, 3), 2, (1, 1, 1, 1)),  # strided stem, odd sizes
    (32, 17, (9, 9), (3, 3), 1, (1, 1, 1, 1)),  # O not a multiple of the row block
    (24, 40, (7, 6), (1, 1), 1, (0, 0, 0, 0)),  # pointwise
    (5, 7, (9, 11), (3, 2), 2, (1, 0, 1, 1)),  # asymmetric kernel and pads
    (4, 3, (6, 5), (2, 2), 3, (0, 2, 1, 0)),  # stride 3
])
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_conv2d_matches_numpy(cpu, c, o, hw, kernel, stride, pads):
    from frugalrt.targets.kernels.cpu_dense import conv2d_primfunc, conv_plan

    cfg = isa_of(cpu.target).dense
    w = RNG.standard_normal((o, c, *kernel)).astype(np.float32)
    bias = RNG.standard_normal(o).astype(np.float32)
    plan = conv_plan(c, *hw, o, *kernel, stride, pads, cfg.nr)
    lib = build(conv2d_primfunc(plan, cfg), cpu.target)
    for batch in (1, 3):  # dynamic batch
        x = RNG.standard_normal((batch, c, *hw)).astype(np.float32)
        y = call(lib, x, w.reshape(o, -1), plan.offsets, bias, np.zeros((batch, o, plan.oh, plan.ow), np.float32))
        expected = conv_reference(x, w, bias, stride, pads)
        scale = conv_reference(np.abs(x), np.abs(w), np.abs(bias), stride, pads).max()
        assert y.shape == expected.shape
        assert np.abs(y - expected).max() <= 8 * EPS32 * math.sqrt(c * kernel[0] * kernel[1]) * scale


ROWS = [(1, 1), (3, 5), (7, 16), (5, 17), (9, 100), (2, 1000)]


@pytest.mark.parametrize("rows,n", ROWS)
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_softmax_matches_numpy(cpu, rows, n):
    from frugalrt.targets.kernels.cpu_norm import softmax_primfunc

    x = (RNG.standard_normal((rows, n)) * 5).astype(np.float32)
    if n > 3:
        x[0, 2] = -np.inf  # a masked score: exactly 0
    if rows > 2:
        x[1, 0] = np.nan  # NaN row stays NaN
    lib = build(softmax_primfunc(n, isa_of(cpu.target).lanes), cpu.target)
    y = call(lib, x, np.zeros_like(x))
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    expected = e / e.sum(-1, keepdims=True)
    finite = ~np.isnan(expected)
    assert np.abs(y[finite] - expected[finite]).max() <= 1e-6
    assert np.isnan(y[~finite]).all()
    if n > 3:
        assert y[0, 2] == 0.0


@pytest.mark.parametrize("rows,n", ROWS)
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_layer_norm_matches_numpy(cpu, rows, n):
    from frugalrt.targets.kernels.cpu_norm import layer_norm_primfunc

    x = (RNG.standard_normal((rows, n)) * 3 + 10).astype(np.float32)  # an offset mean: two-pass variance
    gamma, beta = RNG.standard_normal(n).astype(np.float32), RNG.standard_normal(n).astype(np.float32)
    lib = build(layer_norm_primfunc(n, isa_of(cpu.target).lanes, 1e-5), cpu.target)
    y = call(lib, x, gamma, beta, np.zeros_like(x))
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    expected = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gamma + beta
    assert np.abs(y - expected).max() <= 8 * EPS32 * math.sqrt(n) * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "erf"])
@pytest.mark.parametrize("cpu", [GENERIC, AVX2, AVX512], indirect=True)
def test_elementwise_matches_numpy(cpu, kind):
    from frugalrt.targets.kernels.cpu_norm import elementwise_primfunc, reference_gelu

    lib = build(elementwise_primfunc(kind, isa_of(cpu.target).lanes), cpu.target)
    for size in (1, 7, 67, 20011):  # dynamic size: the vector loop, its unrolled part and the scalar tail
        x = np.linspace(-9, 9, size).astype(np.float32)
        y = call(lib, x, np.zeros_like(x))
        x64 = x.astype(np.float64)
        expected = (np.vectorize(math.erf)(x64) if kind == "erf"
                    else reference_gelu(x64, "tanh" if kind == "gelu_tanh" else "none"))
        tol = 2.5e-7 * np.maximum(1.0, np.abs(x64)) + 4 * EPS32 * np.abs(expected)  # GELU: x (1 + erf) cancels
        assert (np.abs(y - expected) <= tol).all(), np.abs(y - expected).max()
    special = np.array([np.nan, np.inf, 0.0, -0.0], np.float32)
    y = call(lib, special, np.zeros_like(special))
    assert np.isnan(y[0]) and y[1] == (1.0 if kind == "erf" else np.inf) and (y[2:] == 0).all()


def test_exp_is_accurate_and_exact_at_the_ends():
    """The vector exp of the softmax kernel: 2 ulp over its range, exp(-inf) = 0, exp(0) = 1, NaN kept."""
    import tvm
    from tvm.script import tirx as T

    from frugalrt.targets.kernels.cpu_norm import EXP_HI, exp

    n = 4096

    @T.prim_func
    def kernel(a: T.Buffer((n,), "float32"), b: T.Buffer((n,), "float32")):
        for i in range(n // 8):
            b[T.ramp(i * 8, 1, 8)] = exp(a[T.ramp(i * 8, 1, 8)])

    x = np.concatenate([np.linspace(-87, EXP_HI - 0.01, n - 6), [0, -np.inf, np.nan, -100, np.inf, 1]]).astype(
        np.float32)
    y = call(build(kernel, tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": GENERIC})),
             x, np.zeros_like(x))
    ref = np.exp(x[:-6].astype(np.float64))
    assert (np.abs(y[:-6] - ref) / ref).max() <= 2 * EPS32
    assert y[-6] == 1 and y[-5] == 0 and np.isnan(y[-4]) and y[-3] == 0 and y[-2] == np.inf
    assert abs(y[-1] - math.e) <= EPS32 * math.e


def test_kernel_scratch_is_not_heap_memory(scratch_in_registers):
    """Mutable TIR variables and "local" buffers become heap memory in the Relax build, and so does a
    buffer of 1 KiB or more: the accumulators must stay below (stack arrays LLVM keeps in registers)."""
    from frugalrt.targets.kernels import cpu_dense, cpu_norm
    from frugalrt.targets.kernels.cpu_dense import CONFIGS, _kernel_scratch

    kernels = {f"dense {name}": cpu_dense.dense_primfunc(300, 130, cfg) for name, cfg in CONFIGS.items()}
    kernels.update({f"bmm {name}": cpu_dense.batch_matmul_primfunc(64, 70, cfg, True) for name, cfg in CONFIGS.items()})
    kernels.update({"softmax": cpu_norm.softmax_primfunc(100, 16), "gelu": cpu_norm.elementwise_primfunc("gelu", 16),
                    "layer_norm": cpu_norm.layer_norm_primfunc(100, 16, 1e-5)})
    for name, func in kernels.items():
        scratch_in_registers(name, func)
    for cfg in CONFIGS.values():
        for shape in _kernel_scratch(cfg):
            assert shape[0] * shape[1] * 4 < 1024, (cfg, shape)


def test_dense_accumulators_stay_in_registers_in_the_relax_build():
    """No TVMBackendAllocWorkspace in a compiled dense kernel (it made artifacts 2x slower)."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels.standard import lower_standard_ops
    from frugalrt.targets.registry import tvm_target

    for target in (tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": AVX512}),
                   tvm_target("rpi4")):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((tvm.tirx.Var("batch", "int64"), 300), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.matmul(x, relax.const(RNG.standard_normal((300, 130)).astype(np.float32))))
            bb.emit_func_output(y)
        mod = lower_standard_ops(bb.get(), target)
        assert [gv.name_hint for gv in mod.functions if gv.name_hint != "main"] == ["frugalrt_dense_cpu"]
        ll = tvm.compile(mod, target=target).mod.imports[0].inspect_source("ll")
        assert not [line for line in ll.splitlines() if "load ptr, ptr @__TVMBackendAllocWorkspace" in line], target


# --- the Relax rewrite ----------------------------------------------------------------------------
S, D, HEADS, FF, CLASSES = 12, 32, 2, 40, 10  # sequence, width, heads, hidden, classes: not multiples of 16


def transformer_onnx():
    """A small transformer block in standard ONNX (opset 20): Q/K/V MatMul + Add, heads by Reshape and
    Transpose, scaled Q K^T, Softmax, P V, output Gemm (transB, bias), residual, LayerNormalization, a
    Gelu MLP, a second LayerNorm and an erf-form GELU on a 10-class head. Input [batch, 12, 32]."""
    from onnx import TensorProto, helper, numpy_helper

    def w(*shape, scale=None):
        return (RNG.standard_normal(shape) * (scale or shape[0] ** -0.5)).astype(np.float32)

    dh = D // HEADS
    inits = {"Wq": w(D, D), "Wk": w(D, D), "Wv": w(D, D), "bq": w(D, scale=0.1), "bk": w(D, scale=0.1),
             "bv": w(D, scale=0.1), "Wo": w(D, D), "bo": w(D, scale=0.1), "g1": 1 + w(D, scale=0.1),
             "be1": w(D, scale=0.1), "W1": w(D, FF), "b1": w(FF, scale=0.1), "W2": w(FF, D), "b2": w(D, scale=0.1),
             "g2": 1 + w(D, scale=0.1), "be2": w(D, scale=0.1), "Wc": w(D, CLASSES), "bc": w(CLASSES, scale=0.1),
             "heads": np.array([0, S, HEADS, dh], np.int64), "flat": np.array([-1, D], np.int64),
             "back": np.array([-1, S, D], np.int64), "merge": np.array([0, S, D], np.int64),
             "scale": np.array(dh ** -0.5, np.float32), "sqrt2": np.array(math.sqrt(2), np.float32),
             "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
    n = helper.make_node
    nodes = []
    for p in "qkv":
        nodes += [n("MatMul", ["X", f"W{p}"], [f"{p}0"]), n("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  n("Reshape", [f"{p}1", "heads"], [f"{p}2"])]
    nodes += [n("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]), n("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
              n("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3]),
              n("MatMul", ["q", "kt"], ["s0"]), n("Mul", ["s0", "scale"], ["s1"]), n("Softmax", ["s1"], ["p"], axis=-1),
              n("MatMul", ["p", "v"], ["c0"]), n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
              n("Reshape", ["c1", "flat"], ["c2"]), n("Gemm", ["c2", "Wo", "bo"], ["o0"], transB=1),
              n("Reshape", ["o0", "back"], ["o1"]), n("Add", ["X", "o1"], ["r1"]),
              n("LayerNormalization", ["r1", "g1", "be1"], ["h1"], axis=-1, epsilon=1e-5),
              n("MatMul", ["h1", "W1"], ["f0"]), n("Add", ["f0", "b1"], ["f1"]), n("Gelu", ["f1"], ["f2"]),
              n("MatMul", ["f2", "W2"], ["f3"]), n("Add", ["f3", "b2"], ["f4"]), n("Add", ["h1", "f4"], ["r2"]),
              n("LayerNormalization", ["r2", "g2", "be2"], ["h2"], axis=-1, epsilon=1e-5),
              n("MatMul", ["h2", "Wc"], ["z0"]), n("Add", ["z0", "bc"], ["z1"]),
              n("Div", ["z1", "sqrt2"], ["e0"]), n("Erf", ["e0"], ["e1"]), n("Add", ["e1", "one"], ["e2"]),
              n("Mul", ["z1", "e2"], ["e3"]), n("Mul", ["e3", "half"], ["Y"])]
    inits["Wo"] = np.ascontiguousarray(inits["Wo"].T)  # Gemm transB: [out, in]
    graph = helper.make_graph(nodes, "transformer",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", S, D])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", S, CLASSES])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def cnn_onnx():
    """A small CNN in standard ONNX: a 3-channel strided stem Conv (bias), Relu, a 3x3 Conv, Relu, a 1x1
    Conv, GlobalAveragePool, Flatten and a Gemm head. Input [batch, 3, 17, 17]."""
    from onnx import TensorProto, helper, numpy_helper

    def w(*shape):
        return (RNG.standard_normal(shape) * np.prod(shape[1:]) ** -0.5).astype(np.float32)

    inits = {"W1": w(16, 3, 3, 3), "B1": w(16, 1), "W2": w(24, 16, 3, 3), "B2": w(24, 1), "W3": w(20, 24, 1, 1),
             "Wc": w(CLASSES, 20), "Bc": w(CLASSES, 1)}
    inits = {k: v.reshape(-1) if k.startswith("B") else v for k, v in inits.items()}
    n = helper.make_node
    nodes = [n("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]), n("Relu", ["c1"], ["r1"]),
             n("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1]), n("Relu", ["c2"], ["r2"]),
             n("Conv", ["r2", "W3"], ["c3"]), n("GlobalAveragePool", ["c3"], ["g"]), n("Flatten", ["g"], ["f"]),
             n("Gemm", ["f", "Wc", "Bc"], ["Y"], transB=1)]
    graph = helper.make_graph(nodes, "cnn",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 17, 17])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", CLASSES])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@pytest.fixture(scope="module")
def cnn():
    from benchmarks.common import ort_session

    model = cnn_onnx()
    return model, ort_session(model)


@pytest.fixture(scope="module")
def transformer():
    """(ONNX model, its ONNX Runtime session)."""
    from benchmarks.common import ort_session

    model = transformer_onnx()
    return model, ort_session(model)


def ort_run(session, x):
    return session.run(None, {"X": x})[0]


KERNEL_NAMES = {"frugalrt_dense_cpu", "frugalrt_batch_matmul_cpu", "frugalrt_softmax_cpu",
                "frugalrt_layer_norm_cpu", "frugalrt_gelu_cpu", "frugalrt_erf_cpu"}


def relax_calls(mod) -> dict:
    """op name -> number of calls in ``mod``'s Relax functions (and the calls themselves under ``"calls"``)."""
    from tvm import relax

    calls = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                            and hasattr(e.op, "name") else None)
    counts: dict = {"calls": calls}
    for c in calls:
        counts[c.op.name] = counts.get(c.op.name, 0) + 1
    return counts


def relax_ops(mod) -> set:
    return set(relax_calls(mod)) - {"calls"}


STANDARD = {"relax.matmul", "relax.nn.softmax", "relax.nn.layer_norm", "relax.nn.gelu", "relax.erf"}


def test_rewrite_replaces_the_standard_ops(transformer):
    from tvm import relax

    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.kernels.standard import lower_standard_ops
    from frugalrt.targets.registry import tvm_target

    target = tvm_target("x86-64-v3")
    mod = import_onnx(transformer[0], target)
    assert STANDARD <= relax_ops(mod)
    out = lower_standard_ops(mod, target)
    names = {gv.name_hint.rstrip("0123456789") for gv in out.functions}
    assert KERNEL_NAMES <= names, names
    calls = relax_calls(out)
    assert not STANDARD & set(calls)
    # Gemm's transposed weight is packed at compile time (no permute_dims of a constant is left), and every
    # constant bias is fused: the adds left are the two residuals and the erf-GELU's "+ 1"
    assert not [c for c in calls["calls"] if c.op.name == "relax.permute_dims"
                and not isinstance(c.args[0], relax.Var)]
    assert calls["relax.add"] == 3, calls["relax.add"]


@pytest.mark.parametrize("name", ["armv7", "rpi-zero", "cortex-m4"])
def test_rewrite_leaves_generic_targets_alone(transformer, name):
    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.kernels.standard import lower_standard_ops
    from frugalrt.targets.registry import tvm_target

    target = tvm_target(name)
    mod = import_onnx(transformer[0], target)
    assert lower_standard_ops(mod, target) is mod


def test_rewrite_keeps_what_it_cannot_serve():
    """Dynamic reduction lengths, softmax over another axis, float64: TVM's default lowering."""
    import tvm
    from tvm import relax

    from frugalrt.targets.kernels.standard import lower_standard_ops
    from frugalrt.targets.registry import tvm_target

    k = tvm.tirx.Var("k", "int64")
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((4, k), "float32"))
    b = relax.Var("b", relax.TensorType((k, 8), "float32"))
    c = relax.Var("c", relax.TensorType((4, 8), "float64"))
    with bb.function("main", [a, b, c]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(a, b))
            z = bb.emit(relax.op.nn.softmax(y, axis=0))
            w = bb.emit(relax.op.nn.softmax(c, axis=-1))
            out = bb.emit_output(relax.Tuple([z, w]))
        bb.emit_func_output(out)
    mod = lower_standard_ops(bb.get(), tvm_target("x86-64-v3"))
    assert {"relax.matmul", "relax.nn.softmax"} <= relax_ops(mod)
    assert not any(gv.name_hint.startswith("frugalrt_") for gv in mod.functions)


# --- compiled models ------------------------------------------------------------------------------
def compile_transformer(model, target):
    import tvm

    from frugalrt.targets.importer import import_onnx
    from frugalrt.targets.kernels.standard import lower_standard_ops

    mod = lower_standard_ops(import_onnx(model, target), target)
    with target:
        return tvm.compile(mod, target=target)


def kernel_asm(executable) -> dict:
    """name -> assembly of each function in a compiled module (the kernels' ``_compute_`` parts included)."""
    import re

    asm = executable.mod.imports[0].inspect_source("asm")
    names = set(re.findall(r"\.type\s+([\w.$]+),\s*[@%]function", asm))
    out, current = {}, None
    for line in asm.splitlines():
        label = re.match(r"^([\w.$]+):", line)
        if label and label.group(1) in names:
            current = label.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


# target -> (an instruction every kernel's FMA loop holds, registers no code may use)
ISA_CHECKS = {
    GENERIC: (r"\tmulps\t", ("%ymm", "%zmm")),
    AVX2: (r"\tvfmadd\d+ps\t.*%ymm", ("%zmm",)),
    AVX512: (r"\tvfmadd\d+ps\t.*%[yz]mm", ()),  # zmm, or ymm for rows shorter than 16 (the 12 scores)
    "rpi4": (r"\tfmla\tv\d+\.4s", ()),
}


@pytest.mark.parametrize("name", sorted(ISA_CHECKS))
def test_kernels_compile_to_the_family_isa(x86_cpu, transformer, cnn, name):
    """Each target's kernels use its vector ISA and call no libm (vector exp/erf are inlined polynomials);
    compiled and inspected everywhere, run against ONNX Runtime where this CPU runs the code."""
    import re

    import tvm
    from tvm import relax

    from frugalrt.targets.registry import tvm_target

    cpu = None if name == "rpi4" else x86_cpu(name)
    target = tvm_target("rpi4") if cpu is None else cpu.target
    ex, ex_cnn = compile_transformer(transformer[0], target), compile_transformer(cnn[0], target)
    functions = {**kernel_asm(ex), **kernel_asm(ex_cnn)}
    instruction, forbidden = ISA_CHECKS[name]
    for kernel in KERNEL_NAMES | {"frugalrt_conv2d_cpu"}:
        body = "\n".join(text for fn, text in functions.items() if kernel in fn)  # __tvm_ffi_K, K_compute_
        assert body, (name, kernel, sorted(functions))
        assert re.search(instruction, body), (name, kernel, instruction)
        assert not re.search(r"\b(call\w*|bl|b|jmp)\s+(expf|erff|tanhf|exp|erf)\b", body), (name, kernel)
    if name == AVX512:
        assert re.search(r"\tvfmadd\d+ps\t.*%zmm", "\n".join(text for fn, text in functions.items()
                                                             if "frugalrt_dense_cpu" in fn))
    for register in forbidden:
        assert not any(register in text for text in functions.values()), (name, register)
    if cpu is None:
        return  # rpi4: run on the emulated device by the emulated-tier tests of this file
    if not cpu.runs_here:
        pytest.skip(f"{name} code compiled and inspected, not run here (this CPU lacks it)")
    for executable, (_, session), shape in ((ex, transformer, (S, D)), (ex_cnn, cnn, (3, 17, 17))):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        for batch in (1, 3):
            x = RNG.standard_normal((batch, *shape)).astype(np.float32)
            expected = ort_run(session, x)
            y = vm["main"](tvm.runtime.tensor(x)).numpy()
            assert np.abs(y - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("which", ["transformer", "cnn"])
def test_model_compiled_for_host_matches_onnx_runtime(transformer, cnn, tmp_path, which):
    """The whole path a user takes: ``frugalrt.compile`` for ``host``, ``frugalrt.load``, dynamic batch."""
    import onnx

    import frugalrt

    (model, session), shape = (transformer, (S, D)) if which == "transformer" else (cnn, (3, 17, 17))
    onnx.save(model, tmp_path / "m.onnx")
    frugalrt.compile(tmp_path / "m.onnx", "host", tmp_path / "host")
    run = frugalrt.load(tmp_path / "host")
    for batch in (1, 5):
        x = RNG.standard_normal((batch, *shape)).astype(np.float32)
        (y,) = run(x)
        expected = ort_run(session, x)
        assert y.shape == expected.shape
        assert np.abs(y - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())


@pytest.mark.emulated
@pytest.mark.parametrize("which", ["transformer", "cnn"])
def test_model_on_rpi4_matches_onnx_runtime(transformer, cnn, rpi4_device, tmp_path, which):
    """The NEON kernels run on the session's emulated Raspberry Pi 4 (qemu-aarch64, over RPC)."""
    import onnx

    import frugalrt

    (model, ort_session), shape = (transformer, (S, D)) if which == "transformer" else (cnn, (3, 17, 17))
    onnx.save(model, tmp_path / "m.onnx")
    frugalrt.compile(tmp_path / "m.onnx", "rpi4", tmp_path / "rpi4")
    session = frugalrt.load(tmp_path / "rpi4", device=rpi4_device)
    try:
        x = RNG.standard_normal((3, *shape)).astype(np.float32)
        (y,) = session(x)
    finally:
        session.close()
    expected = ort_run(ort_session, x)
    assert np.abs(y - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
