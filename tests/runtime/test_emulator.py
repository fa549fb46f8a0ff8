"""Emulated devices: userland set-up (locking, atomic publish), server processes (exact stop, pid
reuse guard, unique names), servers that bind port 0 and report it, and the ``frugalrt device`` CLI
on a native ``host`` server and a real emulated rpi4."""
import subprocess
import sys
import threading
import time
from pathlib import Path

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


def test_an_explicit_name_is_never_taken_twice(state):
    """Item 9: a second server under a running name is a DeviceError naming it and how to stop it;
    only default names are numbered."""
    first = processes.spawn("x", "test", [sys.executable, "-c", FORKING_SERVER], "127.0.0.1", {})
    try:
        with pytest.raises(DeviceError) as err:
            processes.spawn("x", "test", [sys.executable, "-c", FORKING_SERVER], "127.0.0.1", {})
        message = str(err.value)
        assert "\n" not in message and "'x'" in message and "frugalrt device stop x" in message
        assert [(r.name, r.pid) for r in processes.records()] == [("x", first.pid)]  # untouched
        numbered = processes.spawn("x", "test", [sys.executable, "-c", FORKING_SERVER], "127.0.0.1", {},
                                   numbered=True)
        processes.stop(numbered)
        assert numbered.name == "x-2"
    finally:
        processes.stop(first)
    again = processes.spawn("x", "test", [sys.executable, "-c", FORKING_SERVER], "127.0.0.1", {})
    processes.stop(again)  # free again once stopped


def test_concurrent_starts_under_one_name_start_one_server(state):
    started, errors = [], []

    def start():
        try:
            started.append(processes.spawn("same", "test", [sys.executable, "-c", FORKING_SERVER],
                                           "127.0.0.1", {}))
        except DeviceError as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(started) == 1 and len(errors) == 3
        assert all("already running" in str(e) for e in errors)
    finally:
        for rec in started:
            processes.stop(rec)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.compile
def test_host_servers_bind_port_zero_and_names_are_unique(device_state, capsys):
    """A native ``host`` RPC server and a tracker: no port is chosen before they start (no
    bind-then-close race); each binds port 0 and reports the port it got, which answers."""
    from frugalrt.runtime.emulator import start_device, start_tracker, stop_devices
    from frugalrt.runtime.remote import probe, tracker_servers

    tracker = start_tracker(name="port0-tracker")
    assert main(["device", "start", "host", "--name", "dup", "--tracker", tracker.address, "--key", "k"]) == 0
    address = capsys.readouterr().out.strip()
    try:
        first = next(r for r in processes.records() if r.name == "dup")
        assert first.address == address and address.startswith("rpc://127.0.0.1:")
        port = int(address.rsplit(":", 1)[1])
        assert "--port" not in _cmdline(first.pid) and "--port" not in _cmdline(tracker.pid)
        probe("127.0.0.1", port)  # the reported port answers the TVM RPC handshake
        host, _, tport = tracker.address.removeprefix("tracker://").rpartition(":")
        deadline = time.monotonic() + 60  # the server registers from its own thread, after its ready line
        while not tracker_servers(host, int(tport), "k") and time.monotonic() < deadline:
            time.sleep(0.2)
        # the tracker (port 0 too) answers, and has the port the server bound, not a guessed one
        assert [s["addr"][1] for s in tracker_servers(host, int(tport), "k")] == [port]

        assert main(["device", "start", "host", "--name", "dup"]) == 2  # item 9: no silent dup-2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "'dup'" in err and "frugalrt device stop dup" in err
        assert [r.pid for r in processes.records() if r.name.startswith("dup")] == [first.pid]  # no dup-2

        with pytest.raises(DeviceError, match="(?s)exited with code"):  # an explicit port in use
            start_device("host", port=port, name="clash")
        numbered = [start_device("host") for _ in range(2)]  # default names are numbered: host, host-2
        assert numbered[0].name.startswith("host") and numbered[1].name.startswith("host-")
        assert numbered[0].name != numbered[1].name
        assert len({r.address for r in numbered} | {address}) == 3
        stop_devices([r.name for r in numbered])
        assert main(["device", "stop", "dup"]) == 0
        assert processes.group_members(first.pid) == []
    finally:
        stop_devices([r.name for r in processes.records()
                      if r.name in ("dup", "port0-tracker") or r.name.startswith("host")])


@pytest.mark.emulated
def test_device_cli_start_list_stop(device_state, emulation_tools, capsys):
    assert main(["device", "start", "rpi4-emu", "--name", "cli-rpi4"]) == 0
    address = capsys.readouterr().out.strip()
    assert address.startswith("rpc://127.0.0.1:")
    rec = next(r for r in processes.records() if r.name == "cli-rpi4")
    assert rec.address == address and processes.group_members(rec.pid)
    from frugalrt.runtime.remote import probe

    probe("127.0.0.1", int(address.rsplit(":", 1)[1]))  # answers the TVM RPC handshake
    assert "--port" not in _cmdline(rec.pid)  # the emulated server bound port 0 and reported it
    assert main(["device", "list"]) == 0
    assert "cli-rpi4" in capsys.readouterr().out
    assert main(["device", "start", "rpi4-emu", "--name", "cli-rpi4"]) == 2  # names are unique
    assert "frugalrt device stop cli-rpi4" in capsys.readouterr().err
    assert main(["device", "stop", "nope"]) == 2
    assert main(["device", "stop", "cli-rpi4"]) == 0
    assert processes.group_members(rec.pid) == []
    assert all(r.name != "cli-rpi4" for r in processes.records())
