"""Butterfly N x N, batch 1 and 64: frugalrt's compiled kernel vs dense, pyfaust, naive stages, FFT.

frugalrt: the host kernel (``cpu_butterfly``) called through TVM's timer on preallocated tensors.
Baselines: torch ``nn.Linear`` (dense), ONNX Runtime dense MatMul, the portable standard-op export
of the same layer in ONNX Runtime, pyfaust's butterfly-optimized Faust (``opt_butterfly_faust``),
a naive PyTorch stage loop (the eager ``butterfly_dense_path``), and scipy's complex FFT of the same N
(the O(N log N) floor).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from benchmarks.common import (case, dense_matmul_onnx, host_target, ort_runner, ort_session, side_by_side, timer,
                               tvm_timer)

SIZES, BATCHES = (1024, 4096), (1, 64)


def pyfaust_product(twiddles):
    """pyfaust Faust of the stage matrices (last stage first), butterfly-optimized; or None."""
    try:
        import pyfaust
        import scipy.sparse as sp
    except ImportError:
        print("pyfaust not installed: pip install pyfaust (dev extra)", file=sys.stderr)
        return None
    stages, half = twiddles.shape[:2]
    n, mats = 2 * half, []
    for s in range(stages):
        h, p = 1 << s, np.arange(half)
        i = (p // h) * 2 * h + p % h
        rows, cols = np.concatenate([i, i, i + h, i + h]), np.concatenate([i, i + h, i, i + h])
        vals = np.concatenate([twiddles[s, :, 0, 0], twiddles[s, :, 0, 1], twiddles[s, :, 1, 0], twiddles[s, :, 1, 1]])
        mats.append(sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=(n, n), dtype=np.float32))
    return pyfaust.opt_butterfly_faust(pyfaust.Faust(mats[::-1]))


def frugalrt_kernel(twiddles, x):
    import tvm

    from frugalrt.targets.kernels.butterfly import stage_coefficients
    from frugalrt.targets.kernels.cpu_butterfly import butterfly_primfunc, repack

    n = 2 * twiddles.shape[1]
    blocks, stream = repack(*stage_coefficients(twiddles))
    lib = tvm.compile(butterfly_primfunc(n, n, n), target=host_target())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, blocks, stream, np.zeros(n, np.float32),
                                                       np.zeros_like(x))]
    lib(*args)
    return lib.mod, args


def run(args) -> list[dict]:
    import scipy.fft
    import torch

    import frugalrt
    from frugalrt.nn import ButterflyLinear
    from frugalrt.nn.ops import butterfly_dense_path
    from frugalrt.runtime.reference import butterfly

    repeat = 5 if args.quick else 30
    sizes = (1024,) if args.quick else SIZES
    rows = []
    for n in sizes:
        torch.manual_seed(0)
        layer = ButterflyLinear(n, n, bias=False).eval()
        twiddles = layer.twiddles.detach().numpy().astype(np.float32)
        dense = torch.nn.Linear(n, n, bias=False).eval()
        with torch.no_grad():
            dense.weight.copy_(layer.to_dense())
        ort_dense = ort_session(dense_matmul_onnx(dense.weight.detach().numpy().T))
        with tempfile.TemporaryDirectory() as tmp:
            portable = frugalrt.export(layer, (torch.randn(2, n),), os.path.join(tmp, "b.onnx"), portable=True)
        ort_portable = ort_session(portable)
        faust = pyfaust_product(twiddles)
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, n)).astype(np.float32)
            mod, targs = frugalrt_kernel(twiddles, x)
            expected = butterfly(x, twiddles, out_features=n)
            error = float(np.abs(targs[-1].numpy() - expected).max() / np.abs(expected).max())
            xt, tw_t = torch.from_numpy(x), torch.from_numpy(twiddles)
            xf, xc = np.asfortranarray(x.T), x.astype(np.complex64)
            with torch.no_grad():
                times = side_by_side({
                    "frugalrt": tvm_timer(mod, "main", targs),
                    "torch nn.Linear (dense)": timer(lambda: dense(xt)),
                    "naive torch stage loop": timer(lambda: butterfly_dense_path(xt, tw_t, None, n)),
                    "ORT dense MatMul": timer(ort_runner(ort_dense, x)),
                    "ORT portable export": timer(ort_runner(ort_portable, x)),
                    **({"pyfaust (opt_butterfly_faust)": timer(lambda: faust @ xf)} if faust else {}),
                    "scipy FFT c64 (floor)": timer(lambda: scipy.fft.fft(xc, axis=1, workers=1))}, repeat)
            rows.append(case("butterfly", f"N={n} batch={batch}", times, {"max_rel_error": error}))
            print(f"butterfly N={n} batch={batch}: done (rel. error {error:.1e})", file=sys.stderr)
    return rows
