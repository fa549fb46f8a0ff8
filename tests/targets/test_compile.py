"""``frugalrt compile`` of the digits example for every target, and its clear errors (compile tier).

Off the host the artifacts are checked without running them: the ELF header of each library
(class and machine), the CUDA library's embedded fatbin, the C bundle's files.
"""
import json
import platform
import struct

import numpy as np
import onnx
import pytest
from onnx import helper

import frugalrt
from frugalrt.cli import main
from frugalrt.errors import TargetError, UnsupportedOpError
from frugalrt.export.single_op import single_op_model
from frugalrt.runtime.reference import pack_bits
from frugalrt.targets.registry import TARGETS

pytestmark = pytest.mark.compile

# triple prefix -> (ELF class: 1 = 32-bit, 2 = 64-bit; e_machine: 62 x86-64, 183 AArch64, 40 ARM)
ELF_OF_TRIPLE = {"x86_64": (2, 62), "aarch64": (2, 183), "arm": (1, 40)}
SHARED_LIBS = sorted(name for name, t in TARGETS.items() if t.artifact == "shared-lib")


def expected_elf(name: str) -> tuple[int, int]:
    """(class, machine) of a shared-lib target's library: from its triple (``host``: this machine)."""
    triple = TARGETS[name].tvm.get("mtriple") or platform.machine()
    return next(elf for prefix, elf in ELF_OF_TRIPLE.items() if triple.startswith(prefix))


@pytest.fixture(scope="module")
def build(digits_onnx, tmp_path_factory, need_tools):
    """``build(target)``: the digits example compiled for ``target``, once per module; skips, naming the
    Debian package, when the target's linker is missing."""
    cache = {}

    def get(name: str):
        linker = TARGETS[name].cross_cc or ("g++" if TARGETS[name].artifact == "shared-lib" else None)
        if linker:
            need_tools(linker, why=f"linking for {name}")
        if TARGETS[name].artifact == "cuda-lib":
            need_tools("nvcc", why=f"compiling the CUDA kernels of {name}")
        if name not in cache:
            cache[name] = frugalrt.compile(digits_onnx, name, tmp_path_factory.mktemp("build") / name)
        return cache[name]

    return get


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_artifact_manifest_and_files(build, target, digits_onnx):
    artifact = build(target)
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert (manifest["target"], manifest["artifact"]) == (target, TARGETS[target].artifact)
    assert manifest["inputs"] == [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    assert (artifact.path / "model.onnx").read_bytes() == onnx.load(digits_onnx).SerializeToString()
    assert artifact.lib_path.exists()
    inputs, outputs = artifact.golden()
    assert inputs[0].shape == (7, 64) and outputs[0].shape == (7, 10)


@pytest.mark.parametrize("target", SHARED_LIBS)
def test_library_is_an_elf_for_the_target_cpu(build, target):
    header = build(target).lib_path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert (header[4], struct.unpack("<H", header[18:20])[0]) == expected_elf(target)


def test_cuda_library_embeds_compiled_kernels(build):
    """lib.so carries an nvcc fatbin, not CUDA source (tests/targets/test_cuda.py checks it in depth)."""
    from frugalrt.targets.cuda_build import embedded_cuda

    artifact = build("cuda")
    assert artifact.lib_path.name == "lib.so" and embedded_cuda(artifact.lib_path)[0] == "fatbin"
    assert "__global__" in (artifact.path / artifact.manifest["cuda"]["source"]).read_text()


@pytest.mark.parametrize("target", ["cortex-m4", "cortex-m7"])
def test_c_bundle_calls_the_shim_popcount(build, target):
    bundle = build(target).lib_path
    assert "frugalrt_popcount" in (bundle / "kernels.c").read_text()
    assert "frugalrt_popcount32" in (bundle / "frugalrt_runtime.h").read_text()


def test_cli_compile_prints_each_step(digits_onnx, tmp_path, capsys):
    assert main(["compile", str(digits_onnx), "--target", "host", "--out", str(tmp_path / "host")]) == 0
    err = capsys.readouterr().err
    for step in ("import", "build", "link", "write"):
        assert f"{step} (host)" in err


def _edited_gemm(op_type: str = "BinaryGemm", domain: str = "ai.frugalrt", inputs: list = (),
                 version: int = 1) -> onnx.ModelProto:
    """A valid 16 -> 4 BinaryGemm model, then edited into an unsupported node (op, domain, inputs, version)."""
    w = pack_bits(np.random.default_rng(0).standard_normal((4, 16)))
    model = single_op_model("BinaryGemm", [16], {"W_packed": w, "scale": np.ones(4, np.float32)}, {"in_features": 16})
    node = model.graph.node[0]
    node.op_type, node.domain = op_type, domain
    if inputs:
        node.input[:] = inputs
    opsets = {o.domain: o for o in model.opset_import}
    opsets["ai.frugalrt"].version = version
    if domain not in opsets:
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


@pytest.mark.parametrize("edit,message", [
    (dict(op_type="FusedMatMul", domain="com.microsoft", inputs=["X", "X"]), "com.microsoft::FusedMatMul.*version 1"),
    (dict(op_type="Ternary", inputs=["X"]), "ai.frugalrt::Ternary"),
    (dict(version=2), "ai.frugalrt::BinaryGemm.*version 2"),
    (dict(inputs=["X", "X", "X"]), "W_packed, scale and B must be constant"),
])
def test_unsupported_ops_are_named(edit, message, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_edited_gemm(**edit), path)
    with pytest.raises(UnsupportedOpError, match=message):
        frugalrt.compile(path, "host", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # atomic: nothing left behind


def test_bad_target_is_a_clear_error(digits_onnx, tmp_path, capsys):
    with pytest.raises(TargetError, match="unknown target 'rpi9'"):
        frugalrt.compile(digits_onnx, "rpi9", tmp_path / "out")
    assert main(["compile", str(digits_onnx), "--target", "rpi9", "--out", str(tmp_path / "o")]) == 2
    assert "known targets: host" in capsys.readouterr().err
