"""``frugalrt.validate`` / ``frugalrt validate``: a good artifact passes, corrupted ones fail (compile tier).

Corruptions: sign bits flipped in ``lib.so``'s constant pool (a binary layer's scale), the golden
outputs permuted, the library swapped for one compiled from another model, and one golden value
off by 1e-3 in a float-only artifact (elementwise tolerance).

The float tolerance (fast tier, ``compare``): a correct float32 result with large outputs and a
long accumulation passes against float64, a small bug (a value off by 1e-3 relative, a dropped
term) fails, NaN/inf compare as IEEE values, integer outputs exactly; and (compile tier) the same
512 -> 640 MatMul compiled for ``host`` passes against PyTorch's golden outputs.
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

@pytest.mark.compile
def test_host_artifact_validates_against_golden_and_live_pytorch(digits_host_artifact, digits_example):
    golden = frugalrt.validate(digits_host_artifact)
    assert golden.passed and golden.reference == "golden" and golden.mode == "binary"
    model, (x,) = digits_example
    live = frugalrt.validate(digits_host_artifact, reference=model, inputs=[torch.cat([x, -x]).numpy()])
    assert live.passed and live.reference == "torch"
    (out,) = live.outputs
    assert out.shape == (14, 10) and out.argmax_agreement == 1.0 and out.max_abs < 1e-3


@pytest.mark.compile
def test_cli_validate_prints_a_table_writes_json_and_exits_0(digits_host_artifact, tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["validate", str(digits_host_artifact), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "linear" in text and "100.0%" in text and text.rstrip().endswith("PASSED")
    report = json.loads(out.read_text())
    assert report["passed"] is True and report["reference"] == "golden" and report["accumulation"] > 1
    (check,) = report["outputs"]
    assert check["name"] == "linear" and check["passed"] and check["argmax_agreement"] == 1.0
    assert 0 <= check["max_abs"] <= check["tolerance"] and f"{check['max_abs']:.3g}" in text


@pytest.fixture
def corrupt_copy(digits_host_artifact, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(digits_host_artifact, copy)
    return copy


def _reseal(artifact_dir) -> None:
    """After altering a file: the altered artifact first fails its checksums (Artifact.verify), then
    its manifest is rewritten for the altered files, as a miscompiling frugalrt would have written it,
    so that only the numeric comparison can tell it is wrong."""
    from frugalrt.errors import ArtifactError
    from frugalrt.runtime.artifact import MANIFEST, file_digests

    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        frugalrt.validate(artifact_dir)
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    manifest["sha256"] = file_digests(artifact_dir)
    (artifact_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _float_scale(artifact_dir) -> np.ndarray:
    """The scale of the first binary layer with a float output (a packed one's becomes thresholds)."""
    model = onnx.load(artifact_dir / "model.onnx")
    node = next(n for n in model.graph.node if n.op_type == "BinaryGemm"
                and not any(a.name == "output_packed" and a.i for a in n.attribute))
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[2]))


@pytest.mark.compile
def test_sign_bits_flipped_in_the_library_constants_fail(corrupt_copy, capsys):
    """Negate a binary layer's scale (its sign bits) inside lib.so's constant pool."""
    lib = corrupt_copy / "lib.so"
    data = bytearray(lib.read_bytes())
    scale = _float_scale(corrupt_copy).astype("<f4").tobytes()
    at = bytes(data).find(scale)
    assert at > 0 and bytes(data).find(scale, at + 1) == -1
    for i in range(at + 3, at + len(scale), 4):
        data[i] ^= 0x80
    lib.write_bytes(bytes(data))
    _reseal(corrupt_copy)
    report = frugalrt.validate(corrupt_copy)
    assert not report.passed and report.outputs[0].argmax_agreement < 1.0
    assert main(["validate", str(corrupt_copy)]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.compile
def test_permuted_golden_outputs_fail_and_the_json_report_says_so(corrupt_copy, tmp_path, capsys):
    with np.load(corrupt_copy / "golden.npz") as npz:
        arrays = dict(npz)
    want = arrays["output_0"] = arrays["output_0"][:, ::-1]
    np.savez(corrupt_copy / "golden.npz", **arrays)
    _reseal(corrupt_copy)
    out = tmp_path / "v.json"
    assert main(["validate", str(corrupt_copy), "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    (check,) = report["outputs"]
    assert report["passed"] is False and check["passed"] is False and report["mode"] == "binary"
    assert report["atol"] == 1e-5 and report["rtol"] == 1e-4 and check["shape"] == list(want.shape)
    assert check["outside"] > 0 and check["max_abs"] > check["tolerance"] > 0 and check["argmax_agreement"] < 1
    assert f"{check['max_abs']:.3g}" in capsys.readouterr().out


@pytest.mark.compile
def test_library_of_another_model_fails(corrupt_copy, digits_example, tmp_path):
    model, inputs = digits_example
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.copy_(torch.randn_like(p))
    frugalrt.export(other, inputs, tmp_path / "other.onnx")
    frugalrt.compile(tmp_path / "other.onnx", "host", tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "lib.so", corrupt_copy / "lib.so")
    _reseal(corrupt_copy)
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


@pytest.mark.compile
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
    _reseal(artifact.path)
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


# --- the float tolerance (fast: compare and the graph's accumulation length) ---------------------


def _matmul_case(batch=16, k=512, n=640, seed=0):
    """float32 x @ w (numpy's float32 BLAS) and the float64 product of the same float32 inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    return x, w, x @ w, x.astype(np.float64) @ w.astype(np.float64)


def _matmul_model(w: np.ndarray, batch="batch") -> onnx.ModelProto:
    from onnx import TensorProto, helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_correct_float32_matmul_with_large_outputs_passes_against_float64():
    from frugalrt.runtime.validate import accumulation_length, compare

    x, w, got, exact = _matmul_case()
    k = accumulation_length(_matmul_model(w))
    assert k == 512
    assert np.abs(exact).max() > 80  # outputs up to ~90: the case a fixed atol=1e-5 got wrong
    err = np.abs(got - exact)
    assert not np.all(err <= 1e-5 + 1e-4 * np.abs(exact))  # the old fixed rule fails this correct result
    check = compare("y", got, exact, "float", accumulation=k)
    assert check.passed and check.outside == 0 and check.max_abs == pytest.approx(err.max())
    # the bound: 1e-5 + 4 eps32 sqrt(512) max|ref| (~1e-3), far below any output's own scale
    bound = 1e-5 + 4 * np.finfo(np.float32).eps * np.sqrt(512) * np.abs(exact).max()
    assert check.tolerance == pytest.approx(bound) and bound < 1.1e-3
    # PyTorch's float32 golden (another summation order) against numpy's float32 result: passes too
    golden = (torch.from_numpy(x) @ torch.from_numpy(w)).numpy()
    assert compare("y", got, golden, "float", accumulation=k).passed


def test_small_bugs_in_a_long_accumulation_fail():
    from frugalrt.runtime.validate import compare

    x, w, got, exact = _matmul_case()
    big = np.unravel_index(np.abs(exact).argmax(), exact.shape)
    off = got.copy()
    off[big] *= 1 + 1e-3  # one output 1e-3 relative off
    check = compare("y", off, exact, "float", accumulation=512)
    assert not check.passed and check.outside == 1 and check.argmax_agreement == 1.0
    # one term of one dot product dropped: a term of median size, not a large one
    row, col = 3, 100
    terms = x[row].astype(np.float64) * w[:, col]
    k = int(np.argsort(np.abs(terms))[len(terms) // 2])
    dropped = got.copy()
    dropped[row, col] -= np.float32(terms[k])
    check = compare("y", dropped, exact, "float", accumulation=512)
    assert not check.passed and check.outside == 1, (terms[k], check)
    # binary mode lets a few values move but not an argmax
    assert compare("y", off, exact, "binary", accumulation=512).argmax_agreement == 1.0


def test_nan_and_inf_compare_as_ieee_values():
    from frugalrt.runtime.validate import ValidationReport, compare

    want = np.array([[np.nan, np.inf, -np.inf, 1.0, 2.0, -3.0]], np.float32)
    same = compare("y", want.copy(), want, "float")
    assert same.passed and same.max_abs == 0.0 and same.outside == 0
    cases = {  # position -> replacement, the note expected
        3: (np.nan, "1 NaN where a finite value is expected"),
        0: (1.0, "1 a number where NaN is expected"),
        1: (-np.inf, "1 a different value where inf is expected"),
        2: (np.nan, "1 NaN where a finite value or inf is expected"),
        4: (np.inf, "1 inf where a finite value is expected"),
    }
    for at, (value, note) in cases.items():
        got = want.copy()
        got[0, at] = value
        for mode in ("float", "binary"):
            check = compare("y", got, want, mode)
            assert not check.passed and check.outside == 1 and check.note == note, (at, mode, check)
            assert np.isfinite(check.max_abs) and check.max_abs == 0.0
    many = np.full((4, 10), 1.5, np.float32)
    nans = many.copy()
    nans[1, :3] = np.nan
    check = compare("y", nans, many, "float")
    assert check.note == "3 NaN where a finite value is expected" and check.outside == 3
    table = ValidationReport("a", "local", "golden", "float", 1e-4, 1e-5, [check]).table()
    assert "nan" not in table.lower().replace("nan where", "") and "3 of 40 values outside tolerance" in table


def test_integer_outputs_are_compared_exactly():
    from frugalrt.runtime.validate import compare

    want = np.array([[3, 1, 4, 1, 5]], np.int64)
    assert compare("y", want.copy(), want, "float").passed
    off = want.copy()
    off[0, 2] += 1
    for mode in ("float", "binary"):
        check = compare("y", off, want, mode, rtol=1.0, atol=10.0)
        assert not check.passed and check.tolerance == 0.0 and check.outside == 1
    assert not compare("y", np.array([True, False]), np.array([True, True]), "binary").passed


def test_accumulation_length_sums_the_reductions_of_the_graph():
    from onnx import TensorProto, helper

    from frugalrt.runtime.validate import DEFAULT_ACCUMULATION, accumulation_length

    inits = [numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in
             [("w1", (64, 48)), ("w2", (32, 48)), ("c", (8, 2, 3, 3))]]
    inits.append(numpy_helper.from_array(np.array([1, 2, 4, 4], np.int64), "shape"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]),  # 64
             helper.make_node("Gemm", ["a", "w2"], ["b"], transB=1),  # 48
             helper.make_node("Reshape", ["b", "shape"], ["r"]),
             helper.make_node("Conv", ["r", "c"], ["d"]),  # 2 * 3 * 3 = 18, output [1, 8, 2, 2]
             helper.make_node("GlobalAveragePool", ["d"], ["e"]),  # 2 * 2 = 4 (inferred shape)
             helper.make_node("Relu", ["e"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert accumulation_length(model) == 64 + 48 + 18 + 4
    unknown = helper.make_graph(nodes[:1], "u", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"]),
                                                 helper.make_tensor_value_info("w1", TensorProto.FLOAT, ["k", 48])],
                                [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)])
    assert accumulation_length(helper.make_model(unknown, opset_imports=[helper.make_opsetid("", 17)])) \
        == DEFAULT_ACCUMULATION  # a MatMul of unknown length counts the conservative default
    tw = np.zeros((5, 16, 2, 2), np.float32)
    assert accumulation_length(single_op_model("Butterfly", [32], {"twiddles": tw}, {"out_features": 32})) == 10


def test_cli_validate_documents_atol_and_rtol(capsys):
    from frugalrt.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["validate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--atol ATOL" in out and "(default 1e-05)" in out and "(default 0.0001)" in out
    assert "sqrt(K)" in out


@pytest.mark.compile
def test_compiled_512x640_matmul_passes_and_a_value_off_by_1e_3_fails(tmp_path, capsys):
    """The issue's case: a host artifact of a 512 -> 640 MatMul, golden outputs from PyTorch."""
    x, w, _, exact = _matmul_case()
    model = _matmul_model(w)
    golden = (torch.from_numpy(x) @ torch.from_numpy(w)).numpy()
    write_golden(model, [x], [golden])
    onnx.save(model, tmp_path / "mm.onnx")
    artifact = frugalrt.compile(tmp_path / "mm.onnx", "host", tmp_path / "mm")
    report = frugalrt.validate(artifact.path)
    (out,) = report.outputs
    with capsys.disabled():
        print(f"\n512->640 MatMul on host vs PyTorch: max abs {out.max_abs:.3g}, abs tol {out.tolerance:.3g}, "
              f"max|ref| {np.abs(golden).max():.3g}; PyTorch vs float64 {np.abs(golden - exact).max():.3g}")
    assert report.passed and report.mode == "float" and report.accumulation == 512, report.table()
    assert main(["validate", str(artifact.path), "--atol", "0", "--rtol", "0"]) == 0  # the noise floor alone
    assert "K=512" in capsys.readouterr().out
    off = golden.copy()
    off.flat[np.abs(golden).argmax()] *= 1.001  # a reference off by 1e-3 relative on one value
    bad = frugalrt.validate(artifact.path, reference=lambda t: torch.from_numpy(off), inputs=[x])
    assert not bad.passed and bad.outputs[0].outside == 1
