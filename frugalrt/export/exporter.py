"""``frugalrt.export``: a PyTorch model with frugal layers -> a checked, self-describing ONNX file.

Steps: copy and freeze the model (binary layers -> packed sign bits), record PyTorch's outputs
on the example inputs (golden vectors), export with the dynamo exporter and our translation table
(dynamic batch ``batch``), fold constants without ever unpacking binary weights, fold BatchNorms
into the layer before them (``fold_bn``, :mod:`frugalrt.export.fold`), attach metadata,
run ``onnx.checker`` (full check), then write the file atomically.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
import warnings
from typing import Sequence, Union

import numpy as np
import onnx
import torch
from onnxscript import ir, optimizer

import frugalrt
from frugalrt._atomic import atomic_path, check_output
from frugalrt.errors import ExportError
from frugalrt.export import fold
from frugalrt.export import metadata as md
from frugalrt.export import spec_check
from frugalrt.export.summary import structured_layers
from frugalrt.export.translations import translation_table
from frugalrt.nn import freeze

ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor]]
BATCH = "batch"


def export(model: torch.nn.Module, example_inputs: ExampleInputs, path: Union[str, os.PathLike],
           portable: bool = False, metadata: dict[str, str] | None = None, force: bool = False,
           protect: Sequence[Union[str, os.PathLike]] = (), fold_bn: bool = True,
           pack_activations: bool = True) -> onnx.ModelProto:
    """Export ``model`` to ``path`` (``ai.frugalrt`` custom ops, or standard ops if ``portable``).

    ``fold_bn``: fold each BatchNormalization (and constant per-channel Mul/Add/Sub) into the
    layer before it (:func:`frugalrt.export.fold.fold_affine`), so every consumer runs one op less.
    ``pack_activations`` (custom ops only): a binary layer whose output only feeds binary layers,
    through folded affine ops and sign-preserving clips, passes them its packed sign bits instead of
    float32 (docs/ops.md, "Packed activations"; bit-identical). Compiling for a target whose kernels
    want float activations undoes it.

    Returns the saved ``onnx.ModelProto``. Raises :class:`ExportError` naming the cause; on
    error no file is written. A model may carry its own entries (e.g. PAC-Bayes certificates) in a
    ``frugalrt_metadata`` dict attribute; ``metadata`` overrides them. ``path`` never replaces a
    directory, a file in ``protect`` (the model's source) or, unless ``force``, a non-``.onnx`` file.
    """
    out = dict(inputs=protect, force=force, suffixes=(".onnx",))  # never replace a source or a non-ONNX file
    check_output(path, **out)
    metadata = {**getattr(model, "frugalrt_metadata", {}), **(metadata or {})}
    name = type(model).__name__
    inputs = _check_inputs(model, example_inputs)
    _check_finite_weights(model, name)
    model = frozen_copy(model)
    outputs = _golden_outputs(model, inputs, name)
    proto = to_onnx(model, inputs, portable=portable, name=name)
    if fold_bn:
        fold.fold_affine(proto)
    if pack_activations and not portable:
        fold.remove_identity_reshapes(proto)  # e.g. the flatten a BinaryLinear's input gets
        fold.drop_clips_before_binary(proto)
        fold.pack_between_binary(proto)
    spec_check.check_model(proto, error=ExportError)  # every ai.frugalrt node against docs/ops.md
    md.set_metadata(proto, {md.VERSION_KEY: frugalrt.__version__,
                            md.SOURCE_KEY: f"{type(model).__module__}.{type(model).__qualname__}",
                            md.OPS_KEY: json.dumps(md.op_inventory(proto)),
                            md.LAYERS_KEY: json.dumps([l.to_json() for l in structured_layers(model)])})
    md.write_golden(proto, [t.numpy() for t in inputs], outputs)
    try:
        md.set_metadata(proto, metadata)
    except TypeError as e:
        raise ExportError(f"export metadata: {e}") from None
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"exported {name} fails onnx.checker: {_first_line(e)}") from e
    with atomic_path(path, **out) as tmp:
        onnx.save(proto, tmp)
    return proto


def to_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], portable: bool = False,
            name: str = "model") -> onnx.ModelProto:
    """Dynamo export of a frozen, eval-mode ``model``, then constant folding and cleanup."""
    trace_inputs = tuple(_at_least_two_rows(t) for t in inputs)  # batch 1 would be specialized
    batch = torch.export.Dim(BATCH)
    with _quiet():
        try:  # torch.export itself, not the ONNX exporter's fallbacks (JIT tracing may bake in constants)
            program = torch.export.export(model, trace_inputs, dynamic_shapes=tuple({0: batch} for _ in inputs),
                                          strict=False)
        except Exception as e:
            hint = (" (the model fixes the batch size; frugalrt exports a dynamic batch dimension 0: for a "
                    ".pt2 archive, torch.export it with dynamic_shapes={0: Dim('batch')} per input)"
                    if "Constraints violated" in str(e) else "")
            raise ExportError(f"cannot export {name}: torch.export fails: {_first_line(e)}{hint}") from e
        try:
            onnx_program = torch.onnx.export(program, trace_inputs, dynamo=True, optimize=False, verbose=False,
                                             custom_translation_table=translation_table(portable))
        except Exception as e:  # the exporter raises many types; all mean "this model cannot be exported"
            raise ExportError(f"cannot export {name} to ONNX: {_first_line(e)}") from e
    optimizer.optimize_ir(onnx_program.model, should_fold=_keep_packed_bits)
    proto = ir.serde.serialize_model(onnx_program.model)
    for node in proto.graph.node:  # exporter debug info: local stack traces, ~800 bytes a node
        del node.metadata_props[:]
    _name_batch_dim(proto)
    return proto


def _name_batch_dim(proto: onnx.ModelProto) -> None:
    """torch.export calls the batch symbol e.g. ``s77``; the file calls it ``batch`` everywhere."""
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    pattern = re.compile(rf"\b{re.escape(symbol)}\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(BATCH, dim.dim_param)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy with binary layers frozen, in eval mode (what gets exported)."""
    model = freeze(copy.deepcopy(model))
    try:
        model.eval()
    except NotImplementedError:  # modules unlifted from a torch.export archive are inference-only already
        pass
    return model


def _keep_packed_bits(node: ir.Node) -> bool | None:
    """Never fold a node that reads uint8: unpacking binary weights at export would store them as
    float32 (32x larger). Other nodes follow the optimizer's default rules."""
    if any(v is not None and v.dtype == ir.DataType.UINT8 for v in node.inputs):
        return False
    return None


def _check_inputs(model, example_inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got {type(model).__name__}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ExportError("export needs at least one example input tensor")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() < 1 or len(t) < 1:
            what = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ExportError(f"example input {i} must be a float32 tensor [batch, ...] with batch >= 1, got {what}")
    if len({len(t) for t in inputs}) != 1:
        raise ExportError(f"example inputs disagree on the batch size: {[tuple(t.shape) for t in inputs]}")
    return tuple(t.detach().cpu().contiguous() for t in inputs)


def _check_finite_weights(model: torch.nn.Module, name: str) -> None:
    """Refuse NaN or infinite parameters (and NaN buffers: an infinite buffer may be a mask),
    naming the first one, e.g. ``layers.0.twiddles``."""
    tensors = [(n, t, False) for n, t in model.named_parameters()] + [(n, t, True) for n, t in model.named_buffers()]
    for pname, tensor, allow_inf in tensors:
        if tensor is not None and (tensor.is_floating_point() or tensor.is_complex()):
            values = tensor.detach().cpu()
            bad = spec_check.nonfinite(values.numpy() if values.dtype in _NUMPY_DTYPES else values.double().numpy(),
                                       allow_inf=allow_inf)
            if bad:
                kind = "buffer" if allow_inf else "parameter"
                raise ExportError(f"cannot export {name}: {kind} '{pname}' {bad}, expected finite values")


_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def _golden_outputs(model, inputs, name: str) -> list[np.ndarray]:
    try:
        with torch.no_grad():
            outputs = model(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise ExportError(f"{name} fails on the example inputs of shape {shapes}: {_first_line(e)}") from e
    leaves = torch.utils._pytree.tree_leaves(outputs)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise ExportError(f"{name} must return a tensor or a tuple of tensors")
    return [t.detach().cpu().numpy() for t in leaves]


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' warnings, logs and prints: failures surface as one ExportError."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch.fx", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _at_least_two_rows(t: torch.Tensor) -> torch.Tensor:
    return t if len(t) >= 2 else t.repeat(2, *([1] * (t.dim() - 1)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
