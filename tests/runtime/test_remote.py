"""Remote runs over TVM RPC on emulated rpi4 devices: numerics vs PyTorch, trackers, and every way
a device can fail (wrong address, silent server, device gone or frozen mid-run) ending in a
DeviceError (never a hang), with nothing left running."""
import os
import signal
import socket
import threading

import numpy as np
import pytest
import torch

import frugalrt
from frugalrt.cli import main
from frugalrt.errors import DeviceError
from frugalrt.runtime.emulator import processes, start_device, start_tracker, stop_devices
from frugalrt.runtime.remote import DeviceAddress

pytestmark = pytest.mark.emulated
HANG_GUARD_S = 300.0  # generous: the code's own timeouts end a failure long before; this only catches a hang


@pytest.mark.parametrize("device, parsed", [
    ("rpc://127.0.0.1:9090", ("rpc", "127.0.0.1", 9090, "", 60.0)),
    ("tracker://10.0.0.1:9190/rpi4?timeout=5", ("tracker", "10.0.0.1", 9190, "rpi4", 5.0)),
])
def test_device_strings_parse(device, parsed):
    a = DeviceAddress.parse(device)
    assert (a.scheme, a.host, a.port, a.key, a.timeout) == parsed


@pytest.mark.parametrize("device", ["rpc://127.0.0.1", "tracker://h:1", "rpc://h:x", "http://h:1"])
def test_bad_device_strings_are_rejected(device):
    with pytest.raises(DeviceError, match="expected rpc://HOST:PORT"):
        DeviceAddress.parse(device)


def test_rpi4_outputs_match_pytorch(digits_rpi4_artifact, rpi4_device, digits_example):
    model, (x,) = digits_example
    with torch.no_grad():
        expected = model(x).numpy()
    session = frugalrt.load(digits_rpi4_artifact, device=rpi4_device)
    try:
        got = session(x.numpy())
        again = session(x.numpy()[:3])  # dynamic batch
    finally:
        session.close()
    # binarized layers: a sign may flip at a tie, so compare predictions and most values tightly
    assert (got[0].argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(again[0], got[0][:3], rtol=1e-6, atol=1e-6)


def test_validate_cli_on_rpi4(digits_rpi4_artifact, rpi4_device, capsys):
    report = frugalrt.validate(digits_rpi4_artifact, device=rpi4_device)
    assert report.passed and report.reference == "golden"
    assert all(o.max_abs <= 1e-4 for o in report.outputs)
    assert main(["validate", str(digits_rpi4_artifact), "--device", rpi4_device]) == 0
    assert "PASSED" in capsys.readouterr().out


def _expect_device_error(fn, match):
    """``fn()`` raises a DeviceError matching ``match``; a call that never returns fails the test
    (a hang detector, not a speed check) instead of hanging the suite."""
    raised = []

    def call():
        try:
            fn()
        except BaseException as e:  # re-raised below, in the test's thread
            raised.append(e)

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(HANG_GUARD_S)
    if worker.is_alive():
        pytest.fail(f"still blocked after {HANG_GUARD_S:.0f} s: expected a DeviceError matching {match!r}")
    with pytest.raises(DeviceError, match=match):
        if raised:
            raise raised[0]


def test_wrong_address(digits_rpi4_artifact):
    with socket.socket() as s:  # a port that nothing listens on: held, bound, never listening (Linux
        s.bind(("127.0.0.1", 0))  # refuses connections to it), so no other process can take it meanwhile
        port = s.getsockname()[1]
        _expect_device_error(lambda: frugalrt.load(digits_rpi4_artifact, f"rpc://127.0.0.1:{port}"),
                             "cannot reach RPC server")
        _expect_device_error(lambda: frugalrt.load(digits_rpi4_artifact, f"tracker://127.0.0.1:{port}/rpi4"),
                             "cannot reach RPC tracker")


def test_silent_server(digits_rpi4_artifact):
    with socket.socket() as listener:  # accepts connections and never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        _expect_device_error(lambda: frugalrt.load(digits_rpi4_artifact, f"rpc://127.0.0.1:{port}?timeout=2"),
                             "did not answer")


@pytest.fixture
def own_device(device_state, emulation_tools):
    """A device of its own for tests that break it; checked to leave no process behind."""
    rec = start_device("rpi4-emu", name="victim")
    yield rec
    stop_devices([r.name for r in processes.records() if r.name == "victim"])
    assert processes.group_members(rec.pid) == []


def _long_run(session):
    """A remote call that runs for minutes unless interrupted."""
    golden = session.artifact.golden()[0]
    session.set_inputs(*golden)
    evaluator = session.vm.time_evaluator("invoke_stateful", session.dev, number=10**6, repeat=1)
    return lambda: session.call(lambda: evaluator("main"), "a long run")


def test_device_stopped_mid_run(digits_rpi4_artifact, own_device):
    session = frugalrt.load(digits_rpi4_artifact, own_device.address)
    run = _long_run(session)
    stopper = threading.Timer(2.0, lambda: stop_devices(["victim"]))
    stopper.start()
    try:
        _expect_device_error(run, "failed")
    finally:
        stopper.join()
    _expect_device_error(lambda: session(*session.artifact.golden()[0]), "failed|closed")
    session.close()
    assert processes.group_members(own_device.pid) == []


def test_device_frozen_mid_run(digits_rpi4_artifact, own_device):
    session = frugalrt.load(digits_rpi4_artifact, own_device.address + "?timeout=5")
    run = _long_run(session)
    freezer = threading.Timer(1.0, lambda: os.killpg(own_device.pid, signal.SIGSTOP))
    freezer.start()
    try:
        _expect_device_error(run, "did not finish within 5 s")
    finally:
        freezer.join()
        os.killpg(own_device.pid, signal.SIGCONT)
        session.close()


def test_tracker_with_two_devices(digits_rpi4_artifact, device_state, emulation_tools, capsys):
    tracker = start_tracker(name="test-tracker")
    host_port = tracker.address.removeprefix("tracker://")
    devices = [start_device("rpi4-emu", name=f"farm-{i}", tracker=host_port, key="pi") for i in range(2)]
    try:
        device = f"{tracker.address}/pi"
        golden_in, golden_out = frugalrt.runtime.artifact.Artifact(digits_rpi4_artifact).golden()
        session = frugalrt.load(digits_rpi4_artifact, device)
        np.testing.assert_allclose(session(*golden_in)[0], golden_out[0], rtol=1e-4, atol=1e-4)
        session.close()
        assert main(["profile", str(digits_rpi4_artifact), "--device", device, "--devices", "2",
                     "--runs", "5", "--warmup", "1"]) == 0
        out = capsys.readouterr().out
        servers = {d.address for d in devices}
        assert {line.split(" on ")[1].split()[0] for line in out.splitlines()
                if line.startswith("profile of")} == servers  # both devices, each once
        _expect_device_error(lambda: frugalrt.load(digits_rpi4_artifact, f"{tracker.address}/nokey"),
                             "no device with key 'nokey'")
    finally:
        stop_devices([tracker.name] + [d.name for d in devices])
    assert all(processes.group_members(r.pid) == [] for r in [tracker, *devices])
