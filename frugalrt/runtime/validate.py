"""``frugalrt.validate``: run a compiled artifact and compare with PyTorch.

The reference is the golden vectors recorded by PyTorch at export (default), or a live torch
model (or any callable) run on ``inputs``.

Tolerance of float outputs. Both sides are float32 computations (PyTorch's golden vectors and the
artifact's kernels), each with its own summation order, so neither is exact: a dot product of
length K computed in float32 is off from the exact value by about eps32 * sqrt(K) times the size of
its terms (rounding errors of a sum add up like a random walk; the worst case, eps32 * K * sum|terms|,
is never approached in practice), and the sizes of the terms are measured by the output's scale
S = max |ref| over the output tensor. A fixed ``atol`` cannot be right for every model: a correct
512 -> 640 MatMul with outputs up to 81 differs from PyTorch by 4.6e-5 on small outputs, while
PyTorch's own float32 result is 2.1e-5 away from float64. Each value must therefore satisfy

    |y - ref| <= atol + rtol * |ref| + FLOAT_NOISE * eps * sqrt(K) * S

with ``atol`` 1e-5, ``rtol`` 1e-4 (both overridable: ``frugalrt validate --atol/--rtol``),
FLOAT_NOISE = 4, eps = float32's machine epsilon (1.19e-7; or the output dtype's when coarser) and
K the model's accumulation length: the sum, over the graph's reductions (MatMul, Gemm, Conv,
ConvTranspose, Butterfly, BinaryGemm, BinaryConv, pooling and ReduceSum/Mean), of each one's
reduction length (K of a MatMul, C/group * kh * kw of a Conv, 2 per Butterfly stage; 256 where a
shape is unknown). Summing over layers is conservative: the errors of successive layers add in
quadrature, and relative to the final output's scale each layer contributes ~eps * sqrt(K_layer).
Measured on float32 matmuls against float64 (K from 8 to 16384, signed and all-positive terms,
BLAS and naive summation), the error never exceeded 0.5 * eps * sqrt(K) * S: the bound has a
margin of 8x, and still fails a result off by 1e-3 relative on its larger values, or one missing
term of a sum (about S / sqrt(K)). A model whose outputs cancel (large terms, small results) can
need a larger ``atol``.

Values compare as IEEE values: a NaN in the reference matches only a NaN at the same position,
+inf only +inf, -inf only -inf; a NaN or inf where a finite value is expected fails and is counted
(the errors shown are over the finite values). Integer and bool outputs must match exactly.

Class predictions (argmax over the last axis) must agree. A model with binary ops must agree on
every argmax and have at least 90% of its values within tolerance (and no NaN/inf mismatch): one
activation rounding differently just before a sign can legitimately move values downstream while
the prediction stays the same, but values cannot be arbitrarily wrong.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from frugalrt.errors import ArtifactError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import open_device

RTOL, ATOL = 1e-4, 1e-5
FLOAT_NOISE = 4.0  # safety factor on eps * sqrt(K) * S (measured errors stay below 0.5)
EPS32 = float(np.finfo(np.float32).eps)
DEFAULT_ACCUMULATION = 256  # K of a reduction whose length the graph does not tell, and of compare()
BINARY_OPS = ("BinaryGemm", "BinaryConv")
BINARY_MIN_CLOSE = 0.9  # share of values within tolerance required in binary mode
CERTIFICATE_PREFIX = "frugalrt.certificate."


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs: float  # over the values finite on both sides
    max_rel: float
    within_tolerance: bool
    argmax_agreement: float | None  # fraction of rows whose argmax matches (None for 1-D outputs)
    passed: bool
    tolerance: float = 0.0  # allowed error of a value near 0: atol + the float noise floor (+ rtol |ref| each)
    outside: int = 0  # values outside tolerance (NaN/inf mismatches included)
    note: str = ""  # shape mismatch, NaN/inf mismatches, exact comparison


@dataclass
class ValidationReport:
    artifact: str
    device: str
    reference: str  # "golden" or "torch"
    mode: str  # "float" (every value within tolerance) or "binary" (argmax + BINARY_MIN_CLOSE of values)
    rtol: float
    atol: float
    outputs: list[OutputCheck]
    certificate: dict[str, Any] = field(default_factory=dict)
    accumulation: int = DEFAULT_ACCUMULATION  # K of the float noise floor

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_json(self) -> str:
        """The report as JSON: settings, the verdict and each output's errors, tolerance and result
        (non-finite errors, e.g. of a shape mismatch, as null)."""
        data = asdict(self)
        for output in data["outputs"]:
            output.update({k: v if math.isfinite(v) else None for k, v in output.items()
                           if isinstance(v, float)})
        return json.dumps({"passed": self.passed, **data}, indent=1)

    def table(self) -> str:
        """Human-readable results, one row per output."""
        lines = [f"artifact {self.artifact} on {self.device} vs {self.reference} "
                 f"({self.mode} mode: |err| <= atol + rtol |ref| + {FLOAT_NOISE:g} eps sqrt(K) max|ref|, "
                 f"atol={self.atol:g}, rtol={self.rtol:g}, K={self.accumulation}"
                 f", argmax must agree{f', {BINARY_MIN_CLOSE:.0%} of values within' if self.mode == 'binary' else ''})",
                 f"{'output':<16}{'shape':<14}{'max abs':>11}{'abs tol':>11}{'max rel':>11}{'argmax':>9}  result"]
        for o in self.outputs:
            argmax = "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.1%}"
            verdict = "ok" if o.passed else "FAIL"
            if o.outside:
                verdict += f" ({o.outside} of {math.prod(o.shape)} values outside tolerance)"
            if o.note:
                verdict += f"; {o.note}"
            lines.append(f"{o.name[:15]:<16}{str(list(o.shape)):<14}{o.max_abs:>11.3g}{o.tolerance:>11.3g}"
                         f"{o.max_rel:>11.3g}{argmax:>9}  {verdict}")
        for key, value in self.certificate.items():
            lines.append(_certificate_line(key, value))
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def noise_floor(scale: float, accumulation: int, eps: float = EPS32) -> float:
    """The float32 accumulation error allowed on every value of an output of scale ``scale``."""
    return FLOAT_NOISE * eps * math.sqrt(max(int(accumulation), 1)) * scale


def _nonfinite(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, str]:
    """Positions where the IEEE special values differ, and what differs (counts)."""
    g_nan, w_nan = np.isnan(got), np.isnan(want)
    g_inf, w_inf = np.isinf(got), np.isinf(want)
    problems = [(w_nan & ~g_nan, "a number where NaN is expected"),
                (g_nan & ~w_nan, "NaN where {} is expected"),
                (w_inf & ~g_nan & (got != want), "a different value where inf is expected"),
                (g_inf & np.isfinite(want), "inf where a finite value is expected")]
    bad = np.zeros(got.shape, bool)
    notes = []
    for mask, text in problems:
        if mask.any():
            bad |= mask
            if "{}" in text:
                finite = int((mask & np.isfinite(want)).sum())
                text = text.format("a finite value" if finite == int(mask.sum()) else "a finite value or inf")
            notes.append(f"{int(mask.sum())} {text}")
    return bad, ", ".join(notes)


def compare(name: str, got: np.ndarray, want: np.ndarray, mode: str, rtol: float = RTOL, atol: float = ATOL,
            *, accumulation: int | None = None) -> OutputCheck:
    """One output's errors and verdict (shape mismatch -> fails with infinite error).

    ``accumulation`` is the model's accumulation length K (:func:`accumulation_length`); unknown:
    ``DEFAULT_ACCUMULATION``. Float values must be within ``atol + rtol |ref| + noise_floor(S, K)``,
    integer and bool outputs equal; NaN/inf compare as IEEE values (see the module docstring).
    """
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return OutputCheck(name, tuple(got.shape), float("inf"), float("inf"), False, None, False,
                           note=f"shape {list(got.shape)}, expected {list(want.shape)}")
    exact = want.dtype.kind in "biu"  # an integer or bool reference: equal values, whatever got's dtype
    eps = max([EPS32] + [float(np.finfo(a.dtype).eps) for a in (got, want) if a.dtype.kind == "f"])
    got, want = got.astype(np.float64), want.astype(np.float64)
    bad, note = _nonfinite(got, want)
    both = np.isfinite(got) & np.isfinite(want)
    with np.errstate(invalid="ignore"):  # inf - inf: the pair is judged by _nonfinite
        diff = np.where(both, np.abs(got - want), 0.0)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(np.where(both, want, 0.0)), 1e-12)).max(initial=0.0))
    scale = float(np.abs(want[np.isfinite(want)]).max(initial=0.0))
    if exact:
        tolerance, close = 0.0, both & (diff == 0)
        note = "; ".join(filter(None, ["integer output: compared exactly", note]))
    else:
        floor = noise_floor(scale, DEFAULT_ACCUMULATION if accumulation is None else accumulation, eps)
        tolerance = atol + floor
        close = both & (diff <= tolerance + rtol * np.abs(want))
    close |= ~np.isfinite(want) & ~bad  # NaN matched by NaN, inf by the same inf
    within = bool(np.all(close))
    argmax = float(np.mean(got.argmax(-1) == want.argmax(-1))) if got.ndim >= 2 and got.shape[-1] > 1 else None
    agree = argmax is None or argmax == 1.0
    if mode == "float" or exact:
        values_ok = within
    else:  # binary: a few values may move (a sign flipped downstream), never to NaN/inf
        values_ok = not bad.any() and (close.size == 0 or float(close.mean()) >= BINARY_MIN_CLOSE)
    return OutputCheck(name, tuple(got.shape), max_abs, max_rel, within, argmax, agree and values_ok,
                       tolerance, int(close.size - np.count_nonzero(close)), note)


def accumulation_length(model) -> int:
    """The model's accumulation length K: the sum of its reductions' lengths (see the docstring).

    ``model``: an ``onnx.ModelProto`` or a path. Reductions whose length the graph does not give
    count ``DEFAULT_ACCUMULATION``; a model with none gets 1.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    shapes = _known_shapes(model)
    total = 0
    for node in model.graph.node:
        length = _reduction_length(node, shapes)
        if length is not None:
            total += length if length > 0 else DEFAULT_ACCUMULATION
    return max(total, 1)


def _known_shapes(model) -> dict[str, list]:
    """name -> dims (int, or None when unknown) from initializers, inputs and inferred value infos."""
    import onnx

    try:
        from frugalrt.export import schemas  # noqa: F401  (shape inference of the ai.frugalrt ops)

        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes are a refinement; the fallback length is conservative
        inferred = model
    g = inferred.graph
    shapes: dict[str, list] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def _reduction_length(node, shapes: dict[str, list]) -> int | None:
    """Length of the sums one output value of ``node`` takes; 0 if unknown, None if not a reduction."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def dim(name: str, axis: int) -> int:
        s = shapes.get(name)
        try:
            d = s[axis] if s else None
        except IndexError:
            d = None
        return int(d) if d else 0

    def prod(dims) -> int:
        return int(np.prod(dims)) if dims and all(dims) else 0

    op = node.op_type
    if node.domain == "ai.frugalrt":
        if op == "Butterfly":
            return 2 * dim(node.input[1], 0)  # two terms per stage, one stage per twiddle factor
        if op == "BinaryGemm":
            return int(attrs.get("in_features", 0)) or dim(node.input[0], -1)
        if op == "BinaryConv":
            kernel = attrs.get("kernel_shape")
            kernel = json.loads(kernel) if isinstance(kernel, (bytes, str)) else kernel
            return prod([int(attrs.get("in_channels", 0)), *(kernel or [0])])
        return None
    if node.domain not in ("", "ai.onnx"):
        return None
    if op == "MatMul":
        return dim(node.input[1], -2) or dim(node.input[0], -1)
    if op == "Gemm":
        return (dim(node.input[1], 1 if attrs.get("transB") else 0)
                or dim(node.input[0], 0 if attrs.get("transA") else 1))
    if op == "Conv":
        w = shapes.get(node.input[1])
        return prod(w[1:]) if w else 0
    if op == "ConvTranspose":
        w = shapes.get(node.input[1])
        return prod([w[0] // int(attrs.get("group", 1)), *w[2:]]) if w and w[0] else 0
    if op in ("AveragePool", "LpPool"):
        return prod(attrs.get("kernel_shape"))
    if op in ("GlobalAveragePool", "GlobalLpPool"):
        s = shapes.get(node.input[0])
        return prod(s[2:]) if s else 0
    if op in ("ReduceSum", "ReduceMean", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"):
        s = shapes.get(node.input[0])
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            return 0  # axes given as a tensor: unknown here
        if not s:
            return 0
        return prod([s[a] for a in axes] if axes else s)
    return None


def _has_binary_ops(graph) -> bool:
    return any(node.op_type in BINARY_OPS and node.domain == "ai.frugalrt" for node in graph.node)


def _certificate_line(key: str, cert: Any) -> str:
    """One line per risk certificate: the bound first, then what it rests on (frugalrt.nn.certify's
    JSON: the total confidence with its deltas, the union, the prior and the split sizes)."""
    name = key[len(CERTIFICATE_PREFIX):] if key.startswith(CERTIFICATE_PREFIX) else key
    if not isinstance(cert, dict) or "bound" not in cert:
        return f"certificate {name}: {cert if isinstance(cert, str) else json.dumps(cert)}"

    def num(field: str, label: str, fmt: str = ".4g") -> str:
        value = cert.get(field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"{label} {value:{fmt}}" if ok else ""

    deltas = " - ".join(f for f in (num("delta", "delta", "g"), num("delta_mc", "delta_mc", "g")) if f)
    confidence = num("confidence", "confidence", ".3f")
    confidence += f" (1 - {deltas})" if confidence and deltas else ""
    splits = cert.get("splits") if isinstance(cert.get("splits"), dict) else {}
    splits = "/".join(f"{k} {v}" for k, v in splits.items())
    prior = {True: "data-dependent prior", False: "data-free prior"}.get(cert.get("data_dependent_prior"), "")
    facts = [{True: "VACUOUS", False: "non-vacuous"}.get(cert.get("vacuous"), ""),
             num("empirical_risk", "empirical risk", ".4f"), num("kl", "KL", ".3g"),
             num("log_density_ratio", "ln dQ/dP", ".3g"), num("n", "n", ".10g"), confidence,
             num("union", "union", ".10g") if cert.get("union", 1) != 1 else "",
             num("candidates", "best of draws", ".10g") if cert.get("candidates", 1) != 1 else "",
             num("prior_only_bound", "prior-only bound", ".4f"), prior, f"splits {splits}" if splits else ""]
    details = "; ".join(f for f in (", ".join(f for f in facts if f), cert.get("method") or "") if f)
    return f"certificate {name}: 0-1 risk <= {cert['bound']:.4f}" + (f" ({details})" if details else "")


def _certificate(artifact: Artifact) -> dict[str, Any]:
    entries = {}
    for key, value in artifact.metadata().items():
        if key.startswith(CERTIFICATE_PREFIX):
            try:
                entries[key] = json.loads(value)
            except ValueError:
                entries[key] = value
    return entries


def _torch_reference(reference: Callable, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        if isinstance(reference, torch.nn.Module):
            reference.eval()
        out = reference(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [o.detach().cpu().numpy() if hasattr(o, "detach") else np.asarray(o) for o in outs]


def validate(artifact_dir: str | os.PathLike, reference: Callable | None = None,
             inputs: Sequence[np.ndarray] | None = None, device: str = "local", *,
             rtol: float = RTOL, atol: float = ATOL, mode: str | None = None) -> ValidationReport:
    """Run the artifact on ``device`` and compare with PyTorch (golden vectors or ``reference``).

    Float values must be within ``atol + rtol |ref| + 4 eps sqrt(K) max|ref|`` (K: the model's
    accumulation length, see the module docstring). ``mode`` "float"/"binary" overrides the choice
    made from the model's ops.
    """
    artifact = Artifact(artifact_dir)
    artifact.verify()  # sha256 of every file first: corruption is an ArtifactError naming the file
    golden = artifact.golden()
    golden_inputs = inputs is None
    if golden_inputs:
        if golden is None:
            raise ArtifactError(f"{artifact.path} has no golden vectors (the model was exported without "
                                "them): pass inputs=[...] and reference=<torch model>")
        inputs = golden[0]
    inputs = [np.asarray(x) for x in inputs]
    if reference is not None:
        expected, source = _torch_reference(reference, inputs), "torch"
    elif golden_inputs:
        expected, source = golden[1], "golden"
    else:
        raise ArtifactError("custom inputs need a reference (a torch model or callable) to compare with")
    session = open_device(artifact, device)
    try:
        got = session(*inputs)
    finally:
        session.close()
    import onnx

    model = onnx.load(str(artifact.onnx_path), load_external_data=False)
    mode = mode or ("binary" if _has_binary_ops(model.graph) else "float")
    accumulation = accumulation_length(model)
    names = [o["name"] for o in artifact.outputs] + [f"output_{i}" for i in range(len(artifact.outputs), len(got))]
    if len(got) != len(expected):
        raise ArtifactError(f"{artifact.path}: the artifact returned {len(got)} outputs, the reference {len(expected)}")
    checks = [compare(n, g, e, mode, rtol, atol, accumulation=accumulation) for n, g, e in zip(names, got, expected)]
    return ValidationReport(str(artifact.path), device, source, mode, rtol, atol, checks, _certificate(artifact),
                            accumulation)
