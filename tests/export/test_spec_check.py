"""Every ai.frugalrt node is checked against docs/ops.md by one checker (frugalrt.export.spec_check):
at export, at compile (before TVM sees the model), before an ONNX Runtime session, and in the
schemas' shape inference. A violation is one line naming the node, the input, expected and found."""
import gc
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import frugalrt
from frugalrt.errors import ArtifactError, ExportError, FrugalError, UnsupportedOpError
from frugalrt.export.single_op import single_op_model
from frugalrt.export.spec_check import attributes, check_model, check_node
from frugalrt.nn import BinaryLinear, ButterflyLinear, freeze
from frugalrt.runtime.ort import make_session, run
from frugalrt.runtime.reference import pack_bits

rng = np.random.default_rng(0)
F32 = np.float32


def _f32(*shape):
    return rng.standard_normal(shape).astype(F32)


def _w(rows, k):
    return pack_bits(rng.standard_normal((rows, k)))


def _pad_bits_set():
    w = _w(4, 13)
    w[2, 1] |= 0x80  # bit 15 of row 2: past K = 13
    return w


def _check(op, attrs, inputs, node="n1"):
    check_node(op, attributes(op, attrs), inputs, node=node)


GOOD = [
    ("Butterfly", {"out_features": 13}, {"X": ["batch", 20], "twiddles": _f32(5, 16, 2, 2), "B": _f32(13)}),
    ("Butterfly", {"out_features": 8}, {"X": [None, None], "twiddles": [3, 4, 2, 2]}),
    ("BinaryGemm", {"in_features": 13}, {"X": [7, 13], "W_packed": _w(9, 13), "scale": _f32(9), "B": _f32(9)}),
    ("BinaryGemm", {"in_features": 16}, {"X": None, "W_packed": [None, 2], "scale": [None]}),
    ("BinaryConv", {"in_channels": 3, "kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 2, 1]},
     {"X": [2, 3, 6, 7], "W_packed": _w(4, 18), "scale": _f32(4), "B": _f32(4)}),
    ("BinaryConv", {"in_channels": 3, "kernel_shape": [3, 3]}, {"X": ["b", 3, None, None], "W_packed": _w(4, 27),
                                                                "scale": _f32(4)}),
    ("BinaryConv", {"in_channels": 3, "kernel_shape": [3, 3], "pads": [1, 0, 2, 1], "pad_value": 1},
     {"X": [2, 3, 6, 6], "W_packed": _w(4, 27), "scale": _f32(4)}),
]


@pytest.mark.parametrize("op,attrs,inputs", GOOD, ids=[f"{g[0]}-{i}" for i, g in enumerate(GOOD)])
def test_nodes_that_follow_the_spec_pass(op, attrs, inputs):
    _check(op, attrs, inputs)


GEMM = {"X": [5, 8], "W_packed": _w(4, 8), "scale": _f32(4)}
CONV = {"in_channels": 3, "kernel_shape": [3, 3]}
CONV_IN = {"X": [2, 3, 6, 6], "W_packed": _w(4, 27), "scale": _f32(4)}
# (case, op, attributes, inputs, the whole message after "node n1 (OP): ")
BAD = [
    ("scale 3 for 4 outputs", "BinaryGemm", {"in_features": 8}, {**GEMM, "scale": _f32(3)},
     "input scale has 3 values, expected 4 (one per output row of W_packed)"),
    ("bias 5 for 4 outputs", "BinaryGemm", {"in_features": 8}, {**GEMM, "B": _f32(5)},
     "input B has 5 values, expected 4 (one per output row of W_packed)"),
    ("scale of rank 2", "BinaryGemm", {"in_features": 8}, {**GEMM, "scale": _f32(1, 4)},
     "input scale has shape [1, 4], expected [4] (one per output row of W_packed)"),
    ("input width vs in_features", "BinaryGemm", {"in_features": 16}, {**GEMM, "W_packed": _w(4, 16)},
     "input X has width 8, expected 16 (attribute in_features)"),
    ("W_packed bytes vs in_features", "BinaryGemm", {"in_features": 16}, {**GEMM, "X": [5, 16]},
     "input W_packed has shape [4, 1], expected [N, 2] (ceil(K / 8) bytes per row, K = in_features = 16)"),
    ("W_packed pad bits", "BinaryGemm", {"in_features": 13}, {**GEMM, "X": [5, 13], "W_packed": _pad_bits_set()},
     "input W_packed has pad bits set (bits 5..7 of the last byte, past K = in_features = 13) in 1 row, "
     "first row 2, expected 0 (docs/ops.md)"),
    ("W_packed not uint8", "BinaryGemm", {"in_features": 8}, {**GEMM, "W_packed": np.zeros((4, 1), F32)},
     "input W_packed has dtype float32, expected uint8 (bit-packed signs)"),
    ("in_features 0", "BinaryGemm", {"in_features": 0}, GEMM, "attribute in_features is 0, expected an integer >= 1"),
    ("in_features missing", "BinaryGemm", {}, GEMM, "attribute in_features missing, expected an integer >= 1"),
    ("NaN scale", "BinaryGemm", {"in_features": 8}, {**GEMM, "scale": np.array([1, np.nan, 1, np.nan], F32)},
     "input scale has 2 NaN values (first at index [1]), expected finite values"),
    ("twiddles (3,5,2,2)", "Butterfly", {"out_features": 8}, {"X": [5, 8], "twiddles": _f32(3, 5, 2, 2)},
     "input twiddles has shape [3, 5, 2, 2], expected [log2 N, N/2, 2, 2] with N a power of two "
     "(N/2 = 5 gives N = 10)"),
    ("twiddles stages vs N", "Butterfly", {"out_features": 8}, {"X": [5, 8], "twiddles": _f32(2, 4, 2, 2)},
     "input twiddles has shape [2, 4, 2, 2], expected [3, 4, 2, 2] (log2 N stages for N = 8)"),
    ("twiddles rank 3", "Butterfly", {"out_features": 8}, {"X": [5, 8], "twiddles": _f32(3, 4, 4)},
     "input twiddles has shape [3, 4, 4], expected [log2 N, N/2, 2, 2]"),
    ("out_features > N", "Butterfly", {"out_features": 9}, {"X": [5, 8], "twiddles": _f32(3, 4, 2, 2)},
     "attribute out_features is 9, expected <= N = 8 (twiddles [3, 4, 2, 2])"),
    ("input width > N", "Butterfly", {"out_features": 8}, {"X": ["batch", 9], "twiddles": _f32(3, 4, 2, 2)},
     "input X has width 9, expected 1 .. N = 8 (twiddles [3, 4, 2, 2])"),
    ("butterfly bias length", "Butterfly", {"out_features": 6}, {"X": [5, 8], "twiddles": _f32(3, 4, 2, 2),
                                                                 "B": _f32(8)},
     "input B has 8 values, expected 6 (one per output, out_features)"),
    ("infinite twiddle", "Butterfly", {"out_features": 8},
     {"X": [5, 8], "twiddles": np.where(np.arange(48).reshape(3, 4, 2, 2) == 7, np.inf, 1).astype(F32)},
     "input twiddles has 1 infinite value (first at index [0, 1, 1, 1]), expected finite values"),
    ("conv channels", "BinaryConv", CONV, {**CONV_IN, "X": [2, 4, 6, 6]},
     "input X has 4 channels, expected 3 (attribute in_channels)"),
    ("conv W_packed bytes", "BinaryConv", CONV, {**CONV_IN, "W_packed": _w(4, 24)},
     "input W_packed has shape [4, 3], expected [O, 4] (ceil(K / 8) bytes per row, "
     "K = in_channels * kh * kw = 3 * 3 * 3 = 27)"),
    ("conv output 0x0", "BinaryConv", CONV, {**CONV_IN, "X": [1, 3, 2, 2]},
     "output 0x0 for input 2x2 with kernel_shape [3, 3], strides [1, 1], pads [0, 0, 0, 0], expected at least 1x1"),
    ("conv kernel_shape length", "BinaryConv", {**CONV, "kernel_shape": [3]}, CONV_IN,
     "attribute kernel_shape is [3], expected 2 integers >= 1 [kh, kw]"),
    ("conv zero stride", "BinaryConv", {**CONV, "strides": [0, 1]}, CONV_IN,
     "attribute strides is [0, 1], expected 2 integers >= 1 [sh, sw]"),
    ("conv pads length", "BinaryConv", {**CONV, "pads": [1, 1]}, CONV_IN,
     "attribute pads is [1, 1], expected 4 integers >= 0 [top, left, bottom, right]"),
    ("conv negative pad", "BinaryConv", {**CONV, "pads": [0, -1, 0, 0]}, CONV_IN,
     "attribute pads is [0, -1, 0, 0], expected 4 integers >= 0 [top, left, bottom, right]"),
    ("conv scale length", "BinaryConv", CONV, {**CONV_IN, "scale": _f32(5)},
     "input scale has 5 values, expected 4 (one per output row of W_packed)"),
    ("conv pad_value 2", "BinaryConv", {**CONV, "pad_value": 2}, CONV_IN, "attribute pad_value is 2, expected 0 or 1"),
    ("conv pad_value -1", "BinaryConv", {**CONV, "pad_value": -1}, CONV_IN,
     "attribute pad_value is -1, expected 0 or 1"),
]


@pytest.mark.parametrize("case,op,attrs,inputs,message", BAD, ids=[b[0] for b in BAD])
def test_each_violation_is_one_line_naming_node_input_expected_and_found(case, op, attrs, inputs, message):
    with pytest.raises(FrugalError) as e:
        _check(op, attrs, inputs)
    assert str(e.value) == f"node n1 ({op}): {message}"


def test_unknown_op_is_unsupported():
    with pytest.raises(UnsupportedOpError, match=r"node n1 \(Fft\): unknown op ai.frugalrt::Fft"):
        _check("Fft", {}, {})


# --- whole models: hand-built with onnx.helper, then edited -------------------------------------

def _gemm_model(k=8, rows=4, width=None):
    return single_op_model("BinaryGemm", [width or k], {"W_packed": _w(rows, k), "scale": _f32(rows)},
                           {"in_features": k})


def _replace(model, name, array):
    (t,) = [t for t in model.graph.initializer if t.name == name]
    t.CopyFrom(numpy_helper.from_array(np.asarray(array), name))
    return model


def test_model_check_names_the_node_or_its_index():
    model = _replace(_gemm_model(), "scale", _f32(3))
    with pytest.raises(ArtifactError, match=r"^node #0 \(BinaryGemm\): input scale has 3 values, expected 4 "):
        check_model(model)
    model.graph.node[0].name = "gemm1"
    with pytest.raises(ExportError, match=r"^node gemm1 \(BinaryGemm\): input scale has 3 values"):
        check_model(model, error=ExportError)


def test_model_check_uses_the_input_shape_and_stale_value_info_does_not_matter():
    model = _gemm_model()
    for a in model.graph.node[0].attribute:
        if a.name == "in_features":
            a.i = 16
    _replace(model, "W_packed", _w(4, 16))  # consistent weights: only the graph input is 8 wide
    with pytest.raises(ArtifactError, match=r"input X has width 8, expected 16 \(attribute in_features\)"):
        check_model(model)


def test_model_check_refuses_nan_initializers_anywhere_and_names_them():
    model = _replace(_gemm_model(), "scale", np.array([1, 1, np.nan, 1], F32))
    with pytest.raises(ArtifactError, match=r"input scale, initializer 'scale', has 1 NaN value \(first at index "
                                            r"\[2\]\), expected finite values"):
        check_model(model)
    check_model(model, finite=False)
    # a standard op's initializer: NaN is refused, an infinite constant (a mask, a bound) is not
    add = helper.make_node("Add", ["Y", "shift"], ["Z"], name="add")
    model = _gemm_model()
    model.graph.node.append(add)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0, -np.inf, 0, 0], F32), "shift"))
    check_model(model)
    _replace(model, "shift", np.array([0, np.nan, 0, 0], F32))
    with pytest.raises(ArtifactError, match=r"^initializer 'shift' has 1 NaN value \(first at index \[1\]\)"):
        check_model(model)


def test_bad_pad_value_is_refused_by_the_model_check_onnx_runtime_and_shape_inference():
    model = single_op_model("BinaryConv", [3, 6, 6], {"W_packed": _w(4, 27), "scale": _f32(4)},
                            {"in_channels": 3, "kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "pad_value": 1})
    next(a for a in model.graph.node[0].attribute if a.name == "pad_value").i = 2
    message = r"^node #0 \(BinaryConv\): attribute pad_value is 2, expected 0 or 1$"
    with pytest.raises(ArtifactError, match=message):
        check_model(model)
    with pytest.raises(ArtifactError, match=message):
        make_session(model)
    with pytest.raises(onnx.shape_inference.InferenceError, match="attribute pad_value is 2, expected 0 or 1"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_model_check_missing_input_and_unknown_op():
    model = _gemm_model()
    del model.graph.node[0].input[2:]
    with pytest.raises(ArtifactError, match=r"node #0 \(BinaryGemm\): input scale is missing"):
        check_model(model)
    model.graph.node[0].op_type = "BinaryAttention"
    with pytest.raises(UnsupportedOpError, match="unknown op ai.frugalrt::BinaryAttention"):
        check_model(model)


def test_compile_needs_constant_parameters():
    model = _gemm_model()
    model.graph.node[0].input[2] = "s"
    model.graph.input.append(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, [4]))
    check_model(model)  # ONNX Runtime takes parameters as inputs
    with pytest.raises(UnsupportedOpError, match=r"^node #0 \(BinaryGemm\): W_packed, scale and B must be constant "
                                                 r"initializers, found input scale = graph input 's'"):
        check_model(model, constant_parameters=True)


def test_shape_inference_enforces_the_same_rules():
    """The schemas' inference calls the same checker: onnx.checker (full) reports the same line."""
    model = _gemm_model()
    for a in model.graph.node[0].attribute:
        if a.name == "in_features":
            a.i = 16
    _replace(model, "W_packed", _w(4, 16))
    model.graph.node[0].name = "g"
    del model.graph.value_info[:]
    with pytest.raises(onnx.shape_inference.InferenceError,
                       match=r"node g \(BinaryGemm\): input X has width 8, expected 16 \(attribute in_features\)"):
        onnx.checker.check_model(model, full_check=True)


# --- ONNX Runtime: a Python exception, never an abort ----------------------------------------------

def test_onnx_runtime_refuses_a_malformed_model_before_making_a_session():
    model = _replace(_gemm_model(), "scale", _f32(3))
    with pytest.raises(ArtifactError, match=r"^node #0 \(BinaryGemm\): input scale has 3 values, expected 4"):
        run(model, [np.ones((2, 8), F32)])
    with pytest.raises(ArtifactError, match="input scale has 3 values"):
        make_session(model)


def test_onnx_runtime_custom_op_failure_at_run_time_raises_and_the_interpreter_survives():
    """Inputs that break the spec only at run time (a symbolic width): the custom op must not
    raise into ONNX Runtime (that aborts the process); the session's run raises instead. In a child
    process, so that a regression cannot abort the test session."""
    script = textwrap.dedent("""
        import numpy as np
        from onnx import helper, numpy_helper
        from frugalrt.errors import ArtifactError
        from frugalrt.export.single_op import single_op_model
        from frugalrt.runtime.ort import make_session, run
        from frugalrt.runtime.reference import pack_bits

        w = pack_bits(np.random.default_rng(0).standard_normal((4, 8)))
        model = single_op_model("BinaryGemm", ["k"], {"W_packed": w, "scale": np.ones(4, np.float32)},
                                {"in_features": 8})
        model.graph.node[0].name = "gemm"
        session = make_session(model)
        for width in (9, 8, 7):
            try:
                (y,) = run(session, [np.ones((2, width), np.float32)])
                print("ran", y.shape)
            except ArtifactError as e:
                print("ArtifactError:", e)
        # a standard op after the failing node chokes on its placeholder: still the node's error
        model.graph.node.append(helper.make_node("Add", ["Y", "shift"], ["Z"]))
        model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "shift"))
        model.graph.output[0].name = "Z"
        try:
            run(model, [np.ones((2, 9), np.float32)])
        except ArtifactError as e:
            print("ArtifactError:", e)
        print("alive")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [
        "ArtifactError: node gemm (BinaryGemm): input X has width 9, expected 8 (attribute in_features)",
        "ran (2, 4)",
        "ArtifactError: node gemm (BinaryGemm): input X has width 7, expected 8 (attribute in_features)",
        "ArtifactError: node gemm (BinaryGemm): input X has width 9, expected 8 (attribute in_features)",
        "alive",
    ]
    assert "terminate called" not in proc.stderr


# --- export: non-finite weights and malformed nodes are refused, nothing is written ----------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(ButterflyLinear(8, 8), BinaryLinear(8, 4))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("where,value,message", [
    ("layers.0.twiddles", float("nan"),
     "cannot export Net: parameter 'layers.0.twiddles' has 1 NaN value (first at index [0, 1, 0, 0]), "
     "expected finite values"),
    ("layers.1.weight", float("-inf"),
     "cannot export Net: parameter 'layers.1.weight' has 1 infinite value (first at index [0, 1]), "
     "expected finite values"),
])
def test_export_refuses_non_finite_weights_and_writes_nothing(tmp_path, where, value, message):
    model = Net().eval()
    with torch.no_grad():
        dict(model.named_parameters())[where].view(-1)[1 if "weight" in where else 4] = value
    with pytest.raises(ExportError) as e:
        frugalrt.export(model, torch.randn(3, 8), tmp_path / "m.onnx")
    assert str(e.value) == message
    assert list(tmp_path.iterdir()) == []


def test_export_checks_the_onnx_nodes_and_writes_nothing(tmp_path):
    """A frozen layer whose scale broadcasts in PyTorch (1 value) but breaks the op's spec."""
    model = freeze(nn.Sequential(BinaryLinear(8, 4)).eval())
    model[0].weight_scale_ = model[0].weight_scale_[:1].clone()
    with pytest.raises(ExportError) as e:
        frugalrt.export(model, torch.randn(3, 8), tmp_path / "m.onnx")
    assert str(e.value).endswith("(BinaryGemm): input scale has 1 value, expected 4 (one per output row of W_packed)")
    assert str(e.value).startswith("node ") and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# --- compile: hand-edited exported models fail in one line, before TVM builds anything -------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("spec") / "m.onnx"
    frugalrt.export(Net().eval(), torch.randn(3, 8), path)
    return path


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def _edit(path, kind):
    model = onnx.load(path)
    gemm, butterfly = _node(model, "BinaryGemm"), _node(model, "Butterfly")
    if kind == "scale":
        _replace(model, gemm.input[2], _f32(3))
        return model, (f"node {gemm.name} (BinaryGemm): input scale has 3 values, expected 4 "
                       "(one per output row of W_packed)")
    if kind == "twiddles":
        _replace(model, butterfly.input[1], _f32(3, 5, 2, 2))
        return model, (f"node {butterfly.name} (Butterfly): input twiddles has shape [3, 5, 2, 2], expected "
                       "[log2 N, N/2, 2, 2] with N a power of two (N/2 = 5 gives N = 10)")
    if kind == "in_features":
        (attr,) = [a for a in gemm.attribute if a.name == "in_features"]
        attr.CopyFrom(helper.make_attribute("in_features", 16))
        return model, f"node {gemm.name} (BinaryGemm): input X has width 8, expected 16 (attribute in_features)"
    twiddles = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == butterfly.input[1])).copy()
    twiddles[1, 2, 0, 1] = np.nan
    _replace(model, butterfly.input[1], twiddles)
    return model, (f"node {butterfly.name} (Butterfly): input twiddles, initializer '{butterfly.input[1]}', has 1 NaN "
                   "value (first at index [1, 2, 0, 1]), expected finite values")


KINDS = ["scale", "twiddles", "in_features", "nan"]


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runtime_refuses_edited_exports(exported, kind):
    model, message = _edit(exported, kind)
    with pytest.raises(ArtifactError) as e:
        run(model, [np.ones((2, 8), F32)])
    assert str(e.value) == message


@pytest.mark.compile
@pytest.mark.parametrize("kind", KINDS)
def test_compile_refuses_edited_exports_in_one_line_without_tvm_noise(exported, tmp_path, capfd, kind):
    model, message = _edit(exported, kind)
    path = tmp_path / f"{kind}.onnx"
    onnx.save(model, path)
    with pytest.raises(FrugalError) as e:
        frugalrt.compile(path, "host", tmp_path / "out")
    assert str(e.value) == message
    del e
    gc.collect()  # a BlockBuilder left with open blocks warns when freed
    out, err = capfd.readouterr()
    assert "BlockBuilder" not in out + err and "Error converting" not in out + err and "Traceback" not in err


@pytest.mark.compile
def test_lowering_error_inside_the_frontend_leaves_no_open_blocks(capfd):
    """A BinaryConv with a symbolic image size passes the spec check (H, W unknown) but fails in its
    lowering, inside TVM's frontend: one line, and the frontend's BlockBuilder is closed (no
    "destroyed with remaining blocks" warning, no "Error converting operator" echo)."""
    from frugalrt.targets.importer import import_onnx

    model = single_op_model("BinaryConv", [3, "h", "w"], {"W_packed": _w(4, 27), "scale": _f32(4)}, CONV)
    with pytest.raises(UnsupportedOpError, match=r"needs static C, H, W") as e:
        import_onnx(model, "host")
    del e
    gc.collect()
    out, err = capfd.readouterr()
    assert "BlockBuilder" not in out + err and "Error converting" not in out + err
