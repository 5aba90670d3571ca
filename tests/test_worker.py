"""The client worker beside a SuperNode (``fedmoe worker``) and the thin ClientApp that relays to it:
records cross the wire exactly, the relay imports no torch, the socket admits only its own user and the
node it serves, and ranks that train a client together (``--nproc``) give the one-rank result."""

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import flwr  # noqa: F401  (the flower extra is part of the test set-up)
import pytest
import torch

from fedmoe.federation.flower.records import from_records, to_records
from fedmoe.federation.flower.relay import (
    WorkerError,
    ask_worker,
    kill_worker,
    pid_path,
    records_from_wire,
    records_to_wire,
    recv_frame,
    send_frame,
    worker_alive,
)
from fedmoe.messages import Message

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def test_records_cross_the_worker_wire_exactly():
    g = torch.Generator().manual_seed(0)
    msg = Message(tensors={"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
                           "c": torch.arange(6).reshape(2, 3), "e": torch.zeros(0, 3)},
                  scalars={"n_train": 17, "w": 0.1 + 0.2, "big": 2**53 + 1}, header={"kind": "train", "round": 2})
    rd = to_records(msg, {"x": [1.5, None, "s"], "nan": float("nan")})
    desc, payload = records_to_wire(rd)
    desc = json.loads(json.dumps(desc))  # what the socket carries
    back, info = from_records(records_from_wire(desc, payload))
    assert back.header == msg.header and back.scalars == msg.scalars and type(back.scalars["big"]) is int
    assert info["x"] == [1.5, None, "s"] and info["nan"] != info["nan"]
    for n, t in msg.tensors.items():
        assert back.tensors[n].dtype == t.dtype and back.tensors[n].shape == t.shape and torch.equal(back.tensors[n], t)
    assert payload == b"".join(a.data for a in rd["tensors"].values())  # Flower's own bytes, nothing added


def test_the_relay_imports_neither_torch_nor_the_client():
    """A SuperNode starts a process per message: with a worker it must not pay for torch."""
    code = ("import sys; import fedmoe.federation.flower.apps as a; assert a.client_app is not None; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('fedmoe.federation.flower.client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_ranks_that_train_together_give_the_one_rank_result(tmp_path):
    """Two gloo ranks, each its share of every micro-batch (3 rows: shares of 1 and 2), a loss term and
    gradient clipping: the same step losses, tokens, routed counts, mean gradients and trained tensors as
    one rank, to float rounding. What training draws at random for its rows (dropout; none here) each rank draws
    from its own stream: rank 0 from the client's seed, rank 1 from another."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    script = str(HERE / "dp_rank.py")
    subprocess.run([sys.executable, script, str(tmp_path / "single.pt")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script,
                    str(tmp_path / "ranks.pt")], env=env, check=True, timeout=300, capture_output=True)
    one = torch.load(tmp_path / "single.pt", weights_only=False)
    r0, r1 = (torch.load(tmp_path / f"ranks-{r}.pt", weights_only=False) for r in (0, 1))
    assert one["draws_seed"] == r0["draws_seed"] == 7 and r1["draws_seed"] not in (7, r0["draws_seed"])
    assert one["loss"] == pytest.approx(r0["loss"], rel=1e-5) and r0["loss"] == r1["loss"]
    assert one["tokens"] == r0["tokens"] and torch.equal(one["counts"], r0["counts"])
    assert torch.equal(one["per_layer"], r0["per_layer"])
    for n, t in one["update"].items():
        assert torch.equal(r0["update"][n], r1["update"][n]), n  # the ranks stay identical
        # each tensor's update and mean gradient, to float rounding relative to the tensor's largest entry
        assert (t - r0["update"][n]).abs().max() <= 1e-4 * t.abs().max() and t.abs().max() > 0, n
        g = one["mean_gradient"][n]
        assert (g - r0["mean_gradient"][n]).abs().max() <= 1e-4 * g.abs().max(), n


# ------------------------------------------------------------------------------------------ a live worker
def _start(path: Path, node_config: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedmoe.cli", "worker", "--socket", str(path)]
    if node_config:
        cmd += ["--node-config", node_config]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not worker_alive(path) or not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.1)
    return proc


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "w.sock"
    proc = _start(path, f'partition-id=0 state-dir="{tmp_path / "state"}"')
    yield path
    kill_worker(path)
    proc.wait(timeout=30)


def test_the_worker_socket_admits_only_its_user_and_its_node(worker, tmp_path):
    assert stat.S_IMODE(worker.stat().st_mode) == 0o600
    reply, _ = ask_worker(worker, {"op": "ping"}, start=False)
    assert reply["ok"] and reply["ranks"] == 1 and reply["clients"] == []
    # a SuperNode with another identity is refused, with both identities named (nothing is loaded)
    options = {"fedmoe-config": "model: {name: 'builtin:tiny-olmoe'}\n"}
    with pytest.raises(WorkerError, match=r"serves partition-id=0 .* has partition-id=1"):
        ask_worker(worker, {"op": "handle", "kind": "query", "records": {}, "options": options,
                            "node": {"partition-id": 1, "state-dir": str(tmp_path / "state")}}, start=False)
    # the same SuperNode with a privacy budget the worker was not started with: refused, as neither may drop it
    with pytest.raises(WorkerError, match=r"started with the privacy budget None, .* has NodeBudget\(epsilon=8\.0"):
        ask_worker(worker, {"op": "handle", "kind": "query", "records": {}, "options": options,
                            "node": {"partition-id": 0, "state-dir": str(tmp_path / "state"), "dp-epsilon": 8}},
                   start=False)
    # garbage on the socket: that connection ends, the worker goes on
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(worker))
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
        s.settimeout(10)
        try:
            assert s.recv(10) == b""  # closed
        except ConnectionResetError:  # closed with our bytes unread
            pass
    # a second worker on the same socket is refused, naming the first
    second = subprocess.run([sys.executable, "-m", "fedmoe.cli", "worker", "--socket", str(worker)], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another fedmoe worker" in second.stderr
    assert ask_worker(worker, {"op": "ping"}, start=False)[0]["ok"]


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root to switch users")
def test_another_user_is_refused():
    """As another user (uid 65534), in a directory that user may enter: the socket's mode 0600 refuses the
    connection; with the mode opened up, the worker itself refuses it (SO_PEERCRED), and goes on serving
    its own user."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        path = Path(d) / "w.sock"
        proc = _start(path)
        try:
            code = ("import os, sys, socket\nfrom fedmoe.federation.flower.relay import send_frame, recv_frame\n"
                    "os.setgid(65534); os.setuid(65534)\n"
                    "s = socket.socket(socket.AF_UNIX)\n"
                    "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES'); raise SystemExit\n"
                    "try:\n    send_frame(s, {'op': 'ping'})\nexcept BrokenPipeError:\n    pass\n"
                    "print(recv_frame(s)[0])\n")
            as_nobody = [sys.executable, "-c", code, str(path)]
            out = subprocess.run(as_nobody, capture_output=True, text=True, env=ENV, timeout=60)
            assert out.stdout.strip() == "EACCES", out.stdout + out.stderr
            os.chmod(path, 0o666)
            out = subprocess.run(as_nobody, capture_output=True, text=True, env=ENV, timeout=60)
            assert "refused: user id 65534" in out.stdout and "'ok': False" in out.stdout, out.stdout + out.stderr
            assert ask_worker(path, {"op": "ping"}, start=False)[0]["ok"]
        finally:
            kill_worker(path)
            proc.wait(timeout=30)


def test_a_relay_gives_up_on_a_silent_worker_and_stops_it(tmp_path):
    """A process that holds the socket and never answers (a hung worker): the relay waits its timeout, kills
    it, and says so; a worker that cannot start is reported with its log, not waited for."""
    path = tmp_path / "hung.sock"
    proc = _start(path)
    os.kill(proc.pid, 19)  # SIGSTOP: connected, never answers
    t0 = time.time()
    with pytest.raises(WorkerError, match="did not answer within 2 s; it was stopped"):
        ask_worker(path, {"op": "ping"}, timeout=2.0, start=False)
    assert 2.0 <= time.time() - t0 < 30
    proc.wait(timeout=30)
    assert not worker_alive(path) and proc.returncode == -9
    # nothing listens now; with start=False the relay says so, with start it would start a new worker
    with pytest.raises(WorkerError, match="no fedmoe worker listens"):
        ask_worker(path, {"op": "ping"}, start=False)
    assert pid_path(path).is_file()  # left by the killed worker; the next one replaces it


def test_frames_refuse_what_is_not_a_frame():
    a, b = socket.socketpair()
    with a, b:
        send_frame(a, {"op": "ping", "x": [1, 2]}, b"\x00\x01")
        assert recv_frame(b) == ({"op": "ping", "x": [1, 2]}, bytearray(b"\x00\x01"))
        a.sendall(b"HTTP" + b"\x00" * 12)
        with pytest.raises(ConnectionError, match="not a fedmoe worker frame"):
            recv_frame(b)


def test_an_idle_worker_exits_and_leaves_no_socket(tmp_path):
    """A worker the relay started must not hold the model (and a GPU) for ever after the run: with
    --idle-exit-s it exits once no message came for that long, removing its socket and pid file."""
    path = tmp_path / "idle.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "worker", "--socket", str(path), "--idle-exit-s", "2"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "no message for 2 s: exiting" in out, out
    assert not path.exists() and not pid_path(path).exists() and not worker_alive(path)


def test_a_hostile_run_id_is_refused_by_the_worker(worker, tmp_path):
    """A message whose run_id is a path ('../../x') would make a SuperNode write, prune and load its private
    store outside its state directory: the worker refuses it and writes nothing."""
    import yaml

    from fedmoe.config import config_to_dict, load_config
    from fedmoe.federation.flower.relay import records_to_wire

    cfg = load_config(None, ["model.name=builtin:tiny-olmoe", "data.max_examples=40", "data.max_length=32",
                             "data.partition.num_clients=2", "lora.rank=2"])
    options = {"fedmoe-config": yaml.safe_dump(config_to_dict(cfg), sort_keys=False)}
    desc, payload = records_to_wire(to_records(Message(header={"kind": "query", "round": 0, "run_id": "../../x"})))
    before = set(tmp_path.rglob("*"))
    with pytest.raises(WorkerError, match="run_id '../../x' is not a plain name"):
        ask_worker(worker, {"op": "handle", "kind": "query", "records": desc, "options": options,
                            "node": {"partition-id": 0, "state-dir": str(tmp_path / "state")}}, payload, start=False)
    created = {p for p in set(tmp_path.rglob("*")) - before if "state" in p.parts or p.parent == tmp_path.parent}
    assert not created and not (tmp_path.parent / "x").exists()
