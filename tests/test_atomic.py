"""Atomic, non-destructive outputs (frugalrt._atomic): what may be replaced and what never is."""
import json
import os

import pytest

from frugalrt._atomic import atomic_path, check_output
from frugalrt.errors import OutputError


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"model")
    return tmp_path


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("out,is_dir,match", [
    (".", True, "not '.'"), ("..", True, "not '.'"), ("/", True, "not '.'"), ("", False, "name a new file"),
    ("sub/..", True, "not '.'"),
])
def test_dot_names_are_refused(workdir, out, is_dir, match):
    with pytest.raises(OutputError, match=match):
        check_output(out, is_dir=is_dir, force=True)


def test_working_directory_and_folders_above_it_are_refused_even_with_force(workdir):
    for out in (workdir, workdir.parent, "/tmp" if workdir.is_relative_to("/tmp") else workdir.parent):
        with pytest.raises(OutputError, match="working directory"):
            check_output(out, is_dir=True, force=True)


def test_the_input_and_its_folders_are_refused_even_with_force(tmp_path):
    model = tmp_path / "models" / "m.onnx"
    model.parent.mkdir()
    model.write_bytes(b"m")
    with pytest.raises(OutputError, match="is the input"):
        check_output(model, inputs=[model], force=True)
    with pytest.raises(OutputError, match="contains the input"):
        check_output(model.parent, is_dir=True, inputs=[model], force=True)
    assert model.read_bytes() == b"m"


def test_file_and_directory_mismatches_are_refused(workdir):
    (workdir / "notes.txt").write_text("mine")
    (workdir / "folder").mkdir()
    with pytest.raises(OutputError, match="is a file"):
        check_output("notes.txt", is_dir=True, force=True)
    with pytest.raises(OutputError, match="is a directory"):
        check_output("folder", force=True)


def test_a_foreign_directory_needs_force_an_empty_or_frugalrt_one_does_not(workdir):
    mine = workdir / "results"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="not a frugalrt artifact.*--force"):
        check_output(mine, is_dir=True)
    assert check_output(mine, is_dir=True, force=True) == mine.resolve()
    (workdir / "empty").mkdir()
    assert check_output("empty", is_dir=True) == (workdir / "empty").resolve()
    art = workdir / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"frugalrt_version": "0.1.0"}))
    assert check_output(art, is_dir=True) == art.resolve()
    (art / "manifest.json").write_text(json.dumps({"name": "someone else's"}))
    with pytest.raises(OutputError, match="not a frugalrt artifact"):
        check_output(art, is_dir=True)


def test_an_existing_file_is_replaced_only_when_it_has_the_output_suffix(workdir):
    (workdir / "README.md").write_text("docs")
    with pytest.raises(OutputError, match="not a .onnx file"):
        check_output("README.md", suffixes=(".onnx",))
    assert check_output("model.onnx", suffixes=(".onnx",)) == (workdir / "model.onnx").resolve()
    assert check_output("README.md", suffixes=(".onnx",), force=True)


def test_an_artifact_directory_is_replaced_whole(workdir):
    art = workdir / "art"
    art.mkdir()
    (art / "manifest.json").write_text(json.dumps({"frugalrt_version": "0.1.0"}))
    (art / "stale.so").write_bytes(b"old")
    with atomic_path(art, is_dir=True) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"frugalrt_version": "0.1.0", "new": 1}))
    assert sorted(p.name for p in art.iterdir()) == ["manifest.json"]
    assert json.loads((art / "manifest.json").read_text())["new"] == 1
    assert leftovers(workdir) == []


@pytest.mark.parametrize("error", [RuntimeError("build failed"), KeyboardInterrupt()])
def test_a_failure_or_interrupt_leaves_the_old_output_and_no_temporary(workdir, error):
    out = workdir / "out.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(type(error)), atomic_path(out, suffixes=(".onnx",)) as tmp:
        tmp.write_bytes(b"partial")
        raise error
    assert out.read_bytes() == b"previous"
    assert leftovers(workdir) == []
    with pytest.raises(type(error)), atomic_path(workdir / "new-art", is_dir=True) as tmp:
        (tmp / "lib.so").write_bytes(b"partial")
        raise error
    assert not (workdir / "new-art").exists() and leftovers(workdir) == []


def test_a_refused_output_creates_nothing(workdir):
    before = sorted(os.listdir(workdir))
    with pytest.raises(OutputError):
        with atomic_path(".", is_dir=True):
            pass
    assert sorted(os.listdir(workdir)) == before
