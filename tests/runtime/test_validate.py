"""``frugalrt.validate`` / ``frugalrt validate``: a good artifact passes, corrupted ones fail (compile tier).

Corruptions: sign bits flipped in ``lib.so``'s constant pool (a binary layer's scale), the golden
outputs permuted, the library swapped for one compiled from another model, and one golden value
off by 1e-3 in a float-only artifact (elementwise tolerance).
"""
import copy
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import frugalrt
from frugalrt.cli import main
from frugalrt.export.metadata import set_metadata, write_golden
from frugalrt.export.single_op import single_op_model
from frugalrt.runtime.reference import butterfly

pytestmark = pytest.mark.compile


def test_host_artifact_validates_against_golden_and_live_pytorch(digits_host_artifact, digits_example):
    golden = frugalrt.validate(digits_host_artifact)
    assert golden.passed and golden.reference == "golden" and golden.mode == "binary"
    model, (x,) = digits_example
    live = frugalrt.validate(digits_host_artifact, reference=model, inputs=[torch.cat([x, -x]).numpy()])
    assert live.passed and live.reference == "torch"
    (out,) = live.outputs
    assert out.shape == (14, 10) and out.argmax_agreement == 1.0 and out.max_abs < 1e-3


def test_cli_validate_prints_a_table_and_exits_0(digits_host_artifact, capsys):
    assert main(["validate", str(digits_host_artifact)]) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "100.0%" in out and out.rstrip().endswith("PASSED")


@pytest.fixture
def corrupt_copy(digits_host_artifact, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(digits_host_artifact, copy)
    return copy


def _first_scale(artifact_dir) -> np.ndarray:
    model = onnx.load(artifact_dir / "model.onnx")
    node = next(n for n in model.graph.node if n.op_type == "BinaryGemm")
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[2]))


def test_sign_bits_flipped_in_the_library_constants_fail(corrupt_copy, capsys):
    """Negate the first binary layer's scale (its sign bits) inside lib.so's constant pool."""
    lib = corrupt_copy / "lib.so"
    data = bytearray(lib.read_bytes())
    scale = _first_scale(corrupt_copy).astype("<f4").tobytes()
    at = bytes(data).find(scale)
    assert at > 0 and bytes(data).find(scale, at + 1) == -1
    for i in range(at + 3, at + len(scale), 4):
        data[i] ^= 0x80
    lib.write_bytes(bytes(data))
    report = frugalrt.validate(corrupt_copy)
    assert not report.passed and report.outputs[0].argmax_agreement < 1.0
    assert main(["validate", str(corrupt_copy)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_permuted_golden_outputs_fail(corrupt_copy):
    with np.load(corrupt_copy / "golden.npz") as npz:
        arrays = dict(npz)
    arrays["output_0"] = arrays["output_0"][:, ::-1]
    np.savez(corrupt_copy / "golden.npz", **arrays)
    assert not frugalrt.validate(corrupt_copy).passed


def test_library_of_another_model_fails(corrupt_copy, digits_example, tmp_path):
    model, inputs = digits_example
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p))
    frugalrt.export(other, inputs, tmp_path / "other.onnx")
    frugalrt.compile(tmp_path / "other.onnx", "host", tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "lib.so", corrupt_copy / "lib.so")
    assert not frugalrt.validate(corrupt_copy).passed


def _butterfly_artifact(tmp_path, certificate: dict | None = None):
    """A float-only artifact (one Butterfly node), golden outputs from the numpy reference."""
    rng = np.random.default_rng(0)
    tw = rng.standard_normal((5, 16, 2, 2)).astype(np.float32)
    model = single_op_model("Butterfly", [32], {"twiddles": tw}, {"out_features": 32})
    x = rng.standard_normal((3, 32)).astype(np.float32)
    write_golden(model, [x], [butterfly(x, tw, out_features=32)])
    if certificate:
        set_metadata(model, {k: json.dumps(v) for k, v in certificate.items()})
    onnx.save(model, tmp_path / "bf.onnx")
    return frugalrt.compile(tmp_path / "bf.onnx", "host", tmp_path / "bf")


def test_float_artifact_is_checked_elementwise_and_shows_its_certificate(tmp_path, capsys):
    artifact = _butterfly_artifact(tmp_path, {"frugalrt.certificate.risk_bound": {"bound": 0.1, "delta": 0.05}})
    report = frugalrt.validate(artifact.path)
    assert report.passed and report.mode == "float" and report.outputs[0].max_rel < 1e-4
    assert report.certificate == {"frugalrt.certificate.risk_bound": {"bound": 0.1, "delta": 0.05}}
    assert main(["validate", str(artifact.path)]) == 0
    assert "certificate risk_bound: 0-1 risk <= 0.1000" in capsys.readouterr().out
    # A 1e-3 relative error in one golden value must fail the elementwise check.
    with np.load(artifact.path / "golden.npz") as npz:
        arrays = dict(npz)
    arrays["output_0"][1, 7] *= 1.001
    np.savez(artifact.path / "golden.npz", **arrays)
    corrupted = frugalrt.validate(artifact.path)
    assert not corrupted.passed and 5e-4 < corrupted.outputs[0].max_rel < 2e-3


@pytest.mark.parametrize("mode", ["float", "binary"])
def test_values_scaled_far_off_fail_even_when_every_argmax_agrees(mode):
    from frugalrt.runtime.validate import compare

    want = np.random.default_rng(0).normal(size=(7, 10)).astype(np.float32)
    assert compare("y", want + 1e-7, want, mode, rtol=1e-4, atol=1e-5).passed
    wrong = compare("y", want * 3, want, mode, rtol=1e-4, atol=1e-5)  # same argmax, wrong values
    assert wrong.argmax_agreement == 1.0 and not wrong.passed
    one_flip = want.copy()
    one_flip[0] += 0.01 * (np.arange(10) == want[0].argmin())  # a small move that keeps the argmax
    assert compare("y", one_flip, want, mode, rtol=1e-4, atol=1e-5).passed == (mode == "binary")
