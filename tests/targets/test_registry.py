"""Target registry and `frugalrt targets` (fast tier: no TVM)."""
import pytest

from frugalrt.cli import main
from frugalrt.errors import TargetError
from frugalrt.targets.registry import TARGETS, get_target

EXPECTED = {"host", "x86-64-v1", "rpi4", "rpi3", "armv7", "rpi-zero", "android-arm64", "cortex-m4", "cortex-m7",
            "cuda"}


def test_every_required_target_is_registered():
    assert EXPECTED <= set(TARGETS)
    for t in TARGETS.values():
        assert t.artifact in ("shared-lib", "c-bundle", "cuda-lib")
        assert t.runner in ("local", "rpc", "qemu-arm", "qemu-system", "adb", "cuda", "none")
        assert (t.cross_cc is None) or t.cross_cc in t.needs


@pytest.mark.parametrize("name,triple,cpu", [("rpi4", "aarch64-linux-gnu", "cortex-a72"),
                                             ("rpi3", "aarch64-linux-gnu", "cortex-a53"),
                                             ("armv7", "armv7a-linux-gnueabihf", "cortex-a7"),
                                             ("rpi-zero", "armv6kz-linux-gnueabihf", "arm1176jzf-s"),
                                             ("android-arm64", "aarch64-linux-android", "cortex-a57")])
def test_arm_targets_name_their_cpu(name, triple, cpu):
    spec = get_target(name).tvm
    assert (spec["mtriple"], spec["mcpu"]) == (triple, cpu)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(TargetError, match="unknown target 'rpi5'.*rpi4.*cortex-m7"):
        get_target("rpi5")


def test_cli_targets_lists_every_target_with_its_tools(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    for name, t in TARGETS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert all(tool in line for tool in t.needs)
