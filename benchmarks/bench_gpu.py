"""GPU: frugalrt's CUDA kernels against dense PyTorch on the same GPU (``python -m benchmarks --only gpu``).

One GPU, medians of GPU-side times: frugalrt through the Relax VM's ``time_evaluator`` on the
device (``invoke_stateful`` on inputs bound once: kernels and launches, no host copies), PyTorch
through CUDA events around a loop of calls. Baselines: the dense equivalent in cuBLAS float32 with
TF32 off (``torch fp32``, the same arithmetic precision as frugalrt) and in float16 (``torch fp16``,
tensor cores). ``x`` = baseline time ÷ frugalrt time (above 1: frugalrt faster).

Cases: butterfly N in {1024, 4096} x batch {1, 256, 4096} (dense N x N matmul baseline); binary
GEMM 4096³ and 8192³ (dense GEMM of the same shape); the transformer and binary CNN of
``benchmarks.bench_models`` (their dense twins). Without a usable GPU the suite prints why and
returns; without a CUDA build of torch the baseline columns are left out, with the reason.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

BUTTERFLY_SIZES, BUTTERFLY_BATCHES = (1024, 4096), (1, 256, 4096)
GEMM_SIZES = (4096, 8192)
MODEL_BATCHES = {"transformer": (1, 64), "binary CNN": (1, 256)}


def gpu_unavailable() -> str | None:
    from frugalrt.runtime.cuda_device import cuda_problem

    return cuda_problem()


def torch_unavailable() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} has no CUDA (torch.version.cuda={torch.version.cuda}); "
                "scripts/gpu_check.sh installs a CUDA build in a separate venv")
    return None


def _target() -> str:
    import tvm

    return "cuda-sm90" if tvm.cuda(0).compute_version == "9.0" else "cuda"


class FrugalTimer:
    """A compiled artifact on GPU 0, timed on the device."""

    def __init__(self, model_path: Path, out: Path):
        import frugalrt

        self.artifact = frugalrt.compile(model_path, _target(), out, batch_bound=0)
        self.session = frugalrt.load(self.artifact.path, device="cuda")

    def median_us(self, x: np.ndarray, repeat: int) -> float:
        import tvm

        vm, dev = self.session.vm, self.session.dev
        vm.set_input("main", tvm.runtime.tensor(x, dev))
        vm.time_evaluator("invoke_stateful", dev, number=3, repeat=1)("main")  # warm-up
        result = vm.time_evaluator("invoke_stateful", dev, number=10, repeat=repeat, min_repeat_ms=20)("main")
        return statistics.median(result.results) * 1e6


def torch_median_us(fn, repeat: int, number: int = 10) -> float:
    """Median µs per call of ``fn`` on the current CUDA stream (CUDA events around ``number`` calls)."""
    import torch

    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / number)
    return statistics.median(samples)


def _baselines(make, repeat: int, no_torch: str | None) -> dict[str, float]:
    """{"torch fp32": µs, "torch fp16": µs} of ``make(dtype) -> callable`` (empty without CUDA torch)."""
    if no_torch:
        return {}
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    times = {}
    with torch.no_grad():
        for label, dtype in (("torch fp32", torch.float32), ("torch fp16", torch.float16)):
            times[label] = torch_median_us(make(dtype), repeat)
    return times


def _row(case: str, frugal_us: float, baselines: dict[str, float], **extra) -> dict:
    times = {"frugalrt": frugal_us, **baselines}
    return {"bench": "gpu", "case": case, "times_us": times,
            "ratios": {k: v / frugal_us for k, v in baselines.items()}, **extra}


def butterfly_cases(tmp: Path, repeat: int, no_torch: str | None, quick: bool) -> list[dict]:
    import onnx
    import torch

    from frugalrt.export.single_op import single_op_model
    from frugalrt.nn import ButterflyLinear

    rows = []
    for n in BUTTERFLY_SIZES[:1] if quick else BUTTERFLY_SIZES:
        torch.manual_seed(0)
        layer = ButterflyLinear(n, n, bias=False).eval()
        twiddles = layer.twiddles.detach().numpy().astype(np.float32)
        dense = layer.to_dense().detach()
        onnx.save(single_op_model("Butterfly", [n], {"twiddles": twiddles}, {"out_features": n}), tmp / f"b{n}.onnx")
        frugal = FrugalTimer(tmp / f"b{n}.onnx", tmp / f"b{n}")
        for batch in BUTTERFLY_BATCHES[:2] if quick else BUTTERFLY_BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, n)).astype(np.float32)

            def make(dtype, x=x):
                xt, w = torch.from_numpy(x).cuda().to(dtype), dense.cuda().to(dtype)
                return lambda: xt @ w.T

            rows.append(_row(f"butterfly N={n} batch={batch}", frugal.median_us(x, repeat),
                             _baselines(make, repeat, no_torch)))
    return rows


def gemm_cases(tmp: Path, repeat: int, no_torch: str | None, quick: bool) -> list[dict]:
    import onnx
    import torch

    from frugalrt.export.single_op import single_op_model
    from frugalrt.runtime.reference import pack_bits

    rows = []
    for n in GEMM_SIZES[:1] if quick else GEMM_SIZES:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((n, n)).astype(np.float32)
        consts = {"W_packed": pack_bits(w), "scale": np.abs(w).mean(axis=1).astype(np.float32)}
        onnx.save(single_op_model("BinaryGemm", [n], consts, {"in_features": n}), tmp / f"g{n}.onnx")
        frugal = FrugalTimer(tmp / f"g{n}.onnx", tmp / f"g{n}")
        x = rng.standard_normal((n, n)).astype(np.float32)

        def make(dtype, x=x, w=w):
            xt, wt = torch.from_numpy(x).cuda().to(dtype), torch.from_numpy(w).cuda().to(dtype)
            return lambda: xt @ wt.T

        us = frugal.median_us(x, repeat)
        rows.append(_row(f"binary GEMM {n}x{n}x{n}", us, _baselines(make, repeat, no_torch),
                         binary_tops=2 * n ** 3 / us / 1e6))
    return rows


def model_cases(tmp: Path, repeat: int, no_torch: str | None, quick: bool) -> list[dict]:
    import torch

    import frugalrt
    from benchmarks.bench_models import build

    rows = []
    for name, batches in MODEL_BATCHES.items():
        frugal_model, shape = build(name, dense=False)
        path = tmp / f"{name.replace(' ', '_')}.onnx"
        frugalrt.export(frugal_model, (torch.randn(2, *shape),), path)
        frugal = FrugalTimer(path, path.with_suffix(""))
        for batch in batches[:1] if quick else batches:
            x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)

            def make(dtype, x=x):
                model = build(name, dense=True)[0].cuda().to(dtype)
                xt = torch.from_numpy(x).cuda().to(dtype)
                return lambda: model(xt)

            rows.append(_row(f"{name} batch={batch}", frugal.median_us(x, repeat), _baselines(make, repeat, no_torch)))
    return rows


def run(args) -> list[dict]:
    reason = gpu_unavailable()
    if reason:
        return [{"skipped": f"no CUDA GPU: {reason}"}]
    no_torch = torch_unavailable()
    if no_torch:
        print(f"gpu: torch baselines left out: {no_torch}", file=sys.stderr)
    repeat = 5 if getattr(args, "quick", False) else 30
    quick = getattr(args, "quick", False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="frugalrt-bench-gpu-") as tmp:
        for cases in (butterfly_cases, gemm_cases, model_cases):
            rows += cases(Path(tmp), repeat, no_torch, quick)
    return rows
