"""One pipeline run at a time per output directory: a lock file, `<output dir>/.cascade-run.lock`.

Two runs into one output directory would share its MLMD store and serving directories and both
push every stage. `RunLock` creates the lock file atomically (`O_CREAT | O_EXCL`) holding the
owner's pid, host, start time and command line, and removes it when the run ends, however it
ends. A second run refuses with `OutputDirInUse`, whose one-line message names the running
process. A lock left by a run that was killed (its pid no longer runs on this host) is stale: it is
taken over, and the takeover is reported. A lock from another host cannot be checked and is
refused, naming the host (remove the file if that run is gone). Written by hand: TFX has no
such guard (LocalDagRunner runs whatever it is given).
"""
import json
import os
import socket
import sys
import time
from typing import Callable, Dict, Optional

LOCK_FILE = ".cascade-run.lock"


class OutputDirInUse(RuntimeError):
    """Another run holds the output directory (one-line message naming it)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def read_lock(path: str) -> Optional[Dict]:
    """The lock's owner record, {} for an unreadable lock file, None when there is no lock."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class RunLock:
    """`with RunLock(output_dir):` holds the output directory for the duration of a run."""

    def __init__(self, output_dir: str, report: Callable[[str], None] = print):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self._report = report
        self._held = False

    def _owner(self) -> Dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(sys.argv)}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._owner(), f)
        return True

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(3):  # a stale lock is removed and the create retried
            if self._create():
                self._held = True
                return
            owner = read_lock(self.path)
            if owner is None:  # released meanwhile
                continue
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
                self._report(f"taking over the stale lock of a run that no longer runs (pid {pid}, started "
                             f"{owner.get('started', '?')}): {self.path}")
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            who = (f"pid {pid} on {host}, started {owner.get('started', '?')}: {owner.get('command', '?')}"
                   if owner else "an unreadable lock file")
            raise OutputDirInUse(f"output dir {os.path.dirname(self.path)} is in use by another run ({who}); "
                                 f"wait for it, or remove {self.path} if that run is gone")
        raise OutputDirInUse(f"could not lock {self.path}")

    def release(self) -> None:
        if self._held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
