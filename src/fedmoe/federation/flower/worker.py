"""``fedmoe worker``: the client half of a fedmoe run in one long-running process beside a SuperNode.

A SuperNode starts a new ClientApp process for every message; with ``worker=PATH`` in its node config
that process only relays (:mod:`.relay`) to this worker, which loads the model, the tokenizer and the
client's data once (per run) and keeps them, on the GPU when there is one. The private store stays
on the client's disk as without a worker, so a worker that is restarted (by the relay, after it died
or hung) continues from the store of the last round it finished.

Only processes of the worker's own user reach it: its socket is created with mode 0600 and, where the
system tells (Linux ``SO_PEERCRED``), a connection from another user id is refused. A worker started
with ``--node-config`` serves only the SuperNode with that identity (partition-id, data-path,
state-dir) and refuses messages of any other.

``--nproc N`` trains each client on N ranks together (:class:`fedmoe.train.Parallel`): the command
starts ``torchrun`` with N copies of itself; rank 0 serves the socket and passes each message to the
others; all train, rank 0 answers, keeps the private store and evaluates.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from .relay import (
    lock_path,
    pid_path,
    records_from_wire,
    records_to_wire,
    recv_frame,
    send_frame,
)

REQUEST_TIMEOUT_S = 60.0  # a connection must deliver its request (and take its reply) within this


class WorkerBusy(RuntimeError):
    pass


def parse_node_config(text: str | None) -> dict:
    """A node config as the SuperNode's ``--node-config`` takes it (``partition-id=0 state-dir="/x"``)."""
    if not text:
        return {}
    from flwr.common.config import parse_config_args

    return dict(parse_config_args([text]))


def peer_uid(conn: socket.socket) -> int | None:
    """The user id of the process at the other end of a Unix socket (None where the system does not say)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    fmt = "3i"
    _, uid, _ = struct.unpack(fmt, conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
    return uid


class Worker:
    """One worker: its socket, its lock, and the clients it keeps (``serves``: the node config it was
    started for, or None to serve the SuperNode that relays to it)."""

    def __init__(self, path: Path, serves: dict | None = None, parallel=None, ctrl_group=None, log=print,
                 idle_exit_s: float | None = None):
        """``idle_exit_s``: exit after this long without a message (a worker the relay started: it holds
        the model, on the GPU, after the run has ended; the next message starts it again)."""
        from .client import ClientCache

        self.path, self.serves, self.parallel, self.ctrl, self.log = Path(path), serves or None, parallel, ctrl_group, log
        self.idle_exit_s = idle_exit_s
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.cache = ClientCache(parallel, cuda_index=local_rank if parallel is not None else None)
        self.lead = parallel is None or parallel.rank == 0
        self._lock = None
        self.sock: socket.socket | None = None

    # ---------------------------------------------------------------------------------- the socket
    def bind(self) -> None:
        path = self.path
        if len(os.fsencode(path)) > 100:
            raise ValueError(f"the worker socket path {path} is {len(os.fsencode(path))} bytes long; Unix sockets "
                             "take at most about 100: choose a shorter path")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = open(lock_path(path), "a")  # noqa: SIM115 -- held (locked) for the worker's life
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = pid_path(path).read_text().strip() if pid_path(path).is_file() else "?"
            raise WorkerBusy(f"another fedmoe worker (pid {pid}) serves {path}; stop it first "
                             f"(kill {pid}) or choose another --socket") from None
        path.unlink(missing_ok=True)  # a socket left by a worker that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(128)  # SuperNodes sharing a worker queue here while it serves one message at a time
        self.sock = sock
        pid_path(path).write_text("".join(f"{g}\n" for g in self.groups))
        self.log(f"fedmoe worker {os.getpid()} listening on {path}"
                 + (f" ({self.parallel.world} ranks)" if self.parallel else ""))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.path.unlink(missing_ok=True)
            pid_path(self.path).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ---------------------------------------------------------------------------------- serving
    @property
    def groups(self) -> list[int]:
        """The process groups that make up this worker (torchrun's and each rank's: torchrun starts every
        rank in a session of its own), which the relay kills to stop it."""
        groups = [int(g) for g in os.environ.get("FEDMOE_WORKER_LAUNCHER", "").split() if g]
        if self.parallel is None:
            return groups + [os.getpgid(0)]
        import torch
        import torch.distributed as dist

        mine = torch.tensor([os.getpgid(0)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(self.parallel.world)]
        dist.all_gather(every, mine, group=self.ctrl)
        return groups + [int(t) for t in every]

    def serve_forever(self) -> None:
        if not self.lead:
            self.groups  # noqa: B018 -- takes part in rank 0's gather
            while self._follow():
                pass
            return
        self.bind()
        self.sock.settimeout(self.idle_exit_s)
        try:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    self.log(f"no message for {self.idle_exit_s:g} s: exiting (the next message starts a worker again)")
                    return
                with conn:
                    conn.settimeout(None)
                    self._serve(conn)
        finally:
            if self.parallel is not None:
                self._broadcast(b"")  # the other ranks stop
            self.close()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        uid = peer_uid(conn)
        try:
            if uid is not None and uid != os.geteuid():
                self.log(f"refused a connection from user id {uid} (this worker runs as {os.geteuid()})")
                send_frame(conn, {"ok": False, "error": f"refused: user id {uid} may not use the fedmoe worker of "
                                                        f"user id {os.geteuid()}"})
                return
            header, payload = recv_frame(conn)
            conn.settimeout(None)
            reply, body = self.answer(header, payload)
            conn.settimeout(REQUEST_TIMEOUT_S)
            send_frame(conn, reply, body)
        except (ConnectionError, OSError, ValueError) as e:
            self.log(f"a connection ended early: {e}")

    def answer(self, header: dict, payload) -> tuple[dict, bytes]:
        """A request -> (the reply's header, its payload); never raises for a bad request."""
        op = header.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid(), "clients": [list(k[1:]) for k in self.cache.clients],
                    "ranks": 1 if self.parallel is None else self.parallel.world}, b""
        if op != "handle":
            return {"ok": False, "error": f"unknown request '{op}'"}, b""
        try:
            node = header["node"]
            why = self._refuse(node, header["options"])
            if why:
                self.log(why)
                return {"ok": False, "error": why}, b""
            if self.parallel is not None:
                frame = json.dumps(header).encode()
                self._broadcast(len(frame).to_bytes(8, "big") + frame + bytes(payload))
            return self._handle(header, payload)
        except Exception as e:  # noqa: BLE001 -- the relay turns it into the client's failure; the reason is logged
            self.log(traceback.format_exc())  # here, and goes to the server only where it quotes no data
            from .paths import node_error_text

            return {"ok": False, "error": node_error_text(e, header.get("node"))}, b""

    def _refuse(self, node: dict, options: dict) -> str | None:
        if not self.serves:
            return None
        from .client import node_identity

        mine, theirs = node_identity(self.serves, options), node_identity(node, options)
        if mine != theirs:
            return (f"refused: this worker serves partition-id={mine[0]} data-path={mine[1]} state-dir={mine[2]}, "
                    f"the SuperNode relaying to it has partition-id={theirs[0]} data-path={theirs[1]} "
                    f"state-dir={theirs[2]}: give each SuperNode its own worker socket")
        from .budget import node_budget

        if node_budget(self.serves) != node_budget(node):  # its privacy budget too: neither may drop the other's
            return (f"refused: this worker was started with the privacy budget {node_budget(self.serves)}, the SuperNode "
                    f"relaying to it has {node_budget(node)}: give both the same dp-epsilon, dp-delta and dp-evaluation")
        return None

    def _handle(self, header: dict, payload) -> tuple[dict, bytes]:
        kind, node = header["kind"], header["node"]
        t0 = time.perf_counter()
        self.log(f"partition {node.get('partition-id')}: {kind} ...")
        content = self.cache.reply(kind, records_from_wire(header["records"], payload), header["options"], node)
        self.log(f"partition {node.get('partition-id')}: {kind} done in {time.perf_counter() - t0:.2f} s")
        if content is None:
            return {"ok": True}, b""
        desc, body = records_to_wire(content)
        return {"ok": True, "records": desc}, body

    # ---------------------------------------------------------------------------------- ranks
    def _broadcast(self, data: bytes | None) -> bytes:
        """Rank 0's bytes to every rank (b"": stop)."""
        import torch
        import torch.distributed as dist

        n = torch.tensor([len(data) if self.lead else 0], dtype=torch.int64)
        dist.broadcast(n, 0, group=self.ctrl)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.lead and len(data)
               else torch.empty(int(n), dtype=torch.uint8))
        if int(n):
            dist.broadcast(buf, 0, group=self.ctrl)
        return data if self.lead else buf.numpy().tobytes()

    def _follow(self) -> bool:
        """A rank other than 0: take part in one message; False once rank 0 stops."""
        data = self._broadcast(None)
        if not data:
            return False
        nh = int.from_bytes(data[:8], "big")
        header = json.loads(data[8 : 8 + nh])
        try:
            self._handle(header, memoryview(data)[8 + nh :])
        except Exception:  # noqa: BLE001 -- rank 0 reports the failure; this rank waits for the next message
            self.log(traceback.format_exc())
        return True


def _become_group_leader() -> None:
    """Give the worker (and the ranks it starts) a process group of its own, which the relay kills as one."""
    try:
        if os.getpgid(0) != os.getpid():
            os.setsid()
    except OSError:
        pass


def _init_ranks():
    """Inside torchrun: the process group, this rank's :class:`~fedmoe.train.Parallel` and a gloo group
    for the messages rank 0 passes on (it waits for the next message as long as it takes)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from ...train import Parallel

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    ctrl = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    return Parallel(dist.get_rank(), dist.get_world_size()), ctrl


def main(socket_path: str, node_config: str | None = None, nproc: int = 1, idle_exit_s: float | None = None) -> None:
    """The ``fedmoe worker`` command (with ``--nproc N`` > 1: starts torchrun, which runs this N times)."""
    path = Path(socket_path).expanduser().resolve()
    serves = parse_node_config(node_config)
    if nproc > 1 and "RANK" not in os.environ:
        _become_group_leader()
        # the ranks read the socket and node config from the environment (torchrun would take options after
        # the module for its own)
        os.environ.update({"FEDMOE_WORKER_SOCKET": str(path), "FEDMOE_WORKER_NODE_CONFIG": node_config or "",
                           "FEDMOE_WORKER_LAUNCHER": str(os.getpgid(0)),
                           "FEDMOE_WORKER_IDLE_EXIT_S": "" if idle_exit_s is None else str(idle_exit_s)})
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={nproc}", "-m", "fedmoe.federation.flower.worker"])
    if "RANK" not in os.environ:
        _become_group_leader()
    parallel = ctrl = None
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parallel, ctrl = _init_ranks()
    rank = 0 if parallel is None else parallel.rank

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}{'' if parallel is None else f' rank {rank}'}] {line}", flush=True)

    worker = Worker(path, serves, parallel, ctrl, log, idle_exit_s)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()


if __name__ == "__main__":  # a rank under torchrun (``fedmoe worker --nproc N`` starts them)
    idle = os.environ.get("FEDMOE_WORKER_IDLE_EXIT_S")
    main(os.environ["FEDMOE_WORKER_SOCKET"], os.environ.get("FEDMOE_WORKER_NODE_CONFIG") or None,
         idle_exit_s=float(idle) if idle else None)
