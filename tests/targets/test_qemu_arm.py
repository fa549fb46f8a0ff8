"""32-bit ARM artifacts (armv7 Linux, rpi-zero ARMv6) run as C bundles under qemu-arm (emulated tier)."""
from __future__ import annotations

import numpy as np
import pytest

from frugalrt.errors import DeviceError


@pytest.fixture(scope="module", params=["armv7", "rpi-zero"])
def arm32_artifact(request, digits_onnx, tmp_path_factory):
    import frugalrt

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
