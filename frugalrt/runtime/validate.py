"""``frugalrt.validate``: run a compiled artifact and compare it with PyTorch.

The reference is the golden vectors recorded by PyTorch at export (default), or a live torch
model (or any callable) run on ``inputs``. Tolerances: float paths must match elementwise
(``|y - ref| <= atol + rtol |ref|``, rtol 1e-4) and class predictions (argmax) must agree. A model
with binary ops must agree on every argmax and have at least 90% of its values within tolerance:
one activation rounding differently just before a sign can legitimately move values downstream
while the prediction stays the same, but values cannot be arbitrarily wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from frugalrt.errors import ArtifactError
from frugalrt.runtime.artifact import Artifact
from frugalrt.runtime.devices import open_device

RTOL, ATOL = 1e-4, 1e-5
BINARY_OPS = ("BinaryGemm", "BinaryConv")
BINARY_MIN_CLOSE = 0.9  # share of values within tolerance required in binary mode
CERTIFICATE_PREFIX = "frugalrt.certificate."


@dataclass
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    within_tolerance: bool
    argmax_agreement: float | None  # fraction of rows whose argmax matches (None for 1-D outputs)
    passed: bool


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

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def table(self) -> str:
        """Human-readable results, one row per output."""
        lines = [f"artifact {self.artifact} on {self.device} vs {self.reference} "
                 f"({self.mode} mode: rtol={self.rtol:g}, atol={self.atol:g}"
                 f", argmax must agree{f', {BINARY_MIN_CLOSE:.0%} of values within' if self.mode == 'binary' else ''})",
                 f"{'output':<16}{'shape':<14}{'max abs':>11}{'max rel':>11}{'argmax':>9}  result"]
        for o in self.outputs:
            argmax = "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.1%}"
            lines.append(f"{o.name[:15]:<16}{str(list(o.shape)):<14}{o.max_abs:>11.3g}{o.max_rel:>11.3g}"
                         f"{argmax:>9}  {'ok' if o.passed else 'FAIL'}")
        for key, value in self.certificate.items():
            lines.append(_certificate_line(key, value))
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def compare(name: str, got: np.ndarray, want: np.ndarray, mode: str, rtol: float, atol: float) -> OutputCheck:
    """One output's errors and verdict (shape mismatch -> fails with infinite error)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return OutputCheck(name, tuple(got.shape), float("inf"), float("inf"), False, None, False)
    diff = np.abs(got - want)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(want), 1e-12)).max(initial=0.0))
    close = (diff <= atol + rtol * np.abs(want)) & np.isfinite(got)
    within = bool(np.all(close))
    argmax = float(np.mean(got.argmax(-1) == want.argmax(-1))) if got.ndim >= 2 and got.shape[-1] > 1 else None
    agree = argmax is None or argmax == 1.0
    passed = agree and (within if mode == "float" else (close.size == 0 or float(close.mean()) >= BINARY_MIN_CLOSE))
    return OutputCheck(name, tuple(got.shape), max_abs, max_rel, within, argmax, passed)


def _has_binary_ops(artifact: Artifact) -> bool:
    import onnx

    graph = onnx.load(str(artifact.onnx_path), load_external_data=False).graph
    return any(node.op_type in BINARY_OPS and node.domain == "ai.frugalrt" for node in graph.node)


def _certificate_line(key: str, cert: Any) -> str:
    """One line per risk certificate: the bound first, then what it rests on."""
    name = key[len(CERTIFICATE_PREFIX):] if key.startswith(CERTIFICATE_PREFIX) else key
    if not isinstance(cert, dict) or "bound" not in cert:
        return f"certificate {name}: {cert if isinstance(cert, str) else json.dumps(cert)}"
    facts = [f"empirical risk {cert['empirical_risk']:.4f}" if cert.get("empirical_risk") is not None else "",
             f"KL {cert['kl']:.3g}" if cert.get("kl") is not None else "", f"n {cert.get('n')}",
             f"confidence {cert.get('confidence')}"]
    if "vacuous" in cert:
        facts.insert(0, "VACUOUS" if cert["vacuous"] else "non-vacuous")
    return (f"certificate {name}: 0-1 risk <= {cert['bound']:.4f} ("
            + ", ".join(f for f in facts if f) + (f"; {cert['method']}" if "method" in cert else "") + ")")


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

    ``mode`` "float"/"binary" overrides the choice made from the model's ops.
    """
    artifact = Artifact(artifact_dir)
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
    mode = mode or ("binary" if _has_binary_ops(artifact) else "float")
    names = [o["name"] for o in artifact.outputs] + [f"output_{i}" for i in range(len(artifact.outputs), len(got))]
    if len(got) != len(expected):
        raise ArtifactError(f"{artifact.path}: the artifact returned {len(got)} outputs, the reference {len(expected)}")
    checks = [compare(n, g, e, mode, rtol, atol) for n, g, e in zip(names, got, expected)]
    return ValidationReport(str(artifact.path), device, source, mode, rtol, atol, checks, _certificate(artifact))
