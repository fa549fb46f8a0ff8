"""A compiled artifact: a directory with ``manifest.json``, ``model.onnx``, ``golden.npz`` and a library.

``manifest.json``: target, artifact kind, model_sha256, frugalrt/tvm versions, inputs/outputs
(name, shape with ``"batch"`` for the dynamic dimension, dtype), param_bytes and files
(role -> relative path: ``lib`` = ``lib.so`` / ``kernels.cu`` / the C bundle directory).
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from frugalrt.errors import ArtifactError

MANIFEST, MODEL, GOLDEN = "manifest.json", "model.onnx", "golden.npz"


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
