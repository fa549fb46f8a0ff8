"""Export round trips: ONNX Runtime (custom ops -> numpy reference kernels, or standard ops)
against PyTorch, plus what the file must contain (packed bits, twiddles, metadata, schemas)."""
import copy
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import frugalrt
from frugalrt.errors import ExportError
from frugalrt.export.metadata import get_metadata, read_golden, write_golden
from frugalrt.export.summary import summarize
from frugalrt.nn import BinaryConv2d, BinaryLinear, ButterflyLinear, freeze
from frugalrt.runtime.ort import run
from frugalrt.runtime.reference import pack_bits

EXACT, FLOAT, ARGMAX = "exact", "float rtol 1e-5", "float rtol 1e-5 + same argmax"


def mlp():
    return nn.Sequential(ButterflyLinear(20, 32), nn.ReLU(), BinaryLinear(32, 16), nn.Hardtanh(),
                         BinaryLinear(16, 13, bias=False), nn.Linear(13, 5))


def convs():
    return nn.Sequential(BinaryConv2d(2, 3, (1, 3), stride=2, padding=(0, 2), bias=False),
                         BinaryConv2d(3, 6, 1, bias=False))


def one_padded_convs():
    """pad_value=1 twice; the second reads the first's packed sign bits (65 channels: 9 bytes a pixel)."""
    return nn.Sequential(BinaryConv2d(3, 65, 3, padding=1, pad_value=1),
                         BinaryConv2d(65, 5, 3, stride=(2, 1), padding=(1, 0), bias=False, pad_value=1))


B_C = {"custom": EXACT}  # portable mode only where a row says so (each export costs ~1 s)
B_CP = {"custom": EXACT, "portable": FLOAT}
# (name, model factory, input shape without batch, tolerance per mode); oracle: the frozen torch model
CASES = [
    ("butterfly 16->16", lambda: ButterflyLinear(16, 16), (16,), B_C),
    ("butterfly 20->13 no bias", lambda: ButterflyLinear(20, 13, bias=False), (20,), B_CP),
    ("butterfly 100->37", lambda: ButterflyLinear(100, 37), (100,), B_C),
    ("binary 100->37 no bias", lambda: BinaryLinear(100, 37, bias=False), (100,), B_CP),
    ("conv 3x3 stride (2,1) pad 1", lambda: BinaryConv2d(3, 4, 3, stride=(2, 1), padding=1), (3, 8, 7), B_CP),
    ("conv 1x3 stride 2 pad (0,2) -> 1x1, no bias", convs, (2, 5, 9), B_C),
    ("conv 3x3 stride (2,1) pad (1,2), pad_value 1",
     lambda: BinaryConv2d(3, 4, 3, stride=(2, 1), padding=(1, 2), pad_value=1), (3, 8, 7), B_CP),
    ("one-padded convs, packed between", one_padded_convs, (3, 6, 5), B_CP),
    ("mlp butterfly+binary+linear", mlp, (20,), {"custom": ARGMAX, "portable": ARGMAX}),
]
MODES = ["custom", "portable"]
ROWS = [(c[0], mode) for c in CASES for mode in c[3]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, x, proto, path) per (case, mode), exported once."""
    cache = {}

    def get(case, mode):
        if (case, mode) not in cache:
            name, make, shape, _ = next(c for c in CASES if c[0] == case)
            torch.manual_seed(len(name))
            model, x = make(), torch.randn(7, *shape)
            path = tmp_path_factory.mktemp("export") / "m.onnx"
            proto = frugalrt.export(model, (x,), path, portable=mode == "portable",
                                    metadata={"frugalrt.certificate.test": json.dumps({"bound": 0.25})})
            cache[(case, mode)] = model, x, proto, path
        return cache[(case, mode)]

    return get


def _check(got, want, tolerance):
    if tolerance == EXACT:
        np.testing.assert_array_equal(got, want)
        return
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if tolerance == ARGMAX:
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("case,mode", ROWS)
@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_runtime_matches_pytorch(exported, case, mode, batch):
    model, x, proto, _ = exported(case, mode)
    reference = freeze(copy.deepcopy(model)).eval()
    x = x[:batch]
    with torch.no_grad():
        want = reference(x).numpy()
    (got,) = run(proto, [x.numpy()])
    _check(got, want, next(c for c in CASES if c[0] == case)[3][mode])


@pytest.mark.parametrize("case,mode", ROWS)
def test_file_passes_checker_and_shape_inference(exported, case, mode):
    model, x, proto, path = exported(case, mode)
    onnx.checker.check_model(str(path), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    with torch.no_grad():
        y = freeze(copy.deepcopy(model)).eval()(x)
    (out,) = inferred.graph.output
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert dims == ["batch", *y.shape[1:]]
    assert [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    domains = {o.domain: o.version for o in proto.opset_import}
    assert domains.get("", domains.get("ai.onnx", 0)) >= 18
    if mode == "portable":
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    else:
        assert any(n.domain == "ai.frugalrt" for n in proto.graph.node)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["binary 100->37 no bias", "conv 3x3 stride (2,1) pad 1", "mlp butterfly+binary+linear"])
def test_binary_weights_stay_packed(exported, case, mode):
    model, _, proto, _ = exported(case, mode)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    packed = [a for a in inits.values() if a.dtype == np.uint8 and a.ndim == 2]
    binary = [m for m in model.modules() if isinstance(m, (BinaryLinear, BinaryConv2d))]
    assert len(packed) == len(binary)
    for m in binary:
        want = pack_bits(m.weight.detach().flatten(1).numpy())
        assert any(a.shape == want.shape and np.array_equal(a, want) for a in packed)
        full = m.weight.numel()  # no unpacked copy of the weight in any form
        assert not any(a.dtype != np.uint8 and a.size == full for a in inits.values())


@pytest.mark.parametrize("case,mode", ROWS)
def test_no_unused_initializers(exported, case, mode):
    _, _, proto, _ = exported(case, mode)
    used = {i for n in proto.graph.node for i in n.input}
    assert {t.name for t in proto.graph.initializer} <= used


def test_butterfly_stored_as_twiddles(exported):
    model, _, proto, _ = exported("butterfly 100->37", "custom")
    (node,) = [n for n in proto.graph.node if n.op_type == "Butterfly"]
    twiddles = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == node.input[1]))
    np.testing.assert_array_equal(twiddles, model.twiddles.detach().numpy())
    assert twiddles.shape == (7, 64, 2, 2)
    assert [a.i for a in node.attribute if a.name == "out_features"] == [37]


def test_optional_bias_is_omitted(exported):
    _, _, proto, _ = exported("conv 1x3 stride 2 pad (0,2) -> 1x1, no bias", "custom")
    node = [n for n in proto.graph.node if n.domain == "ai.frugalrt"][1]
    assert node.op_type == "BinaryConv" and len(node.input) == 3
    attrs = {a.name: list(a.ints) or a.i for a in node.attribute}
    # input_packed: its X comes only from the first binary conv, which emits packed sign bits
    assert attrs == {"in_channels": 3, "kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0],
                     "input_packed": 1}


def test_pad_value_is_written_only_where_one(exported):
    """Custom ops: pad_value = 1 on each one-padded BinaryConv (with packed X or Y alike); a zero-padded
    one carries no pad_value (its files stay as they were)."""
    _, _, proto, _ = exported("one-padded convs, packed between", "custom")
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in proto.graph.node if n.op_type == "BinaryConv"]
    assert [(a.get("pad_value"), a.get("input_packed"), a.get("output_packed")) for a in attrs] == \
        [(1, None, 1), (1, 1, None)]
    _, _, proto, _ = exported("conv 3x3 stride (2,1) pad 1", "custom")
    assert not any(a.name == "pad_value" for n in proto.graph.node for a in n.attribute)


def test_portable_one_padding_runs_in_stock_onnx_runtime(exported):
    """Portable mode pads sign(x) with ones (Pad, constant 1.0), then runs an unpadded Conv."""
    import onnxruntime as ort

    model, x, proto, _ = exported("one-padded convs, packed between", "portable")
    pads = [n for n in proto.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert all(list(a.ints) == [0, 0, 0, 0] for n in convs for a in n.attribute if a.name == "pads")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {proto.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        want = freeze(copy.deepcopy(model)).eval()(x).numpy()
    _check(got, want, FLOAT)


@pytest.mark.parametrize("mode", MODES)
def test_metadata_and_golden_vectors(exported, mode):
    model, x, proto, path = exported("mlp butterfly+binary+linear", mode)
    meta = get_metadata(path)
    assert meta["frugalrt.version"] == frugalrt.__version__
    assert meta["frugalrt.source_class"] == "torch.nn.modules.container.Sequential"
    assert json.loads(meta["frugalrt.ops"]) == dict(Counter(
        (f"{n.domain}::{n.op_type}" if n.domain else n.op_type) for n in proto.graph.node))
    assert json.loads(meta["frugalrt.certificate.test"]) == {"bound": 0.25}
    inputs, outputs = read_golden(path)
    np.testing.assert_array_equal(inputs[0], x.numpy())
    with torch.no_grad():
        np.testing.assert_array_equal(outputs[0], freeze(copy.deepcopy(model)).eval()(x).numpy())


def test_model_carried_metadata_is_exported_and_overridable(tmp_path):
    model = nn.Sequential(BinaryLinear(16, 4)).eval()
    model.frugalrt_metadata = {"frugalrt.certificate.a": "1", "frugalrt.certificate.b": "2"}
    frugalrt.export(model, (torch.randn(3, 16),), tmp_path / "m.onnx", metadata={"frugalrt.certificate.b": "3"})
    meta = get_metadata(tmp_path / "m.onnx")
    assert (meta["frugalrt.certificate.a"], meta["frugalrt.certificate.b"]) == ("1", "3")


def test_golden_round_trip_and_absence():
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert read_golden(model) is None
    ins, outs = [np.arange(6, dtype=np.float32).reshape(2, 3)], [np.ones((2, 1), np.float32), np.zeros(2, np.int64)]
    write_golden(model, ins, outs)
    got_in, got_out = read_golden(model)
    assert len(got_in) == 1 and len(got_out) == 2
    for a, b in zip(got_in + got_out, ins + outs):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_summary_counts_dense_equivalent(exported):
    model, _, proto, path = exported("mlp butterfly+binary+linear", "custom")
    s = summarize(path)
    assert s.file_bytes == path.stat().st_size
    assert s.ops == {k: v for k, v in json.loads(get_metadata(path)["frugalrt.ops"]).items()}
    # dense equivalent: each structured layer replaced by its float32 out x in matrix
    dense = 4 * (20 * 32 + 32 * 16 + 16 * 13)
    stored = 4 * model[0].twiddles.numel() + 16 * (4 + 4) + 13 * (2 + 4)
    assert s.dense_bytes == s.file_bytes - stored + dense
    assert [(l.op, l.in_features, l.out_features) for l in s.layers] == [
        ("ButterflyLinear", 20, 32), ("BinaryLinear", 32, 16), ("BinaryLinear", 16, 13)]
    assert "ai.frugalrt::BinaryGemm" in s.format()


# --- bad inputs: one clear ExportError, no file ----------------------------------------------------

class DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class Numpy(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.numpy() * 2)


@pytest.mark.parametrize("model,inputs,match", [
    (DataDependent(), (torch.randn(3, 4),), "cannot export DataDependent"),
    (Numpy(), (torch.randn(3, 4),), "cannot export Numpy"),
    (ButterflyLinear(8, 4), (torch.randn(3, 5),), r"ButterflyLinear fails on the example inputs of shape \(3, 5\)"),
    (ButterflyLinear(8, 4), (torch.randn(3, 8).double(),), "must be a float32 tensor"),
    (ButterflyLinear(8, 4), (), "at least one example input"),
    ("not a model", (torch.randn(3, 8),), "needs a torch.nn.Module"),
])
def test_bad_export_raises_and_writes_nothing(tmp_path, model, inputs, match):
    with pytest.raises(ExportError, match=match):
        frugalrt.export(model, inputs, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_export_does_not_touch_the_callers_model(tmp_path):
    model = nn.Sequential(BinaryLinear(8, 4)).train()
    frugalrt.export(model, torch.randn(2, 8), tmp_path / "m.onnx")
    assert model.training and not model[0].frozen and hasattr(model[0], "weight")
