"""compress: named nn.Linear layers become ButterflyLinear; reported errors match a recomputation."""
import re
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from frugalrt.cli import main
from frugalrt.nn import ButterflyLinear, compress, factorize
from frugalrt.nn.compress import CompressError


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Linear(16, 3))


def test_layers_are_replaced_and_errors_match_a_recomputation(butterfly_matrix):
    """Oracle: the spec's dense matrix of each new layer's twiddles (explicit loops, float64)."""
    model = mlp()
    compressed, report = compress(model, ["0", "2.0"])
    assert isinstance(compressed[0], ButterflyLinear) and isinstance(compressed[2][0], ButterflyLinear)
    assert isinstance(model[0], nn.Linear)  # the original is untouched
    dense = []
    for row, (old, new) in zip(report.layers, [(model[0], compressed[0]), (model[2][0], compressed[2][0])]):
        w = old.weight.detach().double().numpy()
        m = butterfly_matrix(new.twiddles.detach().double().numpy())[: w.shape[0], : w.shape[1]]
        assert row.relative_error == pytest.approx(np.linalg.norm(m - w) / np.linalg.norm(w), rel=1e-4)
        assert row.butterfly_params == new.twiddles.numel() and row.dense_params == w.size
        torch.testing.assert_close(new.bias, old.bias)
        dense.append(torch.from_numpy(m).float())
    x = torch.randn(5, 12)
    with torch.no_grad():
        h = torch.relu(x @ dense[0].T + compressed[0].bias)
        h = torch.tanh(h @ dense[1].T + compressed[2][0].bias)
        torch.testing.assert_close(compressed(x), compressed[3](h), rtol=1e-5, atol=1e-5)


def test_a_butterfly_weight_compresses_without_error():
    model = mlp()
    exact = ButterflyLinear(16, 16)
    with torch.no_grad():
        model[2][0].weight.copy_(exact.to_dense())
    _, report = compress(model, ["2.0"])
    assert report.layers[0].relative_error < 1e-6


def test_finetuning_improves_the_accuracy_and_reports_it(butterfly_matrix):
    """Labels from a random linear rule the MLP was never trained on: before and after compression it is
    near chance (1/3); 20 epochs of fine-tuning must lift it far above (measured 0.30 -> 0.91). Each
    reported accuracy is recomputed: the compressed model via the spec matrix of its twiddles."""
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 12, generator=g)
    y = (x @ torch.randn(12, 3, generator=g)).argmax(1)
    accuracy = lambda f: (f(x).argmax(1) == y).float().mean().item()  # noqa: E731
    tuned, report = compress(model, ["0"], finetune_data=(x, y), epochs=20, lr=1e-2)
    first = compress(model, ["0"])[0][0]  # the factorization is deterministic: the untuned layer
    m = torch.from_numpy(butterfly_matrix(first.twiddles.detach().double().numpy())[:16, :12]).float()
    with torch.no_grad():
        assert report.accuracy_before == accuracy(model)
        assert report.accuracy_compressed == accuracy(lambda v: model[1:](v @ m.T + model[0].bias))
        assert report.accuracy_finetuned == accuracy(tuned)
    assert report.accuracy_finetuned >= report.accuracy_compressed + 0.4
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
def test_cli_compresses_finetunes_and_writes(tmp_path, capsys, suffix, butterfly_matrix):
    src = tmp_path / "factory.py"
    src.write_text(textwrap.dedent(FACTORY))
    out = tmp_path / f"small{suffix}"
    assert main(["compress", f"{src}:build", "--layers", "0", "--finetune", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    factory = {}
    exec(textwrap.dedent(FACTORY), factory)
    (model, _), (x, y) = factory["build"](), factory["finetune_data"]()
    w = model[0].weight.detach().double().numpy()
    m = butterfly_matrix(factorize(w).twiddles)
    row = re.search(r"^0\s+8x8\s+8\s+(\d\.\d{4})\s+64 -> 48$", printed, re.M)  # 3 stages x 4 blocks x 4
    assert row and float(row[1]) == pytest.approx(np.linalg.norm(m - w) / np.linalg.norm(w), abs=1e-4), printed
    if suffix == ".onnx":
        from frugalrt.export.metadata import get_metadata, read_golden
        from frugalrt.runtime.ort import run

        assert '"ai.frugalrt::Butterfly": 1' in get_metadata(out)["frugalrt.ops"]
        inputs, outputs = read_golden(out)
        np.testing.assert_allclose(run(out, inputs)[0], outputs[0], rtol=1e-5, atol=1e-5)
        scores = run(out, [x.numpy()])[0]
    else:
        scores = torch.export.load(str(out)).module()(x).detach().numpy()
    with torch.no_grad():  # accuracies on finetune_data: factory model, compressed (spec matrix), written file
        before = (model(x).argmax(1) == y).float().mean()
        compressed = (model[1:](x @ torch.from_numpy(m).float().T + model[0].bias).argmax(1) == y).float().mean()
    tuned = (scores.argmax(1) == y.numpy()).mean()
    line = f"accuracy: before {before:.2%}, compressed {compressed:.2%}, fine-tuned {tuned:.2%}"
    assert line in printed.splitlines(), printed


def test_cli_rejects_fine_tuning_without_data_and_bad_outputs(tmp_path, capsys):
    src = tmp_path / "factory.py"
    src.write_text(textwrap.dedent(FACTORY).replace("def finetune_data", "def _unused"))
    assert main(["compress", f"{src}:build", "--layers", "0", "--finetune", "2", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "define finetune_data()" in capsys.readouterr().err
    assert main(["compress", f"{src}:build", "--layers", "0", "--out", str(tmp_path / "m.tflite")]) == 2
    assert "unknown format '.tflite'" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))
