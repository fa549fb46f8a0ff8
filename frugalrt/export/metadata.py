"""frugalrt metadata in exported ONNX files: version, source class, op inventory, golden vectors.

Keys (``metadata_props``): ``frugalrt.version``, ``frugalrt.source_class``, ``frugalrt.ops`` (JSON
``{"ai.frugalrt::Butterfly": 1, "Relu": 2}``), ``frugalrt.golden`` (base64 ``.npz`` with
``input_0..`` and ``output_0..``: example inputs and PyTorch's outputs at export) and any
``frugalrt.certificate.*`` keys from the caller; ``frugalrt.layers`` lists the structured layers
for the size summary. Golden vectors travel inside the model so every
later stage (compile, validate, devices) can check itself against PyTorch without PyTorch.
"""
from __future__ import annotations

import base64
import io
import os
from collections import Counter
from typing import Sequence, Union

import numpy as np
import onnx

VERSION_KEY, SOURCE_KEY, OPS_KEY, GOLDEN_KEY = ("frugalrt.version", "frugalrt.source_class",
                                                "frugalrt.ops", "frugalrt.golden")
LAYERS_KEY = "frugalrt.layers"  # JSON list of the structured layers (frugalrt.export.summary)
ModelOrPath = Union[onnx.ModelProto, str, os.PathLike]


def _load(model_or_path: ModelOrPath) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return onnx.load(os.fspath(model_or_path), load_external_data=False)


def op_name(node: onnx.NodeProto) -> str:
    """``Relu`` for standard ops, ``ai.frugalrt::Butterfly`` for any other domain."""
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def op_inventory(model: onnx.ModelProto) -> dict[str, int]:
    """Count of nodes per op name in the main graph, sorted by name."""
    return dict(sorted(Counter(op_name(n) for n in model.graph.node).items()))


def get_metadata(model_or_path: ModelOrPath) -> dict[str, str]:
    return {p.key: p.value for p in _load(model_or_path).metadata_props}


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set (or replace) ``metadata_props`` entries; values must be strings."""
    current = get_metadata(model)
    for key, value in values.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: keys and values must be str (JSON-encode other values)")
        current[key] = value
    del model.metadata_props[:]
    for key, value in current.items():
        model.metadata_props.add(key=key, value=value)


def save_golden_npz(file, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
    """The one golden-vector format (in model metadata and artifacts): ``input_i``/``output_i`` arrays."""
    arrays = {f"input_{i}": np.asarray(a) for i, a in enumerate(inputs)}
    arrays.update({f"output_{i}": np.asarray(a) for i, a in enumerate(outputs)})
    np.savez(file, **arrays)


def load_golden_npz(file) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inverse of :func:`save_golden_npz`."""
    with np.load(file, allow_pickle=False) as npz:
        def series(prefix):
            return [npz[f"{prefix}_{i}"] for i in range(sum(k.startswith(prefix + "_") for k in npz.files))]

        return series("input"), series("output")


def write_golden(model: onnx.ModelProto, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
    """Store ``inputs``/``outputs`` as the base64 ``.npz`` under ``frugalrt.golden``."""
    buf = io.BytesIO()
    save_golden_npz(buf, inputs, outputs)
    set_metadata(model, {GOLDEN_KEY: base64.b64encode(buf.getvalue()).decode("ascii")})


def read_golden(model_or_path: ModelOrPath) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """(inputs, outputs) recorded at export, or None if the model carries no golden vectors."""
    blob = get_metadata(model_or_path).get(GOLDEN_KEY)
    return None if blob is None else load_golden_npz(io.BytesIO(base64.b64decode(blob)))

