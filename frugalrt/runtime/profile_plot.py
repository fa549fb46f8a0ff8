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
    """Left: latency histograms of the model and the baseline (instruction counts in the legend);
    then the costliest ops of each, ms per inference."""
    plt = require_matplotlib()
    series = [("model", report)] + ([("baseline", report.baseline)] if report.baseline else [])
    fig, axes = plt.subplots(1, 1 + len(series), figsize=(6.5 * (1 + len(series)), 4.8), squeeze=False)
    _histogram(axes[0][0], report, series)
    for ax, (name, r) in zip(axes[0][1:], series):
        _op_bars(ax, name, r)
    fig.tight_layout()
    try:
        with atomic_path(path, suffixes=(".png", ".svg", ".pdf")) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100)
    finally:
        plt.close(fig)


def _histogram(ax, report: ProfileReport, series: list) -> None:
    """Shared bins; a log axis (plain-number labels, major ticks only) when the samples span a decade."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    everything = [s for _, r in series for s in r.samples_ms]
    lo, hi = min(everything), max(everything) * 1.001
    log = hi / lo > 10
    bins = np.geomspace(lo, hi, 40) if log else np.linspace(lo, hi, 40)
    for name, r in series:
        count = f", {r.instructions['instructions']:,} instructions" if r.instructions else ""
        ax.hist(r.samples_ms, bins=bins, alpha=0.7, label=f"{name}: median {r.latency_ms['median']:.3g} ms{count}")
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, numticks=6))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
        ax.locator_params(axis="x", nbins=6)
    label = f" — {EMULATED_LABEL}" if report.emulated else ""
    ax.set(xlabel=f"latency per inference, ms{label}", ylabel="runs",
           title=f"{report.target} on {report.device_info.get('kind', report.device)}, batch {report.batch}")
    ax.legend(fontsize="small")


def _op_bars(ax, name: str, report: ProfileReport) -> None:
    """The ``TOP_OPS`` costliest ops (ONNX node and op type), ms per inference."""
    ops = (report.ops or [])[:TOP_OPS][::-1]
    ax.barh([f"{o.name[:28]} ({o.op_type[:12]})" if o.op_type else o.name[:28] for o in ops], [o.ms for o in ops])
    ax.tick_params(axis="y", labelsize="small")
    ax.locator_params(axis="x", nbins=5)
    title = f"{name}: per-op, ms per inference" if ops else f"{name}: per-op unavailable: {report.ops_note[:60]}"
    ax.set(xlabel="ms per inference (each kernel timed alone)", title=title)
