"""compress: named nn.Linear layers become ButterflyLinear; reported errors match a recomputation."""
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from frugalrt.cli import main
from frugalrt.nn import ButterflyLinear, compress
from frugalrt.nn.compress import CompressError


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))


def test_layers_are_replaced_and_errors_match_a_recomputation():
    model = mlp()
    compressed, report = compress(model, ["0", "2.0"])
    assert isinstance(compressed[0], ButterflyLinear) and isinstance(compressed[2][0], ButterflyLinear)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    for row, (old, new) in zip(report.layers, [(model[0], compressed[0]), (model[2][0], compressed[2][0])]):
        w = old.weight.detach().double()
        recomputed = float(torch.linalg.norm(new.to_dense().double() - w) / torch.linalg.norm(w))
        assert row.relative_error == pytest.approx(recomputed, rel=1e-4)
        assert row.butterfly_params == new.twiddles.numel() and row.dense_params == w.numel()
        torch.testing.assert_close(new.bias, old.bias)
    x = torch.randn(5, 12)
    with torch.no_grad():
        h = torch.relu(x @ compressed[0].to_dense().T + compressed[0].bias)
        h = torch.tanh(h @ compressed[2][0].to_dense().T + compressed[2][0].bias)
        torch.testing.assert_close(compressed(x), compressed[3](h), rtol=1e-5, atol=1e-5)


def test_a_butterfly_weight_compresses_without_error():
    model = mlp()
    exact = ButterflyLinear(16, 16)
    with torch.no_grad():
        model[2][0].weight.copy_(exact.to_dense())
    _, report = compress(model, ["2.0"])
    assert report.layers[0].relative_error < 1e-6


def test_finetuning_reports_accuracies_on_the_given_data():
    model = mlp()
    x = torch.randn(64, 12)
    y = model(x).argmax(1).detach()
    _, report = compress(model, ["0"], finetune_data=(x, y), epochs=3)
    assert report.accuracy_before == 1.0
    assert 0.0 <= report.accuracy_compressed <= 1.0 and 0.0 <= report.accuracy_finetuned <= 1.0
    with pytest.raises(CompressError, match="labelled data"):
        compress(model, ["0"], epochs=2)


def test_a_layer_that_is_not_linear_is_named_in_the_error():
    valid = r"is missing or not an nn.Linear \(its nn.Linear layers: 0, 2.0, 3\)"
    with pytest.raises(CompressError, match=rf"layer '1' of Sequential {valid}"):
        compress(mlp(), ["1"])
    with pytest.raises(CompressError, match=rf"layer 'fc9' of Sequential {valid}"):
        compress(mlp(), ["fc9"])


FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.rand(3, 8),)

def finetune_data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
"""


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_cli_compresses_finetunes_and_writes(tmp_path, capsys, suffix):
    src = tmp_path / "factory.py"
    src.write_text(textwrap.dedent(FACTORY))
    out = tmp_path / f"small{suffix}"
    assert main(["compress", f"{src}:build", "--layers", "0", "--finetune", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "0" in printed and "accuracy: before" in printed and out.exists()
    if suffix == ".onnx":
        from frugalrt.export.metadata import get_metadata, read_golden
        from frugalrt.runtime.ort import run

        assert '"ai.frugalrt::Butterfly": 1' in get_metadata(out)["frugalrt.ops"]
        inputs, outputs = read_golden(out)
        np.testing.assert_allclose(run(out, inputs)[0], outputs[0], rtol=1e-5, atol=1e-5)
    else:
        module = torch.export.load(str(out)).module()
        assert module(torch.rand(5, 8)).shape == (5, 4)


def test_cli_rejects_fine_tuning_without_data_and_bad_outputs(tmp_path, capsys):
    src = tmp_path / "factory.py"
    src.write_text(textwrap.dedent(FACTORY).replace("def finetune_data", "def _unused"))
    assert main(["compress", f"{src}:build", "--layers", "0", "--finetune", "2", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "define finetune_data()" in capsys.readouterr().err
    assert main(["compress", f"{src}:build", "--layers", "0", "--out", str(tmp_path / "m.tflite")]) == 2
    assert "unknown format '.tflite'" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))
