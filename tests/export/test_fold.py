"""ONNX graph rewrites (frugalrt.export.fold): BatchNorm/affine folding at export against PyTorch,
and each rewrite on hand-built graphs against the unrewritten graph (ONNX Runtime with the numpy
reference kernels, or onnx's ReferenceEvaluator for standard ops). Fast tier: no TVM."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import frugalrt
from frugalrt.export.metadata import read_golden
from frugalrt.export.fold import (drop_clips_before_binary, fold_affine, fuse_activations, optimize_graph,
                                  remove_identity_reshapes)
from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear
from frugalrt.runtime.ort import run
from frugalrt.runtime.reference import DOMAIN, pack_bits


class Affine(nn.Module):
    """y * a + b with constant per-channel a, b (exported as Mul and Add by initializers)."""

    def __init__(self, channels: int, spatial: bool = False):
        super().__init__()
        shape = (channels, 1, 1) if spatial else (channels,)
        self.register_buffer("a", torch.rand(shape) + 0.5)
        self.register_buffer("b", torch.randn(shape))

    def forward(self, y):
        return y * self.a + self.b


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(-1.5, 1.5)  # negative scales too
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def bn(n):
    return nn.BatchNorm1d(n)


# (name, model factory, input shape without batch, ops the folded graph must not contain); PyTorch's
# exporter folds a BatchNorm after a standard Linear/Conv itself (the rows marked "std")
CASES = [
    ("butterfly 20->24 + bn", lambda: nn.Sequential(ButterflyLinear(20, 24), bn(24)), (20,), {"BatchNormalization"}),
    ("butterfly no bias + affine", lambda: nn.Sequential(ButterflyLinear(16, 13, bias=False), Affine(13)), (16,),
     {"Mul", "Add"}),
    ("binary + bn", lambda: nn.Sequential(BinaryLinear(40, 16), bn(16)), (40,), {"BatchNormalization"}),
    ("binary no bias + bn", lambda: nn.Sequential(BinaryLinear(40, 16, bias=False), bn(16)), (40,),
     {"BatchNormalization"}),
    ("binary conv + bn2d", lambda: nn.Sequential(BinaryConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
     (3, 6, 5), {"BatchNormalization"}),
    ("binary conv one-padded + bn2d (pad_value kept)",
     lambda: nn.Sequential(BinaryConv2d(3, 8, 3, padding=1, pad_value=1), nn.BatchNorm2d(8)), (3, 6, 5),
     {"BatchNormalization"}),
    ("binary conv + affine", lambda: nn.Sequential(BinaryConv2d(3, 8, 3, bias=False), Affine(8, spatial=True)),
     (3, 6, 5), {"Mul", "Add"}),
    ("std: linear + bn", lambda: nn.Sequential(nn.Linear(12, 8), bn(8)), (12,), {"BatchNormalization"}),
    ("std: linear + affine", lambda: nn.Sequential(nn.Linear(12, 8), Affine(8)), (12,), {"Mul", "Add"}),
    ("std: grouped conv no bias + bn2d", lambda: nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, bias=False),
                                                          nn.BatchNorm2d(8)), (4, 7, 7), {"BatchNormalization"}),
    ("bn, hardtanh, binary, bn (digits-like)", lambda: nn.Sequential(
        ButterflyLinear(32, 32), bn(32), nn.Hardtanh(), BinaryLinear(32, 32), bn(32), nn.Hardtanh(),
        nn.Linear(32, 5)), (32,), {"BatchNormalization"}),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, x, folded proto, unfolded proto) per case, exported once each way."""
    cache = {}

    def get(case):
        if case not in cache:
            name, make, shape, _ = next(c for c in CASES if c[0] == case)
            torch.manual_seed(len(name))
            model, x = _randomize_bn(make()), torch.randn(7, *shape)
            out = tmp_path_factory.mktemp("fold")
            cache[case] = (model, x, frugalrt.export(model, (x,), out / "folded.onnx"),
                           frugalrt.export(model, (x,), out / "unfolded.onnx", fold_bn=False))
        return cache[case]

    return get


def _ops(proto):
    return {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_folded_export_matches_pytorch_and_the_unfolded_one(exported, case):
    model, x, folded, unfolded = exported(case)
    gone = next(c[3] for c in CASES if c[0] == case)
    assert not gone & _ops(folded), _ops(folded)
    assert gone & _ops(unfolded) or case.startswith("std: ")  # the rewrite did something
    assert len(folded.graph.initializer) <= len(unfolded.graph.initializer)
    with torch.no_grad():
        want = model(x).numpy()
    got, before = run(folded, [x.numpy()])[0], run(unfolded, [x.numpy()])[0]
    scale = np.abs(want).max()
    # oracle: PyTorch (float32; the folded constants are rounded once, a few ulps of the output)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=4e-6 * scale)
    np.testing.assert_allclose(got, before, rtol=1e-5, atol=4e-6 * scale)
    np.testing.assert_array_equal(read_golden(folded)[1][0], want)  # golden vectors: PyTorch, unchanged


def test_export_of_digits_folds_its_three_batchnorms(digits_module, tmp_path):
    torch.manual_seed(0)
    model = _randomize_bn(digits_module.make_model())
    x = digits_module.load_data()[2][:7]
    proto = frugalrt.export(model, (x,), tmp_path / "d.onnx")
    assert [n.op_type for n in proto.graph.node].count("BatchNormalization") == 0
    with torch.no_grad():
        want = model(x).numpy()
    got = run(proto, [x.numpy()])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_portable_export_still_matches_pytorch(tmp_path):
    # standard-op butterflies and binary layers end in element-wise ops: a BatchNorm there stays
    torch.manual_seed(1)
    model = _randomize_bn(nn.Sequential(ButterflyLinear(16, 16), bn(16), nn.ReLU(), BinaryLinear(16, 8), bn(8)))
    x = torch.randn(5, 16)
    proto = frugalrt.export(model, (x,), tmp_path / "p.onnx", portable=True)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(run(proto, [x.numpy()])[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- hand-built graphs -------------------------------------------------------------------------------

def _model(nodes, inits, inputs=(("x", [None, 8]),), outputs=(("y", None),)):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d or "batch" for d in s]) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s and [d or "batch" for d in s]) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def _rewritten(model, rewrite):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, rewrite(out)


def _f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _evaluate(model, x):
    return ReferenceEvaluator(model).run(None, {"x": x})[0]


def test_gemm_with_alpha_beta_transb_folds_mul_and_sub():
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=1),
             helper.make_node("Mul", ["s", "g"], ["m"]), helper.make_node("Sub", ["m", "t"], ["y"])]
    model = _model(nodes, {"w": _f32(4, 8), "c": _f32(1, 4, seed=1), "s": _f32(4, seed=2), "t": _f32(4, seed=3)})
    folded, count = _rewritten(model, fold_affine)
    assert count == {"Mul": 1, "Sub": 1} and _ops(folded) == {"Gemm"}
    x = _f32(3, 8, seed=4)
    np.testing.assert_allclose(_evaluate(folded, x), _evaluate(model, x), rtol=1e-6, atol=1e-6)


def test_matmul_plus_constant_becomes_gemm_and_reversed_sub_negates():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Sub", ["t", "m"], ["y"])]
    model = _model(nodes, {"w": _f32(8, 5), "t": _f32(5, seed=1)})
    folded, count = _rewritten(model, fold_affine)
    assert count == {"Sub": 1} and _ops(folded) == {"Gemm"}
    x = _f32(3, 8, seed=2)
    np.testing.assert_allclose(_evaluate(folded, x), _evaluate(model, x), rtol=1e-6, atol=1e-6)


MATMUL = helper.make_node("MatMul", ["x", "w"], ["m"])
MUL = helper.make_node("Mul", ["m", "s"], ["y"])
BN_ZERO_VAR = helper.make_node("BatchNormalization", ["m", "g", "b", "mu", "v"], ["y"], epsilon=0.0)
ONES, ZEROS = np.ones(5, np.float32), np.zeros(5, np.float32)


@pytest.mark.parametrize("why,nodes,inits,outputs", [
    ("intermediate read twice", [MATMUL, MUL, helper.make_node("Relu", ["m"], ["z"])], {"s": _f32(5)},
     (("y", None), ("z", None))),
    ("intermediate is a graph output", [MATMUL, MUL], {"s": _f32(5)}, (("y", None), ("m", None))),
    ("constant varies along the batch axis", [MATMUL, MUL], {"s": _f32(3, 1)}, (("y", None),)),
    ("BatchNorm scale is infinite", [MATMUL, BN_ZERO_VAR], {"g": ONES, "b": ZEROS, "mu": ZEROS, "v": ZEROS},
     (("y", None),)),
])
def test_affine_is_left_alone_when_folding_would_be_wrong(why, nodes, inits, outputs):
    model = _model(nodes, {"w": _f32(8, 5, seed=9), **inits}, outputs=outputs)
    folded, count = _rewritten(model, fold_affine)
    assert count == {}, why
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("target,removed", [([-1, 8], True), ([0, 8], True), ([-1, 4, 2], False), ([-1, 2, 4], False)])
def test_identity_reshape_is_removed_and_others_kept(target, removed):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
    model = _model(nodes, {"shape": np.array(target, np.int64)})
    rewritten, count = _rewritten(model, remove_identity_reshapes)
    assert count == int(removed)
    assert ("Reshape" in _ops(rewritten)) != removed
    assert ("shape" in {t.name for t in rewritten.graph.initializer}) != removed
    x = _f32(3, 8)
    np.testing.assert_array_equal(_evaluate(rewritten, x), _evaluate(model, x))


def _binary_gemm(x_name, k=8, n=6, seed=0):
    rng = np.random.default_rng(seed)
    inits = {"wp": pack_bits(rng.choice([-1.0, 1.0], (n, k))), "sc": rng.uniform(0.5, 1.5, n).astype(np.float32)}
    return helper.make_node("BinaryGemm", [x_name, "wp", "sc"], ["y"], domain=DOMAIN, in_features=k), inits


@pytest.mark.parametrize("lo,hi,dropped", [(-1.0, 1.0, True), (-0.5, 0.0, True), (None, 2.0, True),
                                            (0.0, 6.0, False), (-2.0, -1.0, False)])
def test_sign_preserving_clip_before_binary_op_is_dropped_exactly(lo, hi, dropped):
    gemm, inits = _binary_gemm("c")
    names = ["x", "lo" if lo is not None else "", "hi"]
    inits.update({k: np.float32(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None})
    model = _model([helper.make_node("Clip", names, ["c"]), gemm], inits)
    rewritten, count = _rewritten(model, drop_clips_before_binary)
    assert count == int(dropped) and ("Clip" in _ops(rewritten)) != dropped
    x = _f32(9, 8) * 3
    x[0, :4] = [0.0, -0.0, 1e-30, -1e-30]
    np.testing.assert_array_equal(run(rewritten, [x])[0], run(model, [x])[0])  # oracle: the original graph


def test_clip_read_by_another_op_is_kept():
    gemm, inits = _binary_gemm("c")
    inits.update(lo=np.float32(-1), hi=np.float32(1))
    model = _model([helper.make_node("Clip", ["x", "lo", "hi"], ["c"]), gemm, helper.make_node("Relu", ["c"], ["z"])],
                   inits, outputs=(("y", None), ("z", None)))
    assert _rewritten(model, drop_clips_before_binary)[1] == 0


def test_optimize_graph_chains_the_rewrites_on_a_binary_gemm():
    gemm, inits = _binary_gemm("r", seed=3)
    rng = np.random.default_rng(4)
    inits.update(shape=np.array([-1, 8], np.int64), lo=np.float32(-1), hi=np.float32(1),
                 g=rng.uniform(-2, 2, 6).astype(np.float32), b=rng.standard_normal(6).astype(np.float32),
                 mu=rng.standard_normal(6).astype(np.float32), v=rng.uniform(0.1, 2, 6).astype(np.float32))
    gemm.output[0] = "g_out"
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             gemm, helper.make_node("BatchNormalization", ["g_out", "g", "b", "mu", "v"], ["y"])]
    model = _model(nodes, inits, outputs=(("y", [None, 6]),))
    rewritten, stats = _rewritten(model, optimize_graph)
    assert (stats.reshapes, stats.affine, stats.clips) == (1, {"BatchNormalization": 1}, 1)
    assert [n.op_type for n in rewritten.graph.node] == ["BinaryGemm"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = _f32(11, 8, seed=5)
    want = run(model, [x])[0]
    np.testing.assert_allclose(run(rewritten, [x])[0], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _frugal_node(op_type: str, seed: int = 0):
    """One ``ai.frugalrt`` node reading "x" [batch, 8] (BinaryConv: [batch, 2, 2, 2]) into "y", with
    constants that make outputs of both signs."""
    rng = np.random.default_rng(seed)
    if op_type == "BinaryGemm":
        return _binary_gemm("x", seed=seed)
    if op_type == "Butterfly":
        inits = {"tw": rng.standard_normal((3, 4, 2, 2)).astype(np.float32), "bb": _f32(6, seed=seed)}
        return helper.make_node("Butterfly", ["x", "tw", "bb"], ["y"], domain=DOMAIN, out_features=6), inits
    inits = {"wp": pack_bits(rng.choice([-1.0, 1.0], (5, 8))), "sc": rng.uniform(-1.5, 1.5, 5).astype(np.float32),
             "bb": _f32(5, seed=seed)}
    return helper.make_node("BinaryConv", ["x", "wp", "sc", "bb"], ["y"], domain=DOMAIN, in_channels=2,
                            kernel_shape=[2, 2], pads=[1, 0, 0, 1]), inits


ACTIVATION_NODES = {  # (node reading "y" into "z", extra constants)
    "relu": (lambda: helper.make_node("Relu", ["y"], ["z"]), {}),
    "clip": (lambda: helper.make_node("Clip", ["y", "lo", "hi"], ["z"]), {"lo": np.float32(-0.5), "hi": np.float32(2)}),
    "clip max only": (lambda: helper.make_node("Clip", ["y", "", "hi"], ["z"]), {"hi": np.float32(0.25)}),
}


@pytest.mark.parametrize("op_type", ["Butterfly", "BinaryGemm", "BinaryConv"])
@pytest.mark.parametrize("activation", sorted(ACTIVATION_NODES))
def test_activation_after_a_frugal_op_becomes_its_attribute_exactly(op_type, activation):
    node, inits = _frugal_node(op_type, seed=len(activation))
    make_act, consts = ACTIVATION_NODES[activation]
    x_shape = [None, 2, 2, 2] if op_type == "BinaryConv" else [None, 8]
    y_shape = {"Butterfly": [None, 6], "BinaryGemm": [None, 6], "BinaryConv": [None, 5, 2, 2]}[op_type]
    model = _model([node, make_act()], {**inits, **consts}, inputs=(("x", x_shape),), outputs=(("z", y_shape),))
    rewritten, count = _rewritten(model, fuse_activations)
    assert count == 1 and _ops(rewritten) == {op_type}
    assert not {"lo", "hi"} & {t.name for t in rewritten.graph.initializer}
    onnx.checker.check_model(rewritten, full_check=True)
    x = _f32(6, *[d for d in x_shape[1:]], seed=7) * 3
    x.reshape(-1)[:3] = [0.0, -0.0, 1e-30]
    np.testing.assert_array_equal(run(rewritten, [x])[0], run(model, [x])[0])  # the ORT reference path


def test_activation_is_not_fused_when_the_op_output_is_read_elsewhere():
    node, inits = _binary_gemm("x")
    relu = helper.make_node("Relu", ["y"], ["z"])
    assert _rewritten(_model([node, relu], inits, outputs=(("y", None), ("z", None))), fuse_activations)[1] == 0
    twice = [node, relu, helper.make_node("Neg", ["y"], ["w"])]
    assert _rewritten(_model(twice, inits, outputs=(("z", None), ("w", None))), fuse_activations)[1] == 0
    relu_of_relu = [node, relu, helper.make_node("Relu", ["z"], ["w"])]
    rewritten, count = _rewritten(_model(relu_of_relu, inits, outputs=(("w", None),)), fuse_activations)
    assert count == 1 and [n.op_type for n in rewritten.graph.node] == ["BinaryGemm", "Relu"]


@pytest.mark.parametrize("bounds", [("x", "hi"), ("lo", "hi")])
def test_clip_with_input_or_inverted_bounds_is_not_fused(bounds):
    node, inits = _binary_gemm("x")
    inits.update(lo=np.float32(3), hi=np.float32(1))  # lo > hi: ONNX's result is not a clip to [lo, hi]
    model = _model([node, helper.make_node("Clip", ["y", *bounds], ["z"])], inits, outputs=(("z", None),))
    assert _rewritten(model, fuse_activations)[1] == 0


@pytest.mark.parametrize("attrs,expected", [
    ({"activation": "gelu"}, "attribute activation is 'gelu', expected one of '', 'relu', 'clip'"),
    ({"activation": "clip", "activation_min": 2.0, "activation_max": 1.0},
     "attributes activation_min 2.0 and activation_max 1.0: expected min <= max")])
def test_bad_fused_activation_is_named(attrs, expected):
    from frugalrt.errors import ArtifactError
    from frugalrt.runtime.ort import make_session

    node, inits = _binary_gemm("x")
    for name, value in attrs.items():
        node.attribute.append(helper.make_attribute(name, value))
    with pytest.raises(ArtifactError, match=f"node .*\\(BinaryGemm\\): {expected}"):
        make_session(_model([node], inits))
