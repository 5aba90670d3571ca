"""The thin ClientApp of a SuperNode that has a fedmoe worker, and the wire between the two.

Flower starts a new ClientApp process for every message. Without a worker that process imports torch
and loads the model and the client's data each time. With one (node config ``worker=PATH``: a Unix
socket on this machine), the ClientApp only relays: it hands the message's records to the
long-running ``fedmoe worker`` (:mod:`fedmoe.federation.flower.worker`), which keeps the model loaded,
and hands its reply back. This module imports neither torch nor numpy, so the per-message process
costs what Flower's own import costs.

The relay starts the worker when none listens on the socket (again after it died), waits for its
reply at most ``federation.round_timeout_s`` (else ``worker-timeout-s`` of the node config, else
:data:`DEFAULT_TIMEOUT_S`), and kills a worker that did not answer in time, so that the next message
starts a fresh one; the message itself then fails as a client failure.

The wire: a frame is ``FMW1``, the JSON header's and the payload's lengths, the header, the payload.
Records travel as a JSON description (names, dtypes, shapes, values) plus the arrays' raw bytes back
to back: exactly Flower's bytes, no pickle, no size limit but memory.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from .paths import NodeConfigError, node_float, node_int

MAGIC = b"FMW1"
_PREFIX = struct.Struct(">4sIQ")
MAX_HEADER = 64 << 20  # a header (JSON: the run config, metrics) larger than this is not a fedmoe frame
DEFAULT_TIMEOUT_S = 6 * 3600.0  # the longest a relay waits for one reply when neither the run nor the node says
START_TIMEOUT_S = 120.0  # the longest a relay waits for a worker it started to listen
IDLE_EXIT_S = 3600.0  # a worker the relay started exits after this long without a message (worker-idle-s)


class WorkerError(RuntimeError):
    """The worker could not be reached, refused the message, failed on it, or did not answer in time."""


# ------------------------------------------------------------------------------------------ frames
def send_frame(sock: socket.socket, header: dict, payload: bytes | bytearray | memoryview = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(_PREFIX.pack(MAGIC, len(head), len(payload)) + head)
    if len(payload):
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"the other side closed the connection after {got} of {n} bytes")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> tuple[dict, bytearray]:
    magic, nh, npay = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC or nh > MAX_HEADER:
        raise ConnectionError("not a fedmoe worker frame (another program on this socket?)")
    header = json.loads(_recv_exact(sock, nh))
    if not isinstance(header, dict):
        raise ConnectionError("a fedmoe worker frame whose header is not an object")
    return header, _recv_exact(sock, npay)


# ------------------------------------------------------------------------------------------ records
def records_to_wire(rd) -> tuple[dict, bytes]:
    """A Flower RecordDict as (a JSON-able description, the arrays' bytes back to back)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    desc, chunks, offset = {}, [], 0
    for name, rec in rd.items():
        if isinstance(rec, ArrayRecord):
            arrays = []
            for key, arr in rec.items():
                arrays.append([key, arr.dtype, list(arr.shape), arr.stype, offset, len(arr.data)])
                chunks.append(arr.data)
                offset += len(arr.data)
            desc[name] = {"type": "arrays", "arrays": arrays}
        elif isinstance(rec, (MetricRecord, ConfigRecord)):
            values = dict(rec)
            if any(isinstance(x, bytes) for v in values.values() for x in (v if isinstance(v, list) else [v])):
                raise TypeError(f"record '{name}' holds bytes, which the worker wire does not carry")
            desc[name] = {"type": "metrics" if isinstance(rec, MetricRecord) else "config", "values": values}
        else:
            raise TypeError(f"record '{name}' is a {type(rec).__name__}, which the worker wire does not carry")
    return desc, b"".join(chunks)


def records_from_wire(desc: dict, payload) -> object:
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    rd, view = RecordDict(), memoryview(payload)
    for name, rec in desc.items():
        if rec["type"] == "arrays":
            arrays = {key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(view[off : off + n]))
                      for key, dtype, shape, stype, off, n in rec["arrays"]}
            rd[name] = ArrayRecord(array_dict=arrays)
        elif rec["type"] == "metrics":
            rd[name] = MetricRecord(rec["values"])
        else:
            rd[name] = ConfigRecord(rec["values"])
    return rd


# ------------------------------------------------------------------------------------------ the address
def worker_socket(node_config) -> Path | None:
    """The worker's socket named by a SuperNode's node config (``worker``), or None (no worker)."""
    value = node_config.get("worker") if node_config else None
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        raise NodeConfigError(f"node config worker = '{value}': give the worker's Unix socket as an absolute path "
                         "(e.g. worker=\"/var/lib/fedmoe/worker.sock\")")
    # the worker serves its socket's resolved path, and keeps its lock and pid files beside it: a socket path that
    # is a symbolic link (or under one) is followed here too, or the relay would find neither and never stop a
    # hung worker
    return path.resolve()


def lock_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".lock")


def pid_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".pid")


def log_path(sock: Path) -> Path:
    return sock.with_name(sock.name + ".log")


def relay_timeout(options: dict, node_config) -> float:
    """How long the relay waits for one reply: the run's ``federation.round_timeout_s``, else the node's
    ``worker-timeout-s``, else :data:`DEFAULT_TIMEOUT_S` (twice that for an evaluation that also holds the global
    model's: :func:`relay`)."""
    import yaml

    tree = yaml.safe_load(options.get("fedmoe-config") or "{}") or {}
    value = (tree.get("federation") or {}).get("round_timeout_s")
    if value is None:
        return node_float(node_config, "worker-timeout-s", DEFAULT_TIMEOUT_S, example="3600")
    return float(value)


# ------------------------------------------------------------------------------------------ the relay
def _connect(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except BaseException:
        s.close()
        raise
    return s


def _worker_groups(path: Path) -> list[int]:
    """The process groups of the worker on ``path`` (its pid file: one per line)."""
    try:
        return [int(x) for x in pid_path(path).read_text().split()]
    except (OSError, ValueError):
        return []


def worker_alive(path: Path) -> bool:
    """A worker holds the socket's lock file for its whole life."""
    lock = lock_path(path)
    if not lock.exists():
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def start_worker(path: Path, node_config, wait_s: float = START_TIMEOUT_S) -> None:
    """Start ``fedmoe worker`` on ``path`` in its own session (it outlives this process; its output goes
    to ``PATH.log``), unless one is already running; return once it accepts connections."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    proc = None
    if not worker_alive(path):
        nproc = node_int(node_config, "worker-nproc", 1, lo=1)
        idle = node_float(node_config, "worker-idle-s", IDLE_EXIT_S, lo=1.0, example="3600", inclusive=True)
        cmd = [sys.executable, "-m", "fedmoe.cli", "worker", "--socket", str(path), "--nproc", str(nproc),
               "--idle-exit-s", str(idle)]
        with open(log_path(path), "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with _connect(path, 5.0) as s:
                send_frame(s, {"op": "ping"})
                recv_frame(s)
            return
        except OSError:
            if proc is not None and proc.poll() is not None and not worker_alive(path):
                # (its log's lines are not quoted: this text reaches the server, and the log may quote the data)
                raise WorkerError(f"the fedmoe worker started on {path} exited ({proc.returncode}): see its log "
                                  f"{log_path(path)} on this node") from None
            if time.monotonic() > deadline:
                raise WorkerError(f"the fedmoe worker on {path} did not start within {wait_s:g} s; see "
                                  f"{log_path(path)}") from None
            time.sleep(0.1)


def kill_worker(path: Path) -> None:
    """Kill the worker on ``path`` and its ranks (its process groups) while it still holds its lock."""
    groups = _worker_groups(path)
    if not groups or not worker_alive(path):
        return
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 10
    while worker_alive(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def ask_worker(path: Path, header: dict, payload=b"", timeout: float = DEFAULT_TIMEOUT_S,
               node_config=None, start: bool = True) -> tuple[dict, bytearray]:
    """Send one request to the worker on ``path`` (starting it when none runs and ``start``) and wait at
    most ``timeout`` s in all for its reply (a worker serving other SuperNodes' messages first keeps this
    one in its queue); a worker that does not answer in time is killed."""
    deadline = time.monotonic() + timeout
    try:
        sock = _connect(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        if not start:
            raise WorkerError(f"no fedmoe worker listens on {path}") from None
        start_worker(path, node_config)
        sock = _connect(path, max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        sock = None
    if sock is None:
        kill_worker(path)
        raise WorkerError(f"the fedmoe worker on {path} did not take the message within {timeout:g} s; it was "
                          "stopped (the next message starts a new one)")
    with sock:
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            try:
                send_frame(sock, header, payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # a worker that refused the connection said why before closing it: read that below
            reply, body = recv_frame(sock)
        except TimeoutError:
            kill_worker(path)
            raise WorkerError(f"the fedmoe worker on {path} did not answer within {timeout:g} s; it was stopped "
                              "(the next message starts a new one)") from None
        except (ConnectionError, OSError) as e:
            raise WorkerError(f"the fedmoe worker on {path} failed ({e}); the next message starts a new one "
                              f"(its log: {log_path(path)})") from None
    if not reply.get("ok"):
        raise WorkerError(reply.get("error") or "the worker refused the message")
    return reply, body


def relay(path: Path, kind: str, content, options: dict, node_config) -> object:
    """The ClientApp's work with a worker: the message's records to the worker, its reply's records back."""
    desc, payload = records_to_wire(content)
    header = {"op": "handle", "kind": kind, "records": desc, "options": dict(options),
              "node": dict(node_config)}
    timeout = relay_timeout(options, node_config)
    # the client's own evaluation and the global model's (records.ALSO: the relay imports no torch)
    if kind == "evaluate" and "also.tensors" in content:
        timeout *= 2
    reply, body = ask_worker(path, header, payload, timeout, node_config)
    return records_from_wire(reply["records"], body)
