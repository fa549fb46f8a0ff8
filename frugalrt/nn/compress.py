"""Compress a trained model: replace chosen ``nn.Linear`` layers by butterfly approximations.

Each named layer's ``[out, in]`` weight is factorized (:func:`frugalrt.nn.factorize`, hierarchical
method) into a :class:`ButterflyLinear` of the same shape and bias; the relative Frobenius error of
every replacement is reported (a trained dense layer is rarely close to a butterfly: expect large
errors and let fine-tuning recover the accuracy). Optional fine-tuning trains the *whole* compressed
model with cross-entropy (Adam) on labelled data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from frugalrt._atomic import check_output
from frugalrt.errors import FrugalError
from frugalrt.nn.factorize import factorize

Data = tuple[Tensor, Tensor]


class CompressError(FrugalError):
    """A layer to compress is missing or is not an ``nn.Linear``."""


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    n: int
    relative_error: float
    dense_params: int
    butterfly_params: int
    seconds: float


@dataclass
class CompressionReport:
    """Per-layer errors and accuracies (``None`` where no labelled data was given)."""

    layers: list[LayerReport] = field(default_factory=list)
    accuracy_before: Optional[float] = None
    accuracy_compressed: Optional[float] = None
    accuracy_finetuned: Optional[float] = None

    def table(self) -> str:
        rows = [f"{'LAYER':<16}{'SHAPE':<12}{'N':>6}{'REL. ERROR':>12}{'PARAMS':>18}"]
        for r in self.layers:
            rows.append(f"{r.name:<16}{f'{r.out_features}x{r.in_features}':<12}{r.n:>6}{r.relative_error:>12.4f}"
                        f"{f'{r.dense_params} -> {r.butterfly_params}':>18}")
        accs = [("before", self.accuracy_before), ("compressed", self.accuracy_compressed),
                ("fine-tuned", self.accuracy_finetuned)]
        shown = [f"{k} {v:.2%}" for k, v in accs if v is not None]
        if shown:
            rows.append("accuracy: " + ", ".join(shown))
        return "\n".join(rows)


def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data[0]).argmax(dim=-1) == data[1]).float().mean())


def finetune(model: nn.Module, data: Data, epochs: int, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Cross-entropy fine-tuning of every parameter with Adam, seeded mini-batch order."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = data
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if not isinstance(layer, nn.Linear):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise CompressError(f"layer {name!r} of {type(model).__name__} is missing or not an nn.Linear "
                            f"(its nn.Linear layers: {', '.join(linears) or 'none'})")
    return layer


def compress(model: nn.Module, layers: Sequence[str], *, finetune_data: Optional[Data] = None, epochs: int = 0,
             eval_data: Optional[Data] = None, lr: float = 1e-3,
             progress: Callable[[str], None] = lambda line: None) -> tuple[nn.Module, CompressionReport]:
    """A copy of ``model`` whose named ``nn.Linear`` layers are butterflies, and its report.

    Accuracies are measured on ``eval_data`` (else on ``finetune_data``) when given; fine-tuning
    runs for ``epochs`` on ``finetune_data``.
    """
    if epochs and finetune_data is None:
        raise CompressError(f"fine-tuning for {epochs} epochs needs labelled data (finetune_data)")
    model = copy.deepcopy(model).eval()
    scored = eval_data if eval_data is not None else finetune_data
    report = CompressionReport(accuracy_before=accuracy(model, scored) if scored is not None else None)
    for name in layers:
        dense = _linear(model, name)
        result = factorize(dense)
        butterfly = result.to_linear()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, butterfly)
        report.layers.append(LayerReport(name, dense.out_features, dense.in_features, result.n, result.relative_error,
                                         dense.weight.numel(), butterfly.twiddles.numel(), result.seconds))
        progress(f"{name}: {dense.out_features}x{dense.in_features} -> butterfly N={result.n}, "
                 f"relative error {result.relative_error:.4f}")
    if scored is not None:
        report.accuracy_compressed = accuracy(model, scored)
    if epochs:
        progress(f"fine-tuning {epochs} epochs on {len(finetune_data[1])} examples")
        finetune(model, finetune_data, epochs, lr)
        report.accuracy_finetuned = accuracy(model, scored)
    return model, report


def _labelled(module: Optional[ModuleType], name: str, spec: str) -> Optional[Data]:
    """The ``finetune_data`` / ``eval_data`` hook of the SOURCE file's module, called."""
    fn = getattr(module, name, None)
    if fn is None:
        return None
    data = fn()
    if not (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)):
        raise CompressError(f"{spec}: {name}() must return (x, y) tensors, got {type(data).__name__}")
    return data


def _output_format(out: str) -> str:
    suffix = Path(out).suffix
    if suffix not in (".onnx", ".pt2"):
        raise CompressError(f"--out {out}: unknown format {suffix!r}; use a .onnx or .pt2 path")
    return suffix


def save_compressed(model: nn.Module, inputs: tuple[Tensor, ...], out: str, protect: Sequence[str] = ()) -> None:
    """Write ``model`` as ONNX (``frugalrt.export``) or as a ``torch.export`` ``.pt2`` archive, atomically,
    never over a file in ``protect`` (the source)."""
    import frugalrt
    from frugalrt._atomic import atomic_path

    if _output_format(out) == ".onnx":
        frugalrt.export(model, inputs, out, protect=protect)
        return
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
    with atomic_path(out, inputs=protect, suffixes=(".pt2",)) as tmp:
        torch.export.save(program, str(tmp))


def compress_source(spec: str, layers: Sequence[str], out: str, epochs: int = 0, lr: float = 1e-3,
                    progress: Callable[[str], None] = lambda line: None) -> CompressionReport:
    """``frugalrt compress``: load ``file.py:factory``, compress ``layers``, fine-tune, write ``out``.

    Labelled data comes from optional functions of the SOURCE file: ``finetune_data()`` -> (x, y)
    for fine-tuning (and accuracy), ``eval_data()`` -> (x, y) for the reported accuracies.
    """
    from frugalrt.export.source import load_module, load_source

    source = spec.partition(":")[0] if not Path(spec).exists() else spec
    _output_format(out)  # fail before any training
    check_output(out, inputs=[source], suffixes=(_output_format(out),))
    progress(f"loading {spec}")
    loaded = load_module(spec) if Path(spec.partition(":")[0]).suffix == ".py" else None  # the file runs once
    model, inputs = load_source(spec, loaded)
    module = loaded[0] if loaded else None
    train, test = _labelled(module, "finetune_data", spec), _labelled(module, "eval_data", spec)
    if epochs and train is None:
        raise CompressError(f"{spec}: --finetune {epochs} needs labelled data; define finetune_data() "
                            f"returning (x, y) tensors in {spec.partition(':')[0]}")
    model, report = compress(model, layers, finetune_data=train, epochs=epochs, eval_data=test, lr=lr,
                             progress=progress)
    progress(f"writing {out}")
    save_compressed(model, inputs, out, protect=[source])
    return report
