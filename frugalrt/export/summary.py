"""What an exported model costs: ops, parameters, file bytes vs the dense-equivalent model.

The dense equivalent counts every structured layer as the float32 ``out x in`` matrix it replaces
(biases are the same on both sides) and every other byte of the file as is. The exporter records
the structured layers (from the torch model) under ``frugalrt.layers``, so a summary needs only
the file, custom or portable.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from frugalrt.export.metadata import LAYERS_KEY, get_metadata, op_inventory


@dataclass
class StructuredLayer:
    name: str  # module path in the torch model
    op: str  # layer class
    in_features: int
    out_features: int
    stored_bytes: int  # packed weights + scales, or twiddles (bias excluded: both sides have it)
    float32_bytes: int  # the dense float32 weight it replaces (bias excluded)
    stored_parameters: int

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.float32_bytes

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Summary:
    ops: dict[str, int]
    parameters: int  # stored scalars (a packed byte counts as one)
    dense_parameters: int
    file_bytes: int
    dense_bytes: int
    layers: list[StructuredLayer] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.dense_bytes

    def format(self) -> str:
        lines = ["op                                   count"]
        lines += [f"  {name:<34} {count:>5}" for name, count in self.ops.items()]
        lines.append(f"parameters (stored / dense)          {self.parameters} / {self.dense_parameters}")
        lines.append(f"file bytes / dense-equivalent bytes  {self.file_bytes} / {self.dense_bytes}"
                     f"  (ratio {self.ratio:.4f}, 1/{1 / self.ratio:.1f})")
        if self.layers:
            lines.append("structured layer                     in x out     stored B   float32 B   ratio")
            for l in self.layers:
                lines.append(f"  {l.op + ' ' + l.name:<34} {l.in_features:>4}x{l.out_features:<5} "
                             f"{l.stored_bytes:>10} {l.float32_bytes:>11}   1/{1 / l.ratio:.1f}")
        return "\n".join(lines)


def structured_layers(model) -> list[StructuredLayer]:
    """The structured layers of a (frozen) torch model, for ``frugalrt.layers`` metadata."""
    from frugalrt.nn import ButterflyLinear
    from frugalrt.nn.binary import BinaryConv2d, BinaryLinear

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, ButterflyLinear):
            n_in, n_out, stored = m.in_features, m.out_features, m.twiddles.numel()
            nbytes = 4 * stored
        elif isinstance(m, (BinaryLinear, BinaryConv2d)):
            n_in = m.in_features if isinstance(m, BinaryLinear) else m.in_channels * math.prod(m.kernel_size)
            n_out, nbytes = (m.out_features if isinstance(m, BinaryLinear) else m.out_channels), m.binary_weight_bytes()
            stored = nbytes - 3 * n_out  # a packed byte and a float32 scale count as one parameter each
        else:
            continue
        layers.append(StructuredLayer(name, type(m).__name__, n_in, n_out, nbytes, 4 * n_in * n_out, stored))
    return layers


def summarize(model_or_path, file_bytes: int | None = None) -> Summary:
    """Summary of an exported model (``file_bytes`` defaults to the file's or the proto's size)."""
    if isinstance(model_or_path, onnx.ModelProto):
        model = model_or_path
        file_bytes = file_bytes or model.ByteSize()
    else:
        model = onnx.load(os.fspath(model_or_path))
        file_bytes = file_bytes or os.path.getsize(model_or_path)
    layers = [StructuredLayer(**l) for l in json.loads(get_metadata(model).get(LAYERS_KEY, "[]"))]
    parameters = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    dense_parameters = parameters + sum(l.in_features * l.out_features - l.stored_parameters for l in layers)
    dense_bytes = file_bytes + sum(l.float32_bytes - l.stored_bytes for l in layers)
    return Summary(op_inventory(model), parameters, dense_parameters, file_bytes, dense_bytes, layers)
