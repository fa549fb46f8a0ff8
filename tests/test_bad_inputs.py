"""Malformed models, artifacts and CLI arguments: each gives one error line and a non-zero exit,
leaves the files it was given untouched and writes nothing, and finishes in bounded time.

Each case is run through ``frugalrt.cli.main`` in this process (stderr captured at the file
descriptor, so TVM's C++ warnings would show) under an alarm; the few whose old failure was a
crash of the interpreter (bus error, abort) run in a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import frugalrt
from frugalrt.cli import main
from frugalrt.nn import BinaryLinear, ButterflyLinear

TIME_LIMIT_S = 240

SOURCES = '''
import torch
from frugalrt.nn import BinaryLinear, ButterflyLinear

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(ButterflyLinear(8, 8), BinaryLinear(8, 4)).eval()

def build():
    return net(), (torch.randn(3, 8),)

def nan_weights():
    model = net()
    with torch.no_grad():
        model[0].twiddles[1, 2, 0, 1] = float("nan")
    return model, (torch.randn(3, 8),)

def inf_weights():
    model = net()
    with torch.no_grad():
        model[1].weight[2, 3] = float("inf")
    return model, (torch.randn(3, 8),)

def raises():
    raise RuntimeError("dataset missing")

def not_a_model():
    return 42
'''


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder with ``models.py`` (factories), ``small.onnx`` (Butterfly + BinaryGemm) and its variants."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "models.py").write_text(SOURCES)
    torch.manual_seed(0)
    model = torch.nn.Sequential(ButterflyLinear(8, 8), BinaryLinear(8, 4)).eval()
    frugalrt.export(model, (torch.randn(3, 8),), root / "small.onnx")
    proto = onnx.load(root / "small.onnx")
    for name, edit in MODEL_EDITS.items():
        variant = onnx.ModelProto()
        variant.CopyFrom(proto)
        edit(variant)
        (root / f"{name}.onnx").write_bytes(variant.SerializeToString())
    data = (root / "small.onnx").read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "garbage.onnx").write_bytes(b"\x00not an onnx model\xff" * 10)
    (root / "notazip.pt2").write_bytes(b"PK? no")
    (root / "notes.txt").write_text("my notes")
    (root / "results").mkdir()
    (root / "results" / "thesis.tex").write_text("years of work")
    return root


def _initializer(model: onnx.ModelProto, suffix: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name.endswith(suffix))


def _replace(model: onnx.ModelProto, suffix: str, value: np.ndarray) -> None:
    old = _initializer(model, suffix)
    old.CopyFrom(numpy_helper.from_array(value, old.name))


def _node(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _set_attr(model: onnx.ModelProto, op_type: str, name: str, value) -> None:
    node = _node(model, op_type)
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [onnx.helper.make_attribute(name, value)])


def _int64_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64


def _fixed_batch(model: onnx.ModelProto) -> None:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3


MODEL_EDITS = {
    "scale3": lambda m: _replace(m, "weight_scale_", np.ones(3, np.float32)),
    "bias5": lambda m: _replace(m, "1.bias", np.ones(5, np.float32)),
    "twiddles35": lambda m: _replace(m, "twiddles", np.ones((3, 5, 2, 2), np.float32)),
    "packed_rows": lambda m: _replace(m, "weight_packed", np.zeros((4, 3), np.uint8)),
    "in_features": lambda m: _set_attr(m, "BinaryGemm", "in_features", 9),
    "out_features": lambda m: _set_attr(m, "Butterfly", "out_features", 16),
    "nan_twiddles": lambda m: _replace(m, "twiddles", np.full((3, 4, 2, 2), np.nan, np.float32)),
    "unknown_version": lambda m: [setattr(o, "version", 99) for o in m.opset_import if o.domain == "ai.frugalrt"],
    "unknown_op": lambda m: setattr(_node(m, "Butterfly"), "op_type", "Butterfy"),
    "int64_input": _int64_input,
    "fixed_batch": _fixed_batch,
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_dir() or not any(p.iterdir())}


class _TimeLimit(Exception):
    pass


def _alarm(signum, frame):
    raise _TimeLimit(f"the command ran past {TIME_LIMIT_S} s")


@pytest.fixture
def run_cli(base, tmp_path, monkeypatch, capfd):
    """``run_cli(*argv)`` in a copy of ``base``: (exit code, stderr); asserts the case's invariants."""
    work = tmp_path / "work"
    shutil.copytree(base, work, symlinks=True)
    monkeypatch.chdir(work)

    def run(*argv: str, extra_files: tuple[str, ...] = ()) -> str:
        before = _tree(work)
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT_S)
        try:
            code = main(list(argv))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        out, err = capfd.readouterr()
        assert code not in (0, None), f"exit {code} for {argv}: {out}{err}"
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
        assert "Traceback" not in err and "Warning" not in err, err
        after = _tree(work)
        assert {k: v for k, v in after.items() if k not in extra_files} == before, \
            f"{argv} changed files: {set(after.items()) ^ set(before.items())}"
        return errors[0]

    return run


# --- command line, export (fast tier: no TVM) ---------------------------------------------------
FAST = [
    ((), "arguments are required"),
    (("launch",), "invalid choice"),
    (("export", "missing.py", "--out", "m.onnx"), "missing.py: no such file"),
    (("export", "models.py:nope", "--out", "m.onnx"), "no function 'nope'"),
    (("export", "models.py:raises", "--out", "m.onnx"), "dataset missing"),
    (("export", "models.py:not_a_model", "--out", "m.onnx"), "must return"),
    (("export", "models.py:nan_weights", "--out", "m.onnx"), r"0\.twiddles.*(nan|NaN|finite)"),
    (("export", "models.py:inf_weights", "--out", "m.onnx"), r"1\.weight.*(inf|finite)"),
    (("export", "models.py:build", "--out", "results"), "is a directory"),
    (("export", "models.py:build", "--out", "notes.txt"), "not a .onnx file"),
    (("export", "models.py:build", "--out", "models.py"), "is the input"),
    (("export", "models.py:build", "--out", "."), "not '.'"),
    (("export", "notazip.pt2", "--out", "m.onnx"), "not a readable torch.export archive"),
    (("export", "models.py:build", "--out", "m.onnx", "--portable", "--bogus"), "unrecognized arguments"),
    (("compile", "small.onnx", "--target", "pdp11", "--out", "a"), "unknown target 'pdp11'"),
    (("validate", "results"), "not a frugalrt artifact"),
    (("validate", "results", "--rtol", "abc"), "invalid float value"),
    (("profile", "results", "--runs", "x"), "invalid int value"),
    (("profile", "results", "--runs", "0"), "not an integer >= 1"),
    (("validate", "results", "--rtol", "-1"), "not a finite number >= 0"),
    (("validate", "results", "--atol", "nan"), "not a finite number >= 0"),
    (("device", "start", "host", "--port", "99999"), "not a port number"),
    (("device", "stop", "no-such-device"), "no running device named no-such-device"),
    (("compress", "models.py:build", "--layers", "0", "--out", "c.txt"), "unknown format '.txt'"),
    (("compress", "models.py:build", "--layers", "7", "--out", "c.onnx"), "7"),
    (("memory", "results"), "not a frugalrt artifact"),
]


@pytest.mark.parametrize("argv,match", FAST, ids=[" ".join(a[:3]) or "no-args" for a, _ in FAST])
def test_bad_command_lines_fail_in_one_line(run_cli, argv, match, monkeypatch, tmp_path):
    monkeypatch.setenv("FRUGALRT_STATE_DIR", str(tmp_path / "state"))
    line = run_cli(*argv)
    assert re.search(match, line), line


def test_a_pickled_archive_runs_no_code(run_cli, base):
    """A .pt2 whose pickled example inputs would run code when unpickled is refused unrun."""
    import io
    import zipfile

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))

    model = torch.nn.Linear(4, 2)
    program = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, "good.pt2")
    evil = io.BytesIO()
    torch.save(((Payload(),), {}), evil)
    with zipfile.ZipFile("good.pt2") as src, zipfile.ZipFile("evil.pt2", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, evil.getvalue() if "sample_inputs" in name else src.read(name))
    Path("good.pt2").unlink()
    line = run_cli("export", "evil.pt2", "--out", "e.onnx")
    assert "weights-only" in line and not Path("PWNED").exists()


# --- models and artifacts through TVM (compile tier) ----------------------------------------------
MODELS = [
    (("compile", "missing.onnx"), "missing.onnx"),
    (("compile", "garbage.onnx"), "garbage.onnx"),
    (("compile", "truncated.onnx"), "truncated.onnx"),
    (("compile", "scale3.onnx"), r"node_binary_gemm.*scale.*3.*4"),
    (("compile", "bias5.onnx"), r"node_binary_gemm.*input B has 5 values, expected 4"),
    (("compile", "twiddles35.onnx"), r"node_butterfly.*twiddles.*\(?3, ?5, ?2, ?2"),
    (("compile", "packed_rows.onnx"), r"node_binary_gemm.*W_packed"),
    (("compile", "in_features.onnx"), r"node_binary_gemm.*width 8, expected 9 \(attribute in_features\)"),
    (("compile", "out_features.onnx"), r"node_butterfly.*out_features.*16"),
    (("compile", "nan_twiddles.onnx"), r"twiddles.*(nan|NaN|finite)"),
    (("compile", "unknown_version.onnx"), r"Butterfly.*99|99.*Butterfly|version 99"),
    (("compile", "unknown_op.onnx"), "Butterfy"),
    (("compile", "small.onnx", "--out", "."), "not '.'"),
    (("compile", "small.onnx", "--out", "WORKDIR"), "working directory"),
    (("compile", "small.onnx", "--out", ".."), "not '.'"),
    (("compile", "small.onnx", "--out", "notes.txt"), "is a file"),
    (("compile", "small.onnx", "--out", "results"), "not a frugalrt artifact"),
    (("compile", "int64_input.onnx", "--target", "cortex-m4"), r"input.*int64"),
    (("compile", "fixed_batch.onnx", "--target", "cortex-m4"), r"batch.*3|3.*batch"),
]


@pytest.mark.compile
@pytest.mark.parametrize("argv,match", MODELS, ids=[a[1] + ("-" + a[3] if len(a) > 3 else "") for a, _ in MODELS])
def test_bad_models_and_outputs_fail_in_one_line(run_cli, argv, match):
    argv = [str(Path.cwd()) if a == "WORKDIR" else a for a in argv]
    if "--target" not in argv:
        argv += ["--target", "host"]
    if "--out" not in argv:
        argv += ["--out", "art"]
    line = run_cli(*argv)
    assert re.search(match, line), line


@pytest.fixture(scope="module")
def artifact(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "host"
    frugalrt.compile(base / "small.onnx", "host", out)
    return out


def _break_artifact(art: Path, how: str) -> None:
    if how == "truncated-lib":
        data = (art / "lib.so").read_bytes()
        (art / "lib.so").write_bytes(data[: len(data) // 3])
    elif how == "missing-lib":
        (art / "lib.so").unlink()
    elif how == "edited-golden":
        with np.load(art / "golden.npz") as z:
            arrays = {k: z[k] + 1 for k in z.files}
        np.savez(art / "golden.npz", **arrays)
    elif how == "bad-manifest":
        (art / "manifest.json").write_text("{ not json")
    elif how == "foreign-cpu":
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["cpu_features"] = sorted(set(manifest.get("cpu_features", [])) | {"avx512fp16", "amx-tile"})
        (art / "manifest.json").write_text(json.dumps(manifest))


ARTIFACTS = [
    ("truncated-lib", "lib.so"),
    ("missing-lib", "lib.so"),
    ("edited-golden", "golden.npz"),
    ("bad-manifest", "manifest.json"),
    ("foreign-cpu", "x86-64-v"),
]


@pytest.mark.compile
@pytest.mark.parametrize("how,match", ARTIFACTS)
@pytest.mark.parametrize("command", ["validate", "profile"])
def test_corrupt_artifacts_fail_in_one_line(run_cli, artifact, how, match, command):
    shutil.copytree(artifact, "art")
    _break_artifact(Path("art"), how)
    line = run_cli(command, "art", *(["--runs", "3"] if command == "profile" else []))
    assert match in line, line


@pytest.mark.compile
@pytest.mark.parametrize("device,match", [
    ("rpc://127.0.0.1:9?timeout=abc", "timeout must be a positive number"),
    ("rpc://127.0.0.1:9?speed=max", "unknown option 'speed'"),
    ("rpc://127.0.0.1", "expected rpc://HOST:PORT"),
    ("bogus://x", "unknown device 'bogus://x'"),
    ("qemu:no-such-board", "no-such-board"),
])
def test_bad_devices_fail_in_one_line(run_cli, artifact, device, match):
    shutil.copytree(artifact, "art")
    line = run_cli("validate", "art", "--device", device)
    assert match in line, line


@pytest.mark.compile
def test_a_truncated_library_is_an_error_not_a_bus_error(artifact, tmp_path):
    """Before the checksums, loading a truncated lib.so killed the interpreter (SIGBUS, exit 135)."""
    art = tmp_path / "art"
    shutil.copytree(artifact, art)
    _break_artifact(art, "truncated-lib")
    run = subprocess.run([sys.executable, "-m", "frugalrt.cli", "validate", str(art)], capture_output=True,
                         text=True, timeout=TIME_LIMIT_S)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "lib.so" in run.stderr, run


def test_onnx_runtime_raises_on_a_malformed_node_instead_of_aborting(base):
    """The ONNX Runtime path used to abort the whole process (pybind11 error_already_set)."""
    code = ("import sys, numpy as np, onnx\n"
            "from frugalrt.errors import FrugalError\n"
            "from frugalrt.runtime import ort\n"
            f"model = onnx.load({str(base / 'scale3.onnx')!r})\n"
            "try:\n"
            "    ort.run(ort.make_session(model), [np.ones((2, 8), np.float32)])\n"
            "except FrugalError as e:\n"
            "    print('raised:', e); sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert run.returncode == 3 and "scale" in run.stdout, run


@pytest.mark.compile
def test_an_interrupted_compile_leaves_nothing_behind(base, tmp_path):
    """SIGTERM (as from a killed CI job) and Ctrl-C in the middle of a compile: no temporary survives."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        work = tmp_path / sig.name
        work.mkdir()
        shutil.copy(base / "small.onnx", work)
        proc = subprocess.Popen([sys.executable, "-m", "frugalrt.cli", "compile", "small.onnx", "--target", "host",
                                 "--out", "art"], cwd=work, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIME_LIMIT_S
        while not any(p.name.startswith(".art.") for p in work.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the compile never created its temporary directory"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=TIME_LIMIT_S)
        assert proc.returncode == 130 and "interrupted" in err, err
        assert sorted(p.name for p in work.iterdir()) == ["small.onnx"]
