"""One training per run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

Two trainings writing the same run directory would interleave metrics and overwrite each
other's checkpoints, so the run loop holds a :class:`RunLock` for its whole life and a second
training on the same directory stops at once with :class:`~metagrad.errors.RunLockedError`.

Contract:

* The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on an open file description of
  ``RUN_DIR/.lock``. It is refused to any other holder, *including another RunLock in the same
  process* (each acquisition opens the file anew, and flock locks belong to the open file
  description).
* While held, the file holds one JSON line ``{"pid": ..., "host": ..., "started": ...}``
  (start time in ISO 8601 UTC) naming the holder; the refusal message quotes it.
* It is released on every exit path: ``__exit__`` (normal end and any exception, including
  ``KeyboardInterrupt``) unlocks and empties the file; if the process dies (SIGKILL, crash) the
  kernel drops the flock. A non-empty lock file whose flock can be taken is therefore *stale*
  (its writer died); it is overwritten and the dead holder is logged at debug level and kept in
  :attr:`RunLock.stale_holder`.
* The file is never deleted: unlinking a lock file lets a waiter lock the unlinked inode while a
  newcomer locks a fresh one, and both would believe they hold the run.
* Under ``torchrun`` only rank 0 writes the run directory, so only it takes the lock
  (``enabled=rank == 0``); a disabled RunLock does nothing.
* flock is advisory and local: processes on other hosts sharing the directory over NFS may not
  see it.
* A process that forks while holding the lock shares it with its children (same open file
  description): it stays held until they exit too.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from metagrad.errors import RunLockedError

LOCK_NAME = ".lock"
_log = logging.getLogger(__name__)


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The JSON record in the lock file; ``None`` if it is empty, ``{"unparsed": ...}`` if it is
    not a JSON object."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        holder = None
    return holder if isinstance(holder, dict) else {"unparsed": raw[:200].decode(errors="replace")}


class RunLock:
    """Context manager holding the exclusive lock on ``run_dir`` (created if missing).

    ``with RunLock(run_dir, enabled=dist.is_main): train...``. Raises
    :class:`~metagrad.errors.RunLockedError` on entry when another process or RunLock holds it.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.enabled = enabled
        self.stale_holder: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunLockedError`; a no-op when disabled."""
        if not self.enabled:
            return
        if self._fd is not None:
            raise RunLockedError(f"run directory {self.run_dir} is already locked by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(
                    f"run directory {self.run_dir} is in use by another training "
                    f"({_describe(_read_holder(fd))}); wait for it to finish, or choose another "
                    "--out") from None
            self.stale_holder = _read_holder(fd)
            if self.stale_holder is not None:
                _log.debug("overwriting the stale lock %s left by %s (that process is gone)",
                           self.path, _describe(self.stale_holder))
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing the descriptor also drops a flock taken above
            raise
        self._fd = fd

    def release(self) -> None:
        """Empties the lock file and drops the lock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # an empty file: released cleanly, not stale
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
