"""Butterfly N x N, batch 1 and 64: frugalrt's compiled kernel vs dense, pyfaust, naive stages, FFT.

frugalrt: a one-node Butterfly model compiled by ``frugalrt.compile`` for ``host`` (``cpu_butterfly``)
and timed through the Relax VM, i.e. what a user's artifact runs.
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

from benchmarks.common import (case, compile_host_vm, dense_matmul_onnx, ort_runner, ort_session, side_by_side,
                               timer, tvm_timer)

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


def run(args) -> list[dict]:
    import scipy.fft
    import torch
    import tvm

    import frugalrt
    from frugalrt.export.single_op import single_op_model
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
        vm, _ = compile_host_vm(single_op_model("Butterfly", [n], {"twiddles": twiddles}, {"out_features": n}))
        for batch in BATCHES:
            x = np.random.default_rng(0).standard_normal((batch, n)).astype(np.float32)
            xt_tvm = tvm.runtime.tensor(x, tvm.cpu())
            expected = butterfly(x, twiddles, out_features=n)
            error = float(np.abs(vm["main"](xt_tvm).numpy() - expected).max() / np.abs(expected).max())
            xt, tw_t = torch.from_numpy(x), torch.from_numpy(twiddles)
            xf, xc = np.asfortranarray(x.T), x.astype(np.complex64)
            with torch.no_grad():
                times = side_by_side({
                    "frugalrt": tvm_timer(vm, "main", [xt_tvm]),
                    "torch nn.Linear (dense)": timer(lambda: dense(xt)),
                    "naive torch stage loop": timer(lambda: butterfly_dense_path(xt, tw_t, None, n)),
                    "ORT dense MatMul": timer(ort_runner(ort_dense, x)),
                    "ORT portable export": timer(ort_runner(ort_portable, x)),
                    **({"pyfaust (opt_butterfly_faust)": timer(lambda: faust @ xf)} if faust else {}),
                    "scipy FFT c64 (floor)": timer(lambda: scipy.fft.fft(xc, axis=1, workers=1))}, repeat)
            rows.append(case("butterfly", f"N={n} batch={batch}", times, {"max_rel_error": error}))
            print(f"butterfly N={n} batch={batch}: done (rel. error {error:.1e})", file=sys.stderr)
    return rows
