"""CUDA targets: the artifact and kernels on any machine (compile tier), and on a GPU (``gpu`` tier).

Compile tier (nvcc, no GPU): each cuda-lib target's ``lib.so`` embeds an nvcc fatbin with SASS for
its archs and PTX; ``kernels.cu`` passes nvcc/ptxas for sm_75, sm_87 and sm_90; the generated
kernels have the structure that makes them fast (butterfly: one kernel, all stages in shared
memory, one barrier per stage, X read and Y written once; binary: ``__popcll`` on 64-bit words,
the output transform rounded step by step, Y written once, fused activation inside); the
coefficient layout of the butterfly kernel reproduces the reference bit for bit (simulated in
numpy); a missing driver is named.

GPU tier: every op against the numpy reference, bit for bit, with odd sizes; the digits example
against PyTorch; bad inputs. Skipped, with the exact reason, where no CUDA GPU can run TVM code.
"""
import re
import struct

import numpy as np
import pytest

import frugalrt
from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.export.single_op import single_op_model
from frugalrt.runtime import reference as ref
from frugalrt.targets.registry import TARGETS

CUDA_TARGETS = sorted(name for name, t in TARGETS.items() if t.artifact == "cuda-lib")
ELF_MACHINE = {"cuda": 62, "cuda-sm90": 62, "jetson-orin": 183}  # x86-64, AArch64 hosts
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def nvcc(need_tools):
    need_tools("nvcc", why="compiling CUDA kernels")


@pytest.fixture(scope="module")
def cuda_build(digits_onnx, tmp_path_factory, nvcc, need_tools):
    """``cuda_build(target)``: the digits example compiled for a cuda-lib target, once per module."""
    cache = {}

    def get(name: str):
        if TARGETS[name].cross_cc:
            need_tools(TARGETS[name].cross_cc, why=f"linking the host code of {name}")
        if name not in cache:
            cache[name] = frugalrt.compile(digits_onnx, name, tmp_path_factory.mktemp("cuda") / name)
        return cache[name]

    return get


def kernel_sources(model, target: str = "cuda-sm90") -> dict[str, str]:
    """{kernel name: CUDA source of its __global__ function} of ``model`` built for ``target`` (no nvcc)."""
    from frugalrt.targets.compile import _build, _import, cuda_source
    from frugalrt.targets.registry import get_target

    device = get_target(target)
    built, _, _ = _build(_import(model, device), device)
    source = cuda_source(built)
    bodies = re.split(r'(?=extern "C" __global__)', source)
    return {re.search(r"void (?:__launch_bounds__\(\d+\) )?(\w+)\(", b).group(1): b
            for b in bodies if b.startswith('extern "C" __global__') and b.rstrip().endswith("}")}


def one(kernels: dict[str, str], prefix: str) -> str:
    found = [src for name, src in kernels.items() if name.startswith(prefix)]
    assert len(found) == 1, (prefix, sorted(kernels))
    return found[0]


# --- compile tier ------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("target", CUDA_TARGETS)
def test_cuda_lib_embeds_a_fatbin_for_its_archs(cuda_build, target):
    from frugalrt.targets.cuda_build import CUDA_ARCHS, embedded_cuda, fatbin_entries

    artifact = cuda_build(target)
    archs, ptx = CUDA_ARCHS[target]
    assert artifact.manifest["cuda"] == {"format": "fatbin", "archs": list(archs), "ptx": ptx,
                                         "source": "kernels.cu", "fast_math": False}
    header = artifact.lib_path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == ELF_MACHINE[target]
    fmt, fatbin = embedded_cuda(artifact.lib_path)
    assert fmt == "fatbin"
    entries = fatbin_entries(fatbin)
    assert sorted(a for kind, a in entries if kind == "sass") == sorted(archs)
    assert [a for kind, a in entries if kind == "ptx"] == [ptx]
    assert "__global__" in (artifact.path / "kernels.cu").read_text()
    artifact.verify()  # kernels.cu and lib.so are both in the manifest's checksums


@pytest.mark.compile
def test_kernels_cu_passes_ptxas_for_sm75_sm87_sm90(cuda_build):
    from frugalrt.targets.compile import check_cuda_source

    assert check_cuda_source(cuda_build("cuda").path / "kernels.cu") == ["sm_75", "sm_87", "sm_90"]


@pytest.mark.compile
@pytest.mark.parametrize("n,width,out,rows", [(1024, 1000, 999, 4), (4096, 4096, 4096, 1), (8, 5, 8, 8)])
def test_butterfly_kernel_fuses_every_stage_in_shared_memory(n, width, out, rows):
    from frugalrt.targets.kernels.gpu_butterfly import launch_shape

    tw = RNG.standard_normal((n.bit_length() - 1, n // 2, 2, 2)).astype(np.float32)
    model = single_op_model("Butterfly", [width], {"twiddles": tw, "B": np.ones(out, np.float32)},
                            {"out_features": out})
    kernels = kernel_sources(model)
    assert list(kernels) == ["frugalrt_butterfly_gpu_kernel"]  # one kernel: no per-stage or permutation pass
    src = kernels["frugalrt_butterfly_gpu_kernel"]
    assert launch_shape(n)[0] == rows
    assert len(re.findall(r"__shared__ .*float \w+\[(\d+)\]", src)) == 2  # ping-pong buffers
    assert src.count("__syncthreads()") == n.bit_length()  # after the load, then once per stage
    per_thread = n // launch_shape(n)[1]
    assert len(re.findall(r"X_ptr\[", src)) == rows * per_thread  # X read once
    assert len(re.findall(r"Y_ptr\[[^\]]*\] =", src)) == rows * per_thread  # Y written once ...
    assert len(re.findall(r"Y_ptr\[", src)) == rows * per_thread  # ... and never read
    assert "fmaf" not in src and "__fmul_rn" in src and "__fadd_rn" in src


@pytest.mark.compile
def test_binary_gemm_kernel_counts_bits_with_popc_and_fuses_the_activation():
    k, n = 1000, 300
    consts = {"W_packed": ref.pack_bits(RNG.standard_normal((n, k))), "scale": np.ones(n, np.float32),
              "B": np.zeros(n, np.float32)}
    kernels = kernel_sources(single_op_model("BinaryGemm", [k], consts, {"in_features": k, "activation": "relu"}))
    gemm = one(kernels, "frugalrt_binary_gemm_gpu")
    assert "__popcll(" in gemm and "__shared__" in gemm
    assert re.search(r"__fmul_rn\(\(\(float\)\(taps_ptr\[0\] - \(acc", gemm)
    stores = re.findall(r"Y_ptr\[[^\]]*\] = (.*);", gemm)
    assert stores and all(s.startswith("max(__fadd_rn(") for s in stores)  # relu on each value, once
    assert len(re.findall(r"Y_ptr\[", gemm)) == len(stores)
    assert len(kernels) == 2  # pack + GEMM: no separate activation pass


@pytest.mark.compile
def test_binary_conv_kernel_masks_padded_taps():
    c, o = 3, 20
    consts = {"W_packed": ref.pack_bits(RNG.standard_normal((o, c * 9))), "scale": np.ones(o, np.float32)}
    attrs = {"in_channels": c, "kernel_shape": [3, 3], "strides": [2, 1], "pads": [1, 0, 2, 1]}
    conv = one(kernel_sources(single_op_model("BinaryConv", [c, 9, 7], consts, attrs)), "frugalrt_binary_conv_gpu")
    assert re.search(r"__popcll\(\(\(\w+\[\w+\] \^ \w+\[\w+\]\) & \w+\[\w+\]\)\)", conv)  # (x ^ w) & in-image
    assert "taps_ptr[" in conv and "__fmul_rn" in conv
    one_padded = one(kernel_sources(single_op_model("BinaryConv", [c, 9, 7], consts, {**attrs, "pad_value": 1})),
                     "frugalrt_binary_conv_gpu")  # padded taps read +1: a 0 bit, nothing to mask
    assert re.search(r"__popcll\(\(\w+\[\w+\] \^ \w+\[\w+\]\)\)", one_padded) and " & " not in one_padded


@pytest.mark.compile
@pytest.mark.parametrize("n,width,out", [(2, 1, 2), (64, 50, 37), (1024, 1024, 1000)])
def test_butterfly_pair_coefficients_replay_the_reference_exactly(n, width, out):
    """The kernel's schedule in numpy (float32, same rounding steps): equal to the reference bit for bit."""
    from frugalrt.targets.kernels.butterfly import stage_coefficients
    from frugalrt.targets.kernels.gpu_butterfly import pair_coefficients

    tw = RNG.standard_normal((n.bit_length() - 1, n // 2, 2, 2)).astype(np.float32)
    bias = RNG.standard_normal(out).astype(np.float32)
    x = RNG.standard_normal((5, width)).astype(np.float32)
    coef = pair_coefficients(*stage_coefficients(tw))
    y = np.zeros((5, n), np.float32)
    y[:, :width] = x
    p = np.arange(n // 2)
    for s in range(n.bit_length() - 1):
        i = ((p >> s) << (s + 1)) | (p & ((1 << s) - 1))
        j = i + (1 << s)
        a0, a1, b0, b1 = coef[s].T
        nxt = np.empty_like(y)
        nxt[:, i] = a0 * y[:, i] + a1 * y[:, j]
        nxt[:, j] = b0 * y[:, j] + b1 * y[:, i]
        y = nxt
    assert np.array_equal(y[:, :out] + bias, ref.butterfly(x, tw, bias, out_features=out))


@pytest.mark.compile
def test_cuda_device_names_the_missing_library(cuda_build):
    from frugalrt.runtime.cuda_device import cuda_problem

    problem = cuda_problem()
    if problem is None:
        pytest.skip("a CUDA GPU is usable here: nothing is missing")
    with pytest.raises(DeviceError, match=r"device cuda: (libcuda\.so\.1|libcudart\.so\.13|TVM's CUDA runtime|no CUDA GPU)"):
        frugalrt.load(cuda_build("cuda-sm90").path, device="cuda")


def test_arch_check_accepts_sass_of_the_same_major_or_older_ptx():
    from frugalrt.runtime.cuda_device import arch_problem

    manifest = {"cuda": {"archs": ["sm_80", "sm_86"], "ptx": "sm_80"}}
    assert arch_problem(manifest, "8.9") is None  # SASS 8.6 runs on 8.9
    assert arch_problem(manifest, "12.0") is None  # PTX 8.0 is JIT-compiled
    assert "sm_75" in arch_problem(manifest, "7.5")
    assert arch_problem({"cuda": {"archs": ["sm_90"], "ptx": "sm_90"}}, "8.7") is not None


def test_cuda_device_index_is_parsed():
    from frugalrt.runtime.cuda_device import device_index

    assert (device_index("cuda"), device_index("cuda:3")) == (0, 3)
    with pytest.raises(DeviceError, match="cuda:N"):
        device_index("cuda:x")


# --- gpu tier ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_target():
    """The cuda-lib target to build for this GPU (cuda-sm90 on Hopper, else cuda); skips without a GPU."""
    from frugalrt.runtime.cuda_device import cuda_problem

    problem = cuda_problem()
    if problem:
        print(f"no CUDA GPU: {problem}")
        pytest.skip(f"no CUDA GPU: {problem}")
    import tvm

    return "cuda-sm90" if tvm.cuda(0).compute_version == "9.0" else "cuda"


def _gemm(k, n, bias, **act):
    w = ref.pack_bits(RNG.standard_normal((n, k)))
    consts = {"W_packed": w, "scale": (RNG.random(n) + 0.1).astype(np.float32),
              **({"B": RNG.standard_normal(n).astype(np.float32)} if bias else {})}
    return ("BinaryGemm", [k], consts, {"in_features": k, **act},
            lambda x: ref.binary_gemm(x, w, consts["scale"], consts.get("B"), in_features=k, **act))


def _conv(c, hw, o, kernel, strides, pads, bias, **act):
    w = ref.pack_bits(RNG.standard_normal((o, c * kernel[0] * kernel[1])))
    consts = {"W_packed": w, "scale": (RNG.random(o) + 0.1).astype(np.float32),
              **({"B": RNG.standard_normal(o).astype(np.float32)} if bias else {})}
    attrs = {"in_channels": c, "kernel_shape": kernel, "strides": strides, "pads": pads}
    return ("BinaryConv", [c, *hw], consts, {**attrs, **act},
            lambda x: ref.binary_conv(x, w, consts["scale"], consts.get("B"), **attrs, **act))


def _butterfly(n, width, out, bias, **act):
    tw = RNG.standard_normal((n.bit_length() - 1, n // 2, 2, 2)).astype(np.float32)
    consts = {"twiddles": tw, **({"B": RNG.standard_normal(out).astype(np.float32)} if bias else {})}
    return ("Butterfly", [width], consts, {"out_features": out, **act},
            lambda x: ref.butterfly(x, tw, consts.get("B"), out_features=out, **act))


GPU_CASES = {  # bit-identical to the reference
    "butterfly-2": _butterfly(2, 1, 2, bias=True),
    "butterfly-64-in50-out37": _butterfly(64, 50, 37, bias=False),
    "butterfly-1024-in1000-out999-bias": _butterfly(1024, 1000, 999, bias=True),
    "butterfly-4096-relu": _butterfly(4096, 4096, 4096, bias=True, activation="relu"),
    "gemm-1000x77-bias": _gemm(1000, 77, bias=True),
    "gemm-65x3": _gemm(65, 3, bias=False),
    "gemm-4099x300-clip": _gemm(4099, 300, bias=True, activation="clip", activation_min=-1.0, activation_max=2.0),
    "conv-3c-9x7-k3-s2x1-pad-asym": _conv(3, (9, 7), 20, [3, 3], [2, 1], [1, 0, 2, 1], bias=True),
    "conv-5c-4x4-k2-s2": _conv(5, (4, 4), 6, [2, 2], [2, 2], [0, 0, 0, 0], bias=False),
    "conv-3c-9x7-k3-s2x1-pad-asym-one": _conv(3, (9, 7), 20, [3, 3], [2, 1], [1, 0, 2, 1], bias=True, pad_value=1),
    "conv-67c-11x11-k3-pad1-relu": _conv(67, (11, 11), 129, [3, 3], [1, 1], [1, 1, 1, 1], bias=True,
                                         activation="relu"),
}


@pytest.fixture(scope="module")
def gpu_case(gpu_target, tmp_path_factory):
    cache = {}

    def get(name: str):
        if name not in cache:
            op, dims, consts, attrs, oracle = GPU_CASES[name]
            path = tmp_path_factory.mktemp("gpu-op") / f"{name}.onnx"
            import onnx

            onnx.save(single_op_model(op, dims, consts, attrs), path)
            art = frugalrt.compile(path, gpu_target, path.with_suffix(""), batch_bound=0)
            cache[name] = (frugalrt.load(art.path, device="cuda"), dims, oracle)
        return cache[name]

    return get


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(GPU_CASES))
@pytest.mark.parametrize("batch", [1, 3, 257])
def test_op_on_gpu_equals_the_reference_bit_for_bit(gpu_case, name, batch):
    session, dims, oracle = gpu_case(name)
    x = RNG.standard_normal((batch, *dims)).astype(np.float32)
    x.reshape(batch, -1)[:, ::7] = 0.0  # sign(0) = +1
    (y,) = session(x)
    want = oracle(x)
    assert y.shape == want.shape
    assert np.array_equal(y, want), f"max abs diff {np.max(np.abs(y - want))}"


@pytest.mark.gpu
def test_large_butterfly_falls_back_and_stays_close(gpu_target, tmp_path):
    import onnx

    op, dims, consts, attrs, oracle = _butterfly(8192, 8000, 8192, bias=True)
    onnx.save(single_op_model(op, dims, consts, attrs), tmp_path / "b.onnx")
    session = frugalrt.load(frugalrt.compile(tmp_path / "b.onnx", gpu_target, tmp_path / "b").path, device="cuda")
    x = RNG.standard_normal((9, 8000)).astype(np.float32)
    (y,) = session(x)
    np.testing.assert_allclose(y, oracle(x), rtol=1e-4, atol=1e-4 * np.abs(oracle(x)).max())


@pytest.mark.gpu
def test_digits_example_on_gpu_matches_pytorch(gpu_target, digits_onnx, tmp_path):
    art = frugalrt.compile(digits_onnx, gpu_target, tmp_path / "digits")
    report = frugalrt.validate(art.path, device="cuda")
    assert report.passed, report.table()
    from frugalrt.runtime.profile import profile

    report = profile(art.path, device="cuda", runs=20, warmup=5)
    assert report.latency_ms["median"] > 0


@pytest.mark.gpu
def test_bad_inputs_on_gpu_are_named(gpu_target, digits_onnx, tmp_path):
    art = frugalrt.compile(digits_onnx, gpu_target, tmp_path / "digits", batch_bound=16)
    session = frugalrt.load(art.path, device="cuda")
    with pytest.raises((ArtifactError, ValueError), match="input"):
        session(np.zeros((2, 63), np.float32))
    with pytest.raises((ArtifactError, ValueError), match="input"):
        session(np.zeros((2, 64), np.float64))
    with pytest.raises(ArtifactError, match="batch_bound"):
        session(np.zeros((17, 64), np.float32))
    with pytest.raises(DeviceError, match="cuda:N"):
        frugalrt.load(art.path, device="cuda:first")
    (y,) = session(np.zeros((16, 64), np.float32))
    assert y.shape == (16, 10) and np.isfinite(y).all()
