"""Artifacts know their CPU and their files: the manifest's ``llvm_target`` (triple, mcpu, ISA
features) is checked against this CPU before ``lib.so`` is opened, and every file's sha256 before
anything is loaded (fast tier: forged CPU flags and forged artifacts; compile tier: real artifacts;
emulated tier: a host artifact under ``qemu-x86_64 -cpu Haswell``)."""
import json
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import frugalrt
from frugalrt.cli import main
from frugalrt.errors import ArtifactError, DeviceError
from frugalrt.runtime import loader
from frugalrt.runtime.artifact import Artifact, file_digests
from frugalrt.runtime.loader import check_cpu, missing_cpu_features, portable_target_for
from frugalrt.targets.registry import X86_FEATURES, X86_LEVELS

# /proc/cpuinfo flags of the ISA extensions frugalrt checks, as CPUID reports them under
# `qemu-x86_64 -cpu Haswell` (an AVX2 machine without AVX-512, ADX or SHA)
HASWELL = ["abm", "aes", "avx", "avx2", "bmi1", "bmi2", "cmov", "cx16", "cx8", "f16c", "fma", "lahf_lm", "mmx",
           "movbe", "pclmulqdq", "pni", "popcnt", "sse", "sse2", "sse4_1", "sse4_2", "ssse3"]
AVX512 = ["avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]
# an AVX-512 CPU's compiled-for features (LLVM names), as recorded for `host` on an Emerald Rapids
EMERALD = sorted(X86_LEVELS["x86-64-v4"] + ("adx", "avx512vpopcntdq", "avx512vnni", "sha", "gfni"))


def _manifest(features, triple="x86_64-linux-gnu", mcpu="emeraldrapids", target="host") -> dict:
    return {"target": target, "artifact": "shared-lib", "llvm_target": {"triple": triple, "mcpu": mcpu, "mattr": []},
            "cpu_features": list(features)}


def _forged_artifact(tmp_path: Path, manifest: dict, files: dict[str, bytes]) -> Path:
    root = tmp_path / "art"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = manifest | {"files": {"lib": "lib.so"}, "sha256": file_digests(root)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --- fast tier: forged CPU flags ------------------------------------------------------------------
def test_missing_features_map_llvm_names_to_cpuinfo_flags():
    manifest = _manifest(EMERALD)
    assert missing_cpu_features(manifest, HASWELL) == sorted(AVX512 + ["adx", "avx512vnni", "avx512vpopcntdq",
                                                                       "gfni", "sha"])
    # names that differ between LLVM and /proc/cpuinfo: sse4.2 -> sse4_2, avx512vpopcntdq -> avx512_vpopcntdq
    everything = HASWELL + AVX512 + ["adx", "sha_ni", "gfni", "avx512_vnni", "avx512_vpopcntdq"]
    assert missing_cpu_features(manifest, everything) == []
    assert missing_cpu_features(manifest, [f for f in everything if f != "avx512_vpopcntdq"]) == ["avx512vpopcntdq"]
    assert missing_cpu_features(manifest, [f for f in everything if f != "sse4_2"]) == ["sse4.2"]
    # a feature frugalrt does not know (a newer compiler's, or a forged manifest) counts as lacking
    assert missing_cpu_features(_manifest(["sse2", "amx-tile"]), everything) == ["amx-tile"]


def test_non_x86_artifacts_are_not_checked_against_this_cpu():
    assert missing_cpu_features(_manifest(["neon"], "aarch64-linux-gnu", "cortex-a72", "rpi4"), []) == []
    assert missing_cpu_features({"target": "cortex-m4", "llvm_target": None, "cpu_features": []}, []) == []


@pytest.mark.parametrize("flags,best", [(HASWELL + AVX512, "x86-64-v4"), (HASWELL, "x86-64-v3"),
                                        ([f for f in HASWELL if f != "fma"], "x86-64-v1"),
                                        (["cmov", "cx8", "mmx", "sse", "sse2"], "x86-64-v1")])
def test_the_suggested_portable_target_is_the_best_this_cpu_runs(flags, best):
    assert portable_target_for(flags) == best
    assert missing_cpu_features(_manifest(X86_LEVELS[best], mcpu=best, target=best), flags) == []


def test_cpu_without_avx512_refuses_with_the_features_and_the_target_to_use(tmp_path):
    art = Artifact(_forged_artifact(tmp_path, _manifest(EMERALD), {"lib.so": b"\x7fELF"}))
    with pytest.raises(DeviceError, match=r"compiled for emeraldrapids \(host\), this CPU lacks adx, avx512bw, "
                                          r"avx512cd, avx512dq, avx512f, .*avx512vpopcntdq.*; recompile with "
                                          r"--target x86-64-v3"):
        check_cpu(art, HASWELL)
    check_cpu(art, HASWELL + AVX512 + ["adx", "sha_ni", "gfni", "avx512_vnni", "avx512_vpopcntdq"])


def test_load_checks_the_cpu_before_opening_the_library(tmp_path, monkeypatch):
    """The library here is not even an ELF file: the CPU check must refuse before dlopen."""
    monkeypatch.setattr(loader, "host_cpu_flags", lambda: frozenset(HASWELL))
    root = _forged_artifact(tmp_path, _manifest(EMERALD), {"lib.so": b"not a library"})
    with pytest.raises(DeviceError, match="this CPU lacks .*avx512f.*--target x86-64-v3"):
        frugalrt.load(root)


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file(),
                    reason="CPUID and /proc/cpuinfo are read on x86-64 Linux")
def test_cpuid_agrees_with_the_kernel_here():
    by_cpuid, by_kernel = loader._cpuid_flags(), loader._proc_cpuinfo_flags()
    if by_cpuid is None:
        pytest.skip("executable memory for CPUID is refused here (W^X policy); /proc/cpuinfo is used alone")
    checked = set(X86_FEATURES.values())
    assert by_cpuid == by_kernel & checked
    assert loader.host_cpu_flags() == frozenset(by_cpuid & by_kernel)


# --- fast tier: file checksums --------------------------------------------------------------------
def test_verify_names_the_truncated_edited_or_missing_file(tmp_path):
    files = {"lib.so": b"\x7fELF" + bytes(4096), "golden.npz": b"golden", "bundle/src/model.c": b"int x;"}
    root = _forged_artifact(tmp_path, _manifest(EMERALD), files)
    assert set(Artifact(root).manifest["sha256"]) == set(files)
    Artifact(root).verify()
    (root / "lib.so").write_bytes(files["lib.so"][:100])
    with pytest.raises(ArtifactError, match=r"art/lib\.so: sha256 mismatch \(artifact corrupted or modified\); "
                                            "recompile"):
        Artifact(root).verify()
    (root / "lib.so").write_bytes(files["lib.so"])
    (root / "bundle/src/model.c").write_bytes(b"int y;")
    with pytest.raises(ArtifactError, match=r"bundle/src/model\.c: sha256 mismatch"):
        Artifact(root).verify()
    (root / "bundle/src/model.c").unlink()
    with pytest.raises(ArtifactError, match=r"bundle/src/model\.c: missing .*recompile"):
        Artifact(root).verify()


def test_artifacts_without_checksums_are_refused(tmp_path):
    """Artifacts written before the manifest had sha256 and llvm_target: recompile them."""
    root = tmp_path / "old"
    root.mkdir()
    (root / "lib.so").write_bytes(b"\x7fELF")
    (root / "manifest.json").write_text(json.dumps({"target": "host", "artifact": "shared-lib",
                                                    "files": {"lib": "lib.so"}, "frugalrt_version": "0.1.0"}))
    with pytest.raises(ArtifactError, match="no file checksums .*older frugalrt.*recompile"):
        frugalrt.load(root)
    with pytest.raises(ArtifactError, match="no file checksums"):
        frugalrt.validate(root)


# --- compile tier: real artifacts -----------------------------------------------------------------
@pytest.fixture(scope="module")
def portable(digits_onnx, tmp_path_factory):
    """The digits example compiled for x86-64-v3 and x86-64-v4."""
    out = tmp_path_factory.mktemp("portable")
    return {t: frugalrt.compile(digits_onnx, t, out / t).path for t in ("x86-64-v3", "x86-64-v4")}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}


@pytest.mark.compile
def test_host_manifest_records_the_detected_cpu_and_its_features(digits_host_artifact):
    from tvm.target import codegen

    manifest = Artifact(digits_host_artifact).manifest
    llvm = manifest["llvm_target"]
    cpu = str(codegen.llvm_get_system_cpu())
    assert manifest["tvm_target"] == {"kind": "llvm", "mcpu": cpu}
    assert llvm["mcpu"] == cpu and llvm["triple"].startswith("x86_64") and llvm["mattr"] == []
    features = manifest["cpu_features"]
    assert features == sorted(features) and set(features) <= set(X86_FEATURES)
    assert set(X86_LEVELS["x86-64-v1"]) <= set(features)
    assert missing_cpu_features(manifest) == []  # compiled here, for here
    assert set(manifest["sha256"]) == _files(digits_host_artifact) == {"lib.so", "model.onnx", "golden.npz", "opnames.json"}


@pytest.mark.compile
@pytest.mark.parametrize("target", ["x86-64-v3", "x86-64-v4"])
def test_portable_manifests_record_exactly_their_psabi_level(portable, target):
    manifest = Artifact(portable[target]).manifest
    assert manifest["tvm_target"] == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": target}
    assert manifest["llvm_target"] == {"triple": "x86_64-linux-gnu", "mcpu": target, "mattr": []}
    assert manifest["cpu_features"] == sorted(X86_LEVELS[target])
    assert "avx512vpopcntdq" not in manifest["cpu_features"]
    assert set(manifest["sha256"]) == _files(portable[target])


@pytest.mark.compile
def test_x86_64_v4_picks_the_avx2_table_kernel_not_vpopcnt(portable):
    """x86-64-v4 has AVX-512 F/BW/CD/DQ/VL but not VPOPCNTDQ: no vpopcntd or vpopcntq may reach its library."""
    from frugalrt.targets.kernels.cpu_binary import has_avx2
    from frugalrt.targets.kernels.cpu_binary_vpopcnt import has_vpopcntdq
    from frugalrt.targets.registry import tvm_target

    target = tvm_target("x86-64-v4")
    assert has_avx2(target) and not has_vpopcntdq(target)
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", str(portable["x86-64-v4"] / "lib.so")], capture_output=True,
                             text=True, check=True).stdout
        assert "vpshufb" in asm and "vpopcnt" not in asm


@pytest.mark.compile
@pytest.mark.parametrize("target", ["x86-64-v3", "x86-64-v4"])
def test_portable_artifacts_run_here_and_match_pytorch(portable, digits_example, target):
    missing = missing_cpu_features(Artifact(portable[target]).manifest)
    if missing:
        with pytest.raises(DeviceError, match=f"this CPU lacks {', '.join(missing)}"):
            frugalrt.load(portable[target])
        pytest.skip(f"this CPU lacks {', '.join(missing)} (refused as it should be)")
    model, (x,) = digits_example
    with torch.no_grad():
        want = model(x).numpy()
    session = frugalrt.load(portable[target])
    try:
        (got,) = session(x.numpy())
    finally:
        session.close()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == want.argmax(1)).all()
    assert frugalrt.validate(portable[target]).passed


@pytest.mark.compile
def test_truncated_library_is_an_artifact_error_not_a_bus_error(digits_host_artifact, tmp_path, capsys):
    copy = tmp_path / "truncated"
    shutil.copytree(digits_host_artifact, copy)
    with open(copy / "lib.so", "r+b") as f:
        f.truncate(4096)
    message = r"truncated/lib\.so: sha256 mismatch \(artifact corrupted or modified\); recompile"
    with pytest.raises(ArtifactError, match=message):
        frugalrt.load(copy)
    with pytest.raises(ArtifactError, match=message):
        frugalrt.validate(copy)
    assert main(["validate", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "lib.so: sha256 mismatch" in err and len(err.splitlines()) == 1


@pytest.mark.compile
@pytest.mark.parametrize("target", ["rpi4", "armv7", "cortex-m4"])
def test_cross_targets_write_valid_manifests(digits_onnx, tmp_path, target):
    from frugalrt.targets.registry import get_target

    missing = get_target(target).missing_tools()
    if missing:
        pytest.skip(f"{target} needs {', '.join(missing)}")
    art = frugalrt.compile(digits_onnx, target, tmp_path / target)
    art.verify()
    manifest = art.manifest
    assert set(manifest["sha256"]) == _files(art.path)
    if target == "cortex-m4":
        assert manifest["llvm_target"] is None and manifest["cpu_features"] == []
        assert any(f.startswith("bundle/") for f in manifest["sha256"])
    else:
        spec = get_target(target).tvm
        assert manifest["tvm_target"] == spec
        assert manifest["llvm_target"] == {"triple": spec["mtriple"], "mcpu": spec["mcpu"], "mattr": spec["mattr"]}
        assert manifest["cpu_features"] == sorted(a[1:] for a in spec["mattr"])
        assert missing_cpu_features(manifest, []) == []  # only local x86 loading checks features


# --- emulated tier: an AVX-512 host artifact on an emulated AVX2 CPU ------------------------------
QEMU_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import frugalrt
    from frugalrt.errors import FrugalError
    for path in sys.argv[1:]:
        try:
            session = frugalrt.load(path)
            print("RAN", session(np.zeros((2, 64), np.float32))[0].shape, flush=True)
        except FrugalError as e:
            print(f"REFUSED {type(e).__name__}: {e}", flush=True)
""")


@pytest.mark.emulated
@pytest.mark.compile
def test_host_artifact_refuses_to_run_on_an_emulated_haswell(digits_host_artifact, portable, tmp_path):
    """Under `qemu-x86_64 -cpu Haswell` (CPUID says AVX2, no AVX-512) an AVX-512 host artifact used to
    die with SIGILL; now it is refused with the missing features, and x86-64-v3 runs."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-x86_64 (Debian: qemu-user)")
    if not missing_cpu_features(Artifact(digits_host_artifact).manifest, HASWELL):
        pytest.skip("this machine's host artifact uses nothing Haswell lacks: nothing to refuse")
    script = tmp_path / "load.py"
    script.write_text(QEMU_SCRIPT)
    run = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(script), str(digits_host_artifact),
                          str(portable["x86-64-v3"])], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    refused, ran = run.stdout.splitlines()[-2:]
    assert refused.startswith("REFUSED DeviceError: ") and "this CPU lacks" in refused
    assert "avx512f" in refused and "recompile with --target x86-64-v3" in refused
    assert ran == "RAN (2, 10)"
