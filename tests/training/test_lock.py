"""RunLock: one training per run directory, released on every exit path, stale locks of dead
processes detected and taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest

from metagrad.errors import MetagradError, RunLockedError
from metagrad.training.lock import LOCK_NAME, RunLock

HOLDER = """
import sys, time
from metagrad.training.lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path / "run") as first:
        assert first.held
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / "run") in message
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "choose another --out" in message
        assert isinstance(info.value, MetagradError)
    # released on exit: acquirable again, and not reported as stale
    with RunLock(tmp_path / "run") as again:
        assert again.stale_holder is None


def test_released_when_the_body_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt), RunLock(tmp_path):
        raise KeyboardInterrupt
    assert (tmp_path / LOCK_NAME).read_text() == ""
    with RunLock(tmp_path):
        pass


def test_lock_file_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["started"].endswith("+00:00")


def test_disabled_lock_does_nothing(tmp_path):
    with RunLock(tmp_path), RunLock(tmp_path, enabled=False) as other:
        assert not other.held


def test_other_process_refused_then_stale_after_sigkill(tmp_path, caplog):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {child.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    # the kernel dropped the flock; the file still names the dead holder: stale, taken over
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid
    with caplog.at_level(logging.DEBUG, logger="metagrad.training.lock"), \
            RunLock(tmp_path) as lock:
        assert lock.stale_holder is not None and lock.stale_holder["pid"] == child.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(str(child.pid) in r.getMessage() and r.levelno == logging.DEBUG
               for r in caplog.records)


def test_garbage_lock_file_is_stale_not_an_error(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"\xff\x00 not json")
    with RunLock(tmp_path) as lock:
        assert lock.stale_holder is not None
