"""32-bit ARM artifacts (armv7 Linux, rpi-zero ARMv6) run as C bundles under qemu-arm (emulated tier)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from frugalrt.errors import DeviceError

# What each target's cross build and emulator need, and the Debian package of each.
NEEDS = {"armv7": ("arm-linux-gnueabihf-gcc", "qemu-arm"),
         "rpi-zero": ("arm-linux-gnueabihf-gcc", "arm-none-eabi-gcc", "newlib", "qemu-arm")}
DEBIAN_PACKAGES = {"arm-linux-gnueabihf-gcc": "gcc-arm-linux-gnueabihf", "arm-none-eabi-gcc": "gcc-arm-none-eabi",
                   "newlib": "libnewlib-arm-none-eabi", "qemu-arm": "qemu-user"}


def _installed(tool: str) -> bool:
    if tool == "newlib":  # arm-none-eabi's C library (semihosting: librdimon)
        gcc = shutil.which("arm-none-eabi-gcc")
        return bool(gcc) and subprocess.run([gcc, "-print-file-name=librdimon.a"], capture_output=True,
                                            text=True).stdout.strip() != "librdimon.a"
    return shutil.which(tool) is not None


@pytest.fixture(scope="module", params=["armv7", "rpi-zero"])
def arm32_artifact(request, tmp_path_factory):
    import frugalrt

    missing = [t for t in NEEDS[request.param] if not _installed(t)]
    if missing:  # skip (reason shown by pytest -rs) instead of failing in compile or qemu
        pytest.skip(f"{request.param} under qemu-arm needs "
                    + ", ".join(f"{t} (Debian package {DEBIAN_PACKAGES[t]})" for t in missing)
                    + ": apt-get install " + " ".join(sorted({DEBIAN_PACKAGES[t] for t in missing})))
    digits_onnx = request.getfixturevalue("digits_onnx")  # exported only when the tools are there
    return frugalrt.compile(digits_onnx, request.param, tmp_path_factory.mktemp(request.param) / "art")


@pytest.mark.emulated
def test_arm32_artifact_matches_pytorch_under_qemu_arm(arm32_artifact):
    import frugalrt

    report = frugalrt.validate(arm32_artifact.path, device="qemu")
    assert report.passed, report
    golden_in, golden_out = arm32_artifact.golden()
    (y,) = frugalrt.load(arm32_artifact.path, device="qemu")(*golden_in)
    np.testing.assert_allclose(y, golden_out[0], rtol=1e-4, atol=1e-4)


@pytest.mark.emulated
def test_arm32_instruction_count_and_board_refusal(arm32_artifact):
    import frugalrt
    from frugalrt.targets.cbundle.run import count_instructions

    count = count_instructions(arm32_artifact.path)
    assert count["instructions"] > 0 and count["unit"] == "instructions, not cycles"
    print(f"\n{arm32_artifact.target}: {count['instructions']} instructions per inference")
    with pytest.raises(DeviceError, match="boards are for Cortex-M"):
        frugalrt.load(arm32_artifact.path, device="qemu:netduinoplus2")


# --- the ARMv7 NEON binary kernels (LLVM objects) under qemu-arm -------------------------------------
# A bundle compiles its kernels with TVM's C codegen, so the NEON kernels (``arm_binary``,
# ``arm_binary_conv``) are checked on their own: their TIR built by LLVM for ``armv7`` into an object,
# linked with the bundle's runtime shim and a generated C driver that calls each kernel once.

_DRIVER = """#include <stdio.h>
#include "frugalrt_runtime.h"
uint8_t frugalrt_workspace[16 << 20] __attribute__((aligned(64)));
const size_t frugalrt_workspace_size = sizeof frugalrt_workspace;
/* LLVM kernels reach the workspace through these (weak, null) globals: a static link defines them */
void *__TVMBackendAllocWorkspace = (void *)TVMBackendAllocWorkspace;
void *__TVMBackendFreeWorkspace = (void *)TVMBackendFreeWorkspace;
static uint8_t in[%(in_bytes)d] __attribute__((aligned(64))), out[%(out_bytes)d] __attribute__((aligned(64)));
%(decls)s
int main(int argc, char **argv) {
  FILE *f = fopen(argv[1], "rb");
  if (!f || fread(in, 1, sizeof in, f) != sizeof in) return 2;
  fclose(f);
  void *const bases[3] = {in, out, NULL};
%(calls)s
  f = fopen(argv[2], "wb");
  return !f || fwrite(out, 1, sizeof out, f) != sizeof out || fclose(f);
}
"""
_DTYPES = {np.dtype(np.float32): (2, 32), np.dtype(np.int32): (0, 32), np.dtype(np.uint8): (1, 8),
           np.dtype(np.uint64): (1, 64)}


def _arg(i: int, a: np.ndarray, base: int, offset: int) -> tuple[str, str]:
    """(declaration of arg ``i``'s shape, its ``frugalrt_arg`` initializer)."""
    code, bits = _DTYPES[a.dtype]
    decl = f"static const int64_t shape{i}[] = {{{', '.join(map(str, a.shape))}}};"
    return decl, f"{{{base}, {a.ndim}, {code}, {bits}, {offset}, NULL, shape{i}}}"


def run_arm_kernels(calls: list, tmp) -> list[np.ndarray]:
    """``calls``: (TIR prim_func, input arrays, output shape[, output dtype: float32]) -> each call's
    output, run under ``qemu-arm -cpu cortex-a7`` from one static armv7 program."""
    import tvm

    from frugalrt.targets.cbundle.boards import PLATFORMS
    from frugalrt.targets.cbundle.project import FILES, copy_headers
    from frugalrt.targets.registry import tvm_target

    calls = [(*call, np.float32) if len(call) == 3 else call for call in calls]
    mod = tvm.IRModule({f"k{n}": f.with_attr("global_symbol", f"k{n}") for n, (f, *_) in enumerate(calls)})
    tvm.compile(mod, target=tvm_target("armv7")).mod.write_to_file(str(tmp / "kernels.o"))
    blob, outs, decls, lines, i, out_bytes = bytearray(), [], [], [], 0, 0
    for n, (_, inputs, out_shape, out_dtype) in enumerate(calls):
        args = []
        for a in (np.ascontiguousarray(a) for a in inputs):
            blob += bytes(-len(blob) % 64)
            decl, init = _arg(i, a, 0, len(blob))
            blob += a.tobytes()
            decls.append(decl)
            args.append(init)
            i += 1
        out = np.zeros(out_shape, out_dtype)
        outs.append((out_bytes, out))
        decl, init = _arg(i, out, 1, out_bytes)
        out_bytes += -(-out.nbytes // 64) * 64  # LLVM kernels assume 64-byte aligned tensors
        decls += [decl, f"int32_t __tvm_ffi_k{n}(void *, void *, int32_t, void *);"]
        i += 1
        lines.append(f"  {{ static const frugalrt_arg a[] = {{{', '.join(args + [init])}}};\n"
                     f"    if (frugalrt_call(__tvm_ffi_k{n}, a, {len(args) + 1}, bases)) "
                     f"{{ puts(frugalrt_last_error()); return 1; }} }}")
    (tmp / "driver.c").write_text(_DRIVER % {"in_bytes": len(blob), "out_bytes": out_bytes,
                                             "decls": "\n".join(decls), "calls": "\n".join(lines)})
    (tmp / "in.bin").write_bytes(bytes(blob))
    copy_headers(tmp / "include")
    platform = PLATFORMS["armv7"]
    subprocess.run([platform.cc, "-O2", "-std=gnu11", *platform.cflags, *platform.ldflags, "-I", str(FILES),
                    "-I", str(tmp / "include"), str(tmp / "driver.c"), str(FILES / "frugalrt_runtime.c"),
                    str(tmp / "kernels.o"), "-lm", "-o", str(tmp / "prog")], check=True)
    run = subprocess.run([*platform.qemu, str(tmp / "prog"), str(tmp / "in.bin"), str(tmp / "out.bin")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    data = (tmp / "out.bin").read_bytes()
    return [np.frombuffer(data, out.dtype, out.size, offset).reshape(out.shape) for offset, out in outs]


@pytest.mark.emulated
def test_armv7_neon_binary_kernels_are_exact_under_qemu_arm(tmp_path):
    """Each case of the rpi4 tests (``test_neon_kernels``: float and packed activations, pad_value 1),
    plus two float GEMMs, from one armv7 program."""
    from test_neon_kernels import off_the_test_stack

    missing = [t for t in NEEDS["armv7"] if not _installed(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    calls, want = off_the_test_stack(_neon_calls)
    for y, expected in zip(run_arm_kernels(calls, tmp_path), want, strict=True):
        assert y.dtype == expected.dtype
        np.testing.assert_array_equal(y, expected)


def _neon_calls() -> tuple[list, list]:
    """(calls for :func:`run_arm_kernels`, expected outputs) of the armv7 NEON kernels on the test cases."""
    from test_neon_kernels import (CONV_CASES, PACKED_CONV_CASES, PACKED_GEMM_CASES, conv_inputs, conv_model,
                                   conv_reference)

    from frugalrt.runtime import reference as ref
    from frugalrt.targets.kernels import arm_binary, arm_binary_conv
    from frugalrt.targets.kernels.activation import with_activation
    from frugalrt.targets.kernels.packing import Packing

    calls, want = [], []
    for cases, gemms, batch, seeds in ((CONV_CASES, (), 2, (0, 1)), (PACKED_CONV_CASES, PACKED_GEMM_CASES, 3, (3, 4))):
        _, params = conv_model(cases, seeds[0], gemms)
        xs = conv_inputs(batch, cases, seeds[1], gemms)
        for x, (consts, attrs), y in zip(xs, params, conv_reference(xs, params), strict=True):
            w, scale, bias, packing = consts["W_packed"], consts["scale"], consts["B"], Packing.of(attrs)
            if "in_channels" in attrs:
                c = attrs["in_channels"]
                h, wd = x.shape[1:3] if packing.input else x.shape[2:]
                func, inputs = arm_binary_conv.kernel_inputs(w, scale, bias, c, h, wd, attrs["kernel_shape"],
                                                             attrs["strides"], attrs["pads"], "arm",
                                                             attrs.get("pad_value", 0), packing)
            else:
                func, inputs = arm_binary.kernel_inputs(w, scale, bias, attrs["in_features"], "arm", packing)
            if attrs.get("activation") and not packing.output:  # in the bit thresholds, else on each store
                func = with_activation(func, attrs["activation"], attrs.get("activation_min", float("-inf")),
                                       attrs.get("activation_max", float("inf")))
            calls.append((func, [x, *inputs], y.shape, y.dtype))
            want.append(y)
    rng = np.random.default_rng(2)
    for batch, k, n in [(5, 100, 40), (3, 1030, 70)]:
        w, x = ref.pack_bits(rng.standard_normal((n, k))), rng.standard_normal((batch, k)).astype(np.float32)
        x[0, :4] = 0.0
        scale, bias = rng.random(n).astype(np.float32) + 0.1, rng.standard_normal(n).astype(np.float32)
        func, consts = arm_binary.kernel_inputs(w, scale, bias, k, "arm")
        calls.append((func, [x, *consts], (batch, n)))
        want.append(ref.binary_gemm(x, w, scale, bias, in_features=k))
    return calls, want
