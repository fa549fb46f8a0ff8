"""The static plan (frugalrt.targets.static_plan, frugalrt.runtime.plan): the local session's call
path without the Relax VM gives the VM's results bit for bit, and PyTorch's within float32
rounding (compile tier)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import frugalrt
from frugalrt.nn import BinaryLinear, ButterflyLinear
from frugalrt.targets.static_plan import share_tensors

pytestmark = pytest.mark.compile


class Attention(nn.Module):
    """Matmul attention with LayerNorm, softmax, GELU and reshapes: many kernels and views."""

    def __init__(self, d: int = 32, seq: int = 8):
        super().__init__()
        self.seq, self.norm = seq, nn.LayerNorm(d)
        self.q, self.k, self.v = ButterflyLinear(d, d), ButterflyLinear(d, d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), ButterflyLinear(2 * d, d))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
        return self.mlp(x + att).reshape(x.shape[0], -1)


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = ButterflyLinear(16, 16), BinaryLinear(16, 8)

    def forward(self, x):
        h = self.a(x)
        return torch.relu(self.b(h)), h


MODELS = {
    "digits-like": (lambda: nn.Sequential(ButterflyLinear(64, 128), nn.BatchNorm1d(128), nn.Hardtanh(),
                                          BinaryLinear(128, 128), nn.BatchNorm1d(128), nn.Hardtanh(),
                                          nn.Linear(128, 10)), (64,)),
    "attention": (Attention, (8, 32)),
    "two outputs": (TwoOutputs, (16,)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def compiled(request, tmp_path_factory):
    build, shape = MODELS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    tmp = tmp_path_factory.mktemp(request.param.replace(" ", "_"))
    frugalrt.export(model, (torch.randn(3, *shape),), tmp / "m.onnx")
    frugalrt.compile(tmp / "m.onnx", "host", tmp / "host")
    return model, shape, tmp / "host"


def test_plan_gives_the_vm_results_bit_for_bit(compiled):
    model, shape, path = compiled
    plan = json.loads((path / "manifest.json").read_text())["plan"]
    assert plan["steps"] and all(s["kernel"] for s in plan["steps"])
    session = frugalrt.load(path)
    assert session.static_plan is not None
    import tvm

    for batch in (1, 5, 2):
        x = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        got = session(x)
        vm = session.vm["main"](tvm.runtime.tensor(x))
        vm = [vm] if hasattr(vm, "numpy") else list(vm)
        assert len(got) == len(vm)
        for a, b in zip(got, vm):
            np.testing.assert_array_equal(a, b.numpy())
        with torch.no_grad():
            want = model(torch.from_numpy(x))
        for a, b in zip(got, want if isinstance(want, tuple) else (want,)):
            np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


def test_outputs_survive_the_next_call(compiled):
    _, shape, path = compiled
    session = frugalrt.load(path)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    first = [y.copy() for y in session(x)]
    kept = session(x)
    session(-x)
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)


def test_shared_tensors_never_alias_a_live_value():
    spec = {"shape": ["batch", 4], "dtype": "float32"}
    plan = {"tensors": [spec] * 4, "outputs": [["tensor", 3]], "steps": [
        {"kernel": "a", "args": [["input", 0], ["tensor", 0]]},
        {"kernel": "b", "args": [["tensor", 0], ["tensor", 1]]},
        {"kernel": "c", "args": [["tensor", 1], ["tensor", 0], ["tensor", 2]]},
        {"kernel": "d", "args": [["tensor", 2], ["tensor", 3]]}]}
    shared = share_tensors(plan)
    slots = [[i for k, i in s["args"] if k == "tensor"] for s in shared["steps"]]
    assert slots[0] == [0] and slots[1] == [0, 1]
    assert len(set(slots[2])) == 3  # t0 and t1 are read by c: its result gets a third tensor
    assert slots[3][0] == slots[2][2] and slots[3][1] not in slots[3][:1]
    assert shared["outputs"] == [["tensor", slots[3][1]]]
    assert len(shared["tensors"]) == 3


def test_python_loop_and_c_driver_agree(compiled):
    _, shape, path = compiled
    session = frugalrt.load(path)
    assert session.static_plan.driver is not None  # compile links the plan's C driver into lib.so
    loop = frugalrt.load(path)
    loop.static_plan.driver = None  # the fallback of a library without the driver
    x = np.random.default_rng(3).standard_normal((3, *shape)).astype(np.float32)
    for a, b in zip(session(x), loop(x)):
        np.testing.assert_array_equal(a, b)


_ON_DEVICE = r'''
import sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
from frugalrt_plan import StaticPlan
import json
lib, manifest, inputs, out = sys.argv[1:5]
module = tvm.runtime.load_module(lib)
vm = VirtualMachine(module, tvm.cpu())
plan = StaticPlan(module, vm, json.load(open(manifest))["plan"])
assert plan.driver is not None
x = np.load(inputs)
buffer = tvm.runtime.empty(x.shape, "float32")
np.from_dlpack(buffer)[...] = x
(y,) = plan.bind([buffer], x.shape[0])()
np.savez(out, plan=y, vm=vm["main"](tvm.runtime.tensor(x)).numpy())
'''


@pytest.mark.emulated
def test_cross_compiled_driver_runs_on_the_emulated_rpi4(digits_onnx, tmp_path, emulation_tools):
    """The rpi4 artifact's plan driver (cross-compiled C) in the device's Python under qemu-aarch64:
    the VM's outputs bit for bit, and PyTorch's golden outputs within float32 rounding."""
    import shutil
    import subprocess

    from frugalrt.runtime import plan as plan_module
    from frugalrt.runtime.emulator.userland import ensure_userland

    artifact = frugalrt.compile(digits_onnx, "rpi4", tmp_path / "rpi4")
    (golden_in,), (golden_out,) = artifact.golden()
    np.save(tmp_path / "x.npy", golden_in)
    (tmp_path / "on_device.py").write_text(_ON_DEVICE)
    shutil.copyfile(plan_module.__file__, tmp_path / "frugalrt_plan.py")
    cmd = ensure_userland().command(str(tmp_path / "on_device.py"), str(artifact.lib_path),
                                    str(artifact.path / "manifest.json"), str(tmp_path / "x.npy"),
                                    str(tmp_path / "y.npz"))
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "y.npz")
    np.testing.assert_array_equal(got["plan"], got["vm"])
    np.testing.assert_allclose(got["plan"], golden_out, rtol=1e-4, atol=1e-4)
