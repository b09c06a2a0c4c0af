"""The progress channel: worker 0's epoch lines and the tasks' errors, sent to the driver,
and the driver's request to stop, sent back.

Both ends live here. The driver opens a `ProgressListener` (a socket on its own address)
before the barrier stage starts; worker 0's TensorFlow process sends one JSON line per
epoch through a `ProgressSender`, and a barrier task sends an ``error`` message when it
fails in a way a retry cannot fix, so the driver stops the stage at once and raises the
task's own error type. The driver answers an epoch with `STOP` when its caller wants no
more epochs (a search's pruned trial): the worker stops before its next checkpoint, where
otherwise it would train on until Spark's cancellation of the stage reached its process.
`format_epoch` is the console line the driver prints for an epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
# The driver's answer to an epoch when the worker is to stop.
STOP = {"event": "stop"}
# The console's epoch lines and the stage's news come from the training stage itself.
console = logging.getLogger("pipeline.training")


# -- driver end ---------------------------------------------------------------------------
class ProgressListener:
    """A socket on the driver that worker 0 sends one JSON line per epoch to.

    What `on_message` returns, if not None, goes back to the message's sender as a line
    of its own (`STOP`, say).
    """

    def __init__(
        self, host: str, on_message: Callable[[dict[str, Any]], dict[str, Any] | None]
    ) -> None:
        self._on_message = on_message
        self._server = socket.create_server((host, 0))
        self._server.settimeout(0.5)
        self.address = (host, self._server.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="train-progress")

    def __enter__(self) -> ProgressListener:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._server.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("r", encoding="utf-8") as lines:
            for line in lines:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                try:
                    reply = self._on_message(message)
                except Exception:  # a broken console must not stop training
                    log.exception("progress handler failed")
                    continue
                if reply is not None:
                    with contextlib.suppress(OSError):  # the sender is gone: nothing to stop
                        conn.sendall((json.dumps(reply) + "\n").encode("utf-8"))


def log_epoch(record: dict[str, Any]) -> None:
    """The default console: one log line per epoch."""
    console.info("%s", format_epoch(record))


def format_epoch(record: dict[str, Any]) -> str:
    """One console line for an epoch record."""
    parts = [
        f"epoch {int(record['epoch'])}/{int(record.get('epochs', record['epoch']))}",
        f"loss {record['loss']:.4f}",
        f"accuracy {record['accuracy']:.4f}",
    ]
    if "val_loss" in record:
        parts += [
            f"val_loss {record['val_loss']:.4f}",
            f"val_accuracy {record['val_accuracy']:.4f}",
        ]
    parts.append(f"{record['samples_per_second']:,.0f} samples/s")
    if "eta_s" in record:
        parts.append(f"{_duration(record['eta_s'])} left")
    return "  ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# -- worker end ---------------------------------------------------------------------------
class ProgressSender:
    """A connection to the driver's listener; training goes on if the driver is gone.

    `stop_asked` is set once the driver answers `STOP`. `address` None (every worker
    but 0) makes a sender that sends nothing and is never asked to stop.
    """

    def __init__(self, address: list | tuple | None) -> None:
        self._sock = None
        self.stop_asked = threading.Event()
        if address:
            try:
                self._sock = socket.create_connection((address[0], int(address[1])), timeout=10)
            except OSError as exc:
                log.warning("no progress to the driver (%s)", exc)
                return
            threading.Thread(target=self._listen, daemon=True, name="progress-replies").start()

    def _listen(self) -> None:
        """Read the driver's answers until the connection closes."""
        sock, pending = self._sock, b""
        while True:
            try:
                data = sock.recv(4096)
            except TimeoutError:  # the connection's timeout, for sends: keep listening
                continue
            except OSError:
                return
            if not data:
                return
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    if json.loads(line) == STOP:
                        self.stop_asked.set()

    def send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendall((json.dumps(message) + "\n").encode("utf-8"))
        except OSError as exc:
            log.warning("progress connection lost (%s)", exc)
            self._sock = None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # ends `_listen`'s read
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> ProgressSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def send_once(address: list | tuple | None, message: dict[str, Any]) -> None:
    """One message to the driver's listener on a connection of its own."""
    with ProgressSender(address) as sender:
        sender.send(message)
