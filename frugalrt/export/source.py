"""Load the SOURCE of ``frugalrt export``: ``file.py:factory`` or a ``torch.export`` ``.pt2`` archive.

A factory is a function without arguments returning ``(model, example_inputs)``; it may train.
A ``.pt2`` archive must hold a program exported from an already frozen model
(``frugalrt.nn.freeze(model)`` before ``torch.export``), or its binary layers are traced into
float ops, and it must carry its example inputs (``torch.export.export`` stores them).

Trust: a ``file.py`` SOURCE is Python code and runs as such. A ``.pt2`` archive is data and is
loaded weights-only: torch's loader falls back to full unpickling (which can run arbitrary code)
for some payloads, so every ``torch.load`` it makes is forced to ``weights_only=True`` and archives
with pickled custom or opaque objects are refused before loading.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import uuid
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

from frugalrt.errors import ExportError

DEFAULT_FACTORY = "build"


def load_source(spec: str, loaded: Optional[tuple[ModuleType, str]] = None
                ) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """``(model, example_inputs)`` from ``path.py[:factory]`` (factory defaults to ``build``) or ``path.pt2``.

    ``loaded``: ``load_module(spec)``'s result when the caller needs the module too, so the file runs once.
    """
    path, _ = _locate(spec)
    if path.suffix == ".py":
        return _from_factory(path, *(loaded or load_module(spec)))
    if path.suffix == ".pt2":
        return _from_archive(path)
    raise ExportError(f"{path}: unknown SOURCE kind {path.suffix!r}; expected file.py:factory or a .pt2 archive")


def load_module(spec: str) -> tuple[ModuleType, str]:
    """The module of a ``file.py[:factory]`` SOURCE, executed once, and the factory's name.

    Other functions of the file (``frugalrt compress`` reads ``finetune_data``) come from this module.
    """
    path, factory = _locate(spec)
    factory = factory or DEFAULT_FACTORY
    if path.suffix != ".py":
        raise ExportError(f"{path}: not a Python file; expected file.py:factory")
    module_spec = importlib.util.spec_from_file_location(f"_frugalrt_source_{uuid.uuid4().hex}", path)
    module = importlib.util.module_from_spec(module_spec)
    with _importable(path, factory):
        module_spec.loader.exec_module(module)
    return module, factory


def _locate(spec: str) -> tuple[Path, str]:
    path, _, factory = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file (SOURCE is file.py:factory or a torch.export .pt2 archive)")
    return path, factory


@contextlib.contextmanager
def _importable(path: Path, factory: str) -> Iterator[None]:
    """Run SOURCE code with its folder on ``sys.path`` (it may import its siblings); its errors become
    one ExportError."""
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        yield
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{path}:{factory} failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent.resolve()))


def _from_factory(path: Path, module: ModuleType, factory: str):
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ExportError(f"{path}: no function {factory!r}; define `def {factory}():` returning "
                          f"(model, example_inputs)")
    with _importable(path, factory):
        result = fn()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise ExportError(f"{path}:{factory} must return (model, example_inputs), got {type(result).__name__}")
    model, inputs = result
    return model, (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only() -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` made meanwhile (torch.export's included)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with _LOAD_LOCK:
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def _refuse_pickled_objects(path: Path) -> None:
    """Refuse archives whose constants are pickled Python objects (unpickled without restriction)."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    try:
        with zipfile.ZipFile(path) as archive:
            names = [Path(n).name for n in archive.namelist()]
    except (OSError, zipfile.BadZipFile) as e:
        raise ExportError(f"{path}: not a readable torch.export archive (not a zip file: {e})") from None
    pickled = [n for n in names if n.startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX))]
    if pickled:
        raise ExportError(f"{path}: holds pickled Python objects ({', '.join(pickled[:3])}), which could run "
                          "code when loaded; refused (export from file.py:factory instead)")


def _from_archive(path: Path):
    import frugalrt.nn  # noqa: F401  (registers the frugalrt:: ops the archive may call)

    _refuse_pickled_objects(path)
    try:
        with _weights_only():
            program = torch.export.load(str(path))
    except Exception as e:
        raise ExportError(f"{path}: not a readable torch.export archive, or one holding pickled objects "
                          f"beyond tensors (loaded weights-only; {type(e).__name__}: "
                          f"{str(e).strip().split('. ')[0].splitlines()[0] if str(e).strip() else ''})") from e
    if program.example_inputs is None:
        raise ExportError(f"{path}: the archive stores no example inputs; save it from "
                          f"torch.export.export(model, example_inputs) or use file.py:factory")
    args, kwargs = program.example_inputs
    if kwargs:
        raise ExportError(f"{path}: keyword example inputs {sorted(kwargs)} are not supported; use positional inputs")
    return program.module(), tuple(args)
