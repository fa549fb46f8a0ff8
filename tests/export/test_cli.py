"""``frugalrt export`` end to end: the digits example, .pt2 archives, and bad SOURCEs."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from frugalrt.cli import main
from frugalrt.export.metadata import read_golden
from frugalrt.export.summary import summarize
from frugalrt.nn import BinaryLinear, ButterflyLinear, freeze
from frugalrt.runtime.ort import run

EXAMPLE = Path(__file__).parents[2] / "examples" / "digits_frugal.py"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The example exported through the CLI once: (exit code, path, captured output)."""
    out = tmp_path_factory.mktemp("digits") / "m.onnx"
    code = main(["export", f"{EXAMPLE}:build", "--out", str(out), "--batch-check"])
    return code, out


def test_example_exports_with_custom_ops_and_matches_pytorch(digits):
    code, path = digits
    assert code == 0
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("ai.frugalrt", "Butterfly"), ("ai.frugalrt", "BinaryGemm")} <= ops
    inputs, outputs = read_golden(path)  # PyTorch's outputs, recorded at export
    assert inputs[0].shape == (7, 64)
    (got,) = run(path, inputs)
    np.testing.assert_allclose(got, outputs[0], rtol=1e-5, atol=1e-5 * np.abs(outputs[0]).max())
    np.testing.assert_array_equal(got.argmax(1), outputs[0].argmax(1))


def test_example_binary_weights_take_at_most_a_25th_of_float32(digits):
    _, path = digits
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "BinaryGemm"]
    assert gemms
    for node in gemms:
        packed, scale = inits[node.input[1]], inits[node.input[2]]
        k = next(a.i for a in node.attribute if a.name == "in_features")
        assert packed.dtype == np.uint8 and scale.dtype == np.float32
        assert packed.nbytes + scale.nbytes <= 4 * packed.shape[0] * k / 25
    assert all(l.ratio <= 1 / 25 for l in summarize(path).layers if l.op == "BinaryLinear")


def test_float_activations_flag_keeps_float32_between_binary_layers(digits, tmp_path):
    """By default the first BinaryGemm passes packed sign bits to the second; ``--float-activations``
    keeps float32 there, with bit-identical outputs in ONNX Runtime."""
    _, packed = digits
    out = tmp_path / "float.onnx"
    assert main(["export", f"{EXAMPLE}:build", "--out", str(out), "--float-activations"]) == 0

    def flags(path):
        return [a.name for n in onnx.load(path).graph.node for a in n.attribute if a.name.endswith("_packed")]

    assert flags(packed) == ["output_packed", "input_packed"] and flags(out) == []
    inputs, _ = read_golden(packed)
    np.testing.assert_array_equal(run(packed, inputs)[0], run(out, inputs)[0])


def test_pt2_archive_with_example_inputs(tmp_path, capsys):
    torch.manual_seed(0)
    model = freeze(torch.nn.Sequential(ButterflyLinear(12, 8), torch.nn.ReLU(), BinaryLinear(8, 3))).eval()
    x = torch.randn(4, 12)
    static = torch.export.export(model, (x,))
    torch.export.save(static, tmp_path / "static.pt2")
    assert main(["export", str(tmp_path / "static.pt2"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "dynamic_shapes" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(dynamic, tmp_path / "m.pt2")
    assert main(["export", str(tmp_path / "m.pt2"), "--out", str(tmp_path / "m.onnx"), "--portable"]) == 0
    (got,) = run(tmp_path / "m.onnx", [x.numpy()])
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert "ONNX Runtime vs PyTorch" in capsys.readouterr().out


FACTORIES = """
import torch
def no_tuple():
    return 3
def unexportable():
    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x
    return M(), (torch.randn(2, 3),)
def crashes():
    raise RuntimeError("training diverged")
"""


@pytest.mark.parametrize("source,message", [
    ("missing.py:build", "missing.py: no such file"),
    ("{dir}/f.py:nope", "no function 'nope'"),
    ("{dir}/f.py:no_tuple", "must return (model, example_inputs)"),
    ("{dir}/f.py:unexportable", "cannot export M: torch.export fails"),
    ("{dir}/f.py:crashes", "f.py:crashes failed: RuntimeError: training diverged"),
    ("{dir}/corrupt.pt2", "not a readable torch.export archive"),
    ("{dir}/f.txt", "unknown SOURCE kind"),
])
def test_bad_source_is_one_clear_error(tmp_path, capsys, monkeypatch, source, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.py").write_text(FACTORIES)
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "corrupt.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    out = tmp_path / "out" / "m.onnx"
    assert main(["export", source.format(dir=tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("frugalrt export: error: ") and message in err[-1]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
