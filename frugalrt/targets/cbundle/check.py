"""What a Cortex-M C bundle cannot run, refused when compiling (not when the firmware faults).

The bundle's API is ``model_run(const float *in, float *out)``, one sample per call: its inputs
and outputs are float32, laid out back to back, and the leading dimension of each is the batch,
specialized to 1 (a batch of N is N calls). So a model with a non-float32 input or output (the
firmware would read int64 words as floats and fault), or with a fixed batch above 1 (the firmware
would read the wrong number of floats per sample), is refused by :func:`check_bundle_model`
before anything is built. Whether the model fits a board's flash and RAM is checked once its
buffer plan exists (``build_bundle(..., board=...)``, ``memory.check_fits``).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import onnx

from frugalrt.errors import TargetError
from frugalrt.targets.cbundle.boards import BOARDS, DEFAULT_PLATFORM, PLATFORMS

__all__ = ["check_bundle_model", "check_board"]


def _dtype(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - an undefined or exotic element type
        try:
            return onnx.TensorProto.DataType.Name(elem_type).lower()
        except ValueError:
            return f"element type {elem_type}"


def _shape(value: onnx.ValueInfoProto) -> list:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _describe(value: onnx.ValueInfoProto) -> str:
    shape = "[" + ", ".join(map(str, _shape(value))) + "]"
    return f"{_dtype(value.type.tensor_type.elem_type)} {shape}"


def check_board(device, board: Optional[str]) -> None:
    """``board`` must be a Cortex-M board, and only for the Cortex-M (c-bundle) targets."""
    if not board:
        return
    cortex_m = [t for t, p in DEFAULT_PLATFORM.items() if PLATFORMS[p].bare_metal]
    if device.artifact != "c-bundle":
        raise TargetError(f"--board {board}: boards are for the Cortex-M targets ({', '.join(cortex_m)}); "
                          f"target {device.name} has none")
    if board not in BOARDS:
        raise TargetError(f"unknown board {board!r} for target {device.name}; boards: {', '.join(BOARDS)}")


def io_values(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.ValueInfoProto]]:
    """``("input" | "output", value info)`` of the graph's inputs (initializers excluded) and outputs."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in initializers:
            yield "input", value
    for value in model.graph.output:
        yield "output", value


def check_bundle_model(model: onnx.ModelProto, device, board: Optional[str] = None,
                       source: str | os.PathLike | None = None) -> None:
    """Refuse (TargetError, one line) a model that a C bundle for ``device`` could not run.

    A no-op for targets that are not C bundles (apart from refusing a ``board`` for them).
    ``source`` (the model's path) only names the model in the message.
    """
    check_board(device, board)
    if device.artifact != "c-bundle":
        return
    where = f"{os.fspath(source)}: " if source is not None else ""
    target = device.name
    for kind, value in io_values(model):
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            raise TargetError(
                f"{where}{kind} {value.name!r} is {_describe(value)}: {target} bundles take and return "
                f"float32 tensors only (model_run(const float *in, float *out)); cast it to float32 "
                f"inside the model, or compile for a target with the TVM runtime (host, rpi4)")
        shape = _shape(value)
        if kind == "input" and not shape:
            raise TargetError(f"{where}input {value.name!r} is {_describe(value)}, a scalar: {target} "
                              "bundles need a leading batch dimension (dynamic, or 1)")
        if kind == "input" and isinstance(shape[0], int) and shape[0] > 1:
            raise TargetError(
                f"{where}input {value.name!r} is {_describe(value)}, a fixed batch of {shape[0]}: {target} "
                f"bundles run one sample per model_run call and support batch 1 or a dynamic batch "
                f"(frugalrt export's default); export with batch 1 or a dynamic batch dimension")
