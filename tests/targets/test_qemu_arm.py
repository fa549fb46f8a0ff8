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
