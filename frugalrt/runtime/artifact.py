"""A compiled artifact: a directory with ``manifest.json``, ``model.onnx``, ``golden.npz`` and a library.

``manifest.json``: target, artifact kind, tvm_target (the TVM target dict compiled for, ``host``
with its detected ``mcpu``), llvm_target (``triple``, ``mcpu``, ``mattr``; None for the C and CUDA
targets), cpu_features (sorted LLVM names: on x86 the ISA extensions mcpu + mattr enable, i.e.
that the code may use, checked against the CPU before a local load; elsewhere the mattr features),
model_sha256, frugalrt/tvm versions, inputs/outputs (name, shape with ``"batch"`` for the dynamic
dimension, dtype), param_bytes, files (role -> relative path: ``lib`` = ``lib.so`` / ``kernels.cu``
/ the C bundle directory) and sha256 (relative path -> digest of every file but the manifest,
``bundle/`` contents included), which :meth:`Artifact.verify` checks before anything is loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from frugalrt.errors import ArtifactError

MANIFEST, MODEL, GOLDEN = "manifest.json", "model.onnx", "golden.npz"
_RECOMPILE = "recompile it with `frugalrt compile MODEL.onnx --target T --out DIR`"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(root: str | os.PathLike) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under ``root`` (recursively) but its manifest."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    return {p.relative_to(root).as_posix(): _sha256(p) for p in files}


class Artifact:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise ArtifactError(f"{self.path} is not a frugalrt artifact (no {MANIFEST}); "
                                "create one with `frugalrt compile MODEL.onnx --target T --out DIR`")

    @cached_property
    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{self.path / MANIFEST}: unreadable manifest ({e}); recompile the artifact") from e

    def verify(self) -> None:
        """Check every file against the manifest's sha256 (once per Artifact): a missing or altered file,
        or a manifest without checksums (an older frugalrt), raises ArtifactError naming it."""
        if getattr(self, "_verified", False):
            return
        sums = self.manifest.get("sha256") if isinstance(self.manifest, dict) else None
        if not isinstance(sums, dict) or not sums:
            raise ArtifactError(f"{self.path / MANIFEST}: no file checksums (written by an older frugalrt); "
                                f"{_RECOMPILE}")
        for rel, want in sorted(sums.items()):
            path = self.path / rel
            if not path.is_file():
                raise ArtifactError(f"{path}: missing (artifact incomplete); {_RECOMPILE}")
            try:
                got = _sha256(path)
            except OSError as e:
                raise ArtifactError(f"{path}: unreadable ({e.strerror or e}); {_RECOMPILE}") from None
            if got != want:
                raise ArtifactError(f"{path}: sha256 mismatch (artifact corrupted or modified); {_RECOMPILE}")
        self._verified = True

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def kind(self) -> str:
        return self.manifest["artifact"]

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL

    @property
    def lib_path(self) -> Path:
        return self.path / self.manifest["files"]["lib"]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["inputs"]

    @property
    def outputs(self) -> list[dict[str, Any]]:
        return self.manifest["outputs"]

    def golden(self) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        """(inputs, outputs) recorded by PyTorch at export, or None if the model had none."""
        path = self.path / GOLDEN
        if not path.is_file():
            return None
        from frugalrt.export.metadata import load_golden_npz

        try:
            return load_golden_npz(path)
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"{path}: corrupt golden vectors ({e}); recompile the artifact") from e

    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (frugalrt.version, frugalrt.certificate.*, ...)."""
        from frugalrt.export.metadata import get_metadata

        return get_metadata(self.onnx_path)

    def check_inputs(self, inputs: tuple[np.ndarray, ...] | list[np.ndarray]) -> None:
        """Raise ArtifactError naming the input when the count, rank, a static dim or dtype differ."""
        if len(inputs) != len(self.inputs):
            raise ArtifactError(f"{self.path}: the model takes {len(self.inputs)} input(s) "
                                f"({', '.join(i['name'] for i in self.inputs)}), got {len(inputs)}")
        for spec, array in zip(self.inputs, inputs):
            shape, dtype = spec["shape"], np.dtype(spec["dtype"])
            if array.dtype != dtype:
                raise ArtifactError(f"input {spec['name']!r}: dtype {array.dtype}, expected {dtype} "
                                    f"(convert with .astype(np.{dtype}))")
            if array.ndim != len(shape) or any(isinstance(d, int) and d != a for d, a in zip(shape, array.shape)):
                raise ArtifactError(f"input {spec['name']!r}: shape {list(array.shape)}, expected {shape}")
