"""``frugalrt profile --plot``: a PNG with the latency histogram and the per-op bars."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from frugalrt._atomic import atomic_path
from frugalrt.errors import FrugalError
from frugalrt.runtime.profile import EMULATED_LABEL, ProfileReport

TOP_OPS = 12


def require_matplotlib():
    """``matplotlib.pyplot`` (Agg backend), or a FrugalError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FrugalError("--plot needs matplotlib, which is not installed: "
                          "pip install matplotlib (or the dev extra: pip install 'frugalrt[dev]')") from None
    return plt


def plot(report: ProfileReport, path: str | os.PathLike) -> None:
    """Left: latency histogram (and the baseline's); right: the costliest ops, ms per inference."""
    plt = require_matplotlib()
    fig, (hist, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    label = f" — {EMULATED_LABEL}" if report.emulated else ""
    series = [("model", report)] + ([("baseline", report.baseline)] if report.baseline else [])
    everything = [s for _, r in series for s in r.samples_ms]
    bins = np.geomspace(min(everything), max(everything) * 1.001, 40)  # shared, log: ratios show
    for name, r in series:
        hist.hist(r.samples_ms, bins=bins, alpha=0.7, label=f"{name} (median {r.latency_ms['median']:.3g} ms)")
    hist.set_xscale("log")
    hist.set(xlabel=f"latency per inference, ms{label}", ylabel="runs",
             title=f"{report.target} on {report.device_info.get('kind', report.device)}, batch {report.batch}")
    hist.legend()
    ops = (report.ops or [])[:TOP_OPS][::-1]
    bars.barh([o.name for o in ops], [o.ms for o in ops])
    bars.set(xlabel="ms per inference (instrumented, overhead removed)",
             title="per-op breakdown" if ops else f"per-op breakdown unavailable: {report.ops_note}")
    fig.tight_layout()
    try:
        with atomic_path(path, suffixes=(".png", ".svg", ".pdf")) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100)
    finally:
        plt.close(fig)
