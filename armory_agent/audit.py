"""The agent's audit log: one JSON line per request, fsync'ed, rotated by size, mode 0600.

Writes go through one background thread that appends and fsyncs in groups, so a slow disk
never stalls the event loop while every line still reaches the disk within one fsync.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from armory_agent.errors import StartError

log = logging.getLogger("armory_agent.audit")

_STOP = object()


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        try:
            self._fd = self._open()
        except OSError as e:
            raise StartError(f"cannot open the audit log {path}: {e.strerror or e} "
                             "(check [audit] path in the agent config)") from None
        self._size = os.fstat(self._fd).st_size
        self._thread = threading.Thread(target=self._writer, name="audit", daemon=True)
        self._thread.start()

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # also tightens a file someone created with a looser mode
        return fd

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one line; `time` is added here. Never pass secrets."""
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", **entry}
        self._queue.put(json.dumps(line, separators=(",", ":"), default=str) + "\n")

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(10)
        os.close(self._fd)

    def _rotate(self) -> None:
        os.close(self._fd)
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fd = self._open()
        self._size = 0

    def _writer(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[str] = []
            while True:
                if item is _STOP:
                    stop = True
                else:
                    batch.append(str(item))
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                for line in batch:
                    data = line.encode()
                    if self._size and self._size + len(data) > self.max_bytes:
                        os.fsync(self._fd)
                        self._rotate()
                    os.write(self._fd, data)
                    self._size += len(data)
                if batch:
                    os.fsync(self._fd)
            except OSError as e:  # a full disk must not take the agent down; say so loudly
                log.error("audit log write failed: %s", e)
