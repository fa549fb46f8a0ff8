"""Emulated devices: userland set-up (locking, atomic publish), server processes (exact stop, pid
reuse guard), and the ``frugalrt device`` CLI on a real emulated rpi4."""
import subprocess
import sys
import threading
import time

import pytest

from frugalrt.cli import main
from frugalrt.errors import DeviceError
from frugalrt.runtime.emulator import processes, userland

# A server stand-in: forks a child into its group (as TVM's server does per session), reports ready.
FORKING_SERVER = ("import os, time\n"
                  "if os.fork():\n    print('FRUGALRT_READY 1234', flush=True)\n"
                  "time.sleep(120)\n")


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGALRT_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_userland_setup_runs_once_under_concurrency(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def fake_build(dest, log):
        builds.append(dest)
        time.sleep(0.2)  # long enough for every caller to reach the lock
        (dest / "root").mkdir()

    monkeypatch.setattr(userland, "_build", fake_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(userland.ensure_userland(log=lambda m: None)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert len({r.path for r in results}) == 1 and results[0].root.is_dir()
    assert [p.name for p in results[0].path.parent.iterdir() if p.name.startswith(".building")] == []


def test_failed_userland_setup_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def broken_build(dest, log):
        (dest / "root").mkdir()
        raise DeviceError("download failed")

    monkeypatch.setattr(userland, "_build", broken_build)
    with pytest.raises(DeviceError, match="download failed"):
        userland.ensure_userland(log=lambda m: None)
    emulator_dir = tmp_path / "frugalrt" / "emulator"
    assert sorted(p.name for p in emulator_dir.iterdir()) == [".setup.lock"]


def test_stop_ends_the_whole_process_group(state):
    rec = processes.spawn("fake", "test", [sys.executable, "-c", FORKING_SERVER], "127.0.0.1", {})
    try:
        assert rec.address == "127.0.0.1:1234"
        members = processes.group_members(rec.pid)
        assert len(members) == 2 and rec.pid in members
        assert [r.name for r in processes.records()] == ["fake"]
    finally:
        processes.stop(rec)
    assert processes.group_members(rec.pid) == []
    assert processes.records() == [] and not rec.path.exists()


def test_a_reused_pid_is_never_signalled(state):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        rec = processes.ServerRecord("stale", "test", other.pid, 1, "127.0.0.1:1", str(state / "x.log"))
        rec.save()
        assert processes.records() == []  # start time differs: stale, dropped
        processes.stop(rec)
        assert other.poll() is None  # still running: not ours
    finally:
        other.kill()
        other.wait()


def test_a_server_that_dies_at_start_is_reported(state):
    with pytest.raises(DeviceError, match="(?s)exited with code 1.*boom"):
        processes.spawn("dead", "test", [sys.executable, "-c", "print('boom'); raise SystemExit(1)"],
                        "127.0.0.1", {}, timeout=30)
    assert processes.records() == []


@pytest.mark.emulated
def test_device_cli_start_list_stop(device_state, emulation_tools, capsys):
    assert main(["device", "start", "rpi4-emu", "--name", "cli-rpi4"]) == 0
    address = capsys.readouterr().out.strip()
    assert address.startswith("rpc://127.0.0.1:")
    rec = next(r for r in processes.records() if r.name == "cli-rpi4")
    assert rec.address == address and processes.group_members(rec.pid)
    from frugalrt.runtime.remote import probe

    probe("127.0.0.1", int(address.rsplit(":", 1)[1]))  # answers the TVM RPC handshake
    assert main(["device", "list"]) == 0
    assert "cli-rpi4" in capsys.readouterr().out
    assert main(["device", "stop", "nope"]) == 2
    assert main(["device", "stop", "cli-rpi4"]) == 0
    assert processes.group_members(rec.pid) == []
    assert all(r.name != "cli-rpi4" for r in processes.records())
