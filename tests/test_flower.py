"""fedmoe on Flower: messages as records exactly; Flower's simulation gives the in-process numbers; a
real SuperLink with two SuperNodes (separate processes on 127.0.0.1) runs FLEx, one SuperNode loading
the model per message, the other relaying to its `fedmoe worker`, each client's private state only on
its own node's disk; a SuperNode killed mid-run (FLAME) takes its running worker back; a worker killed
mid-train is restarted; a worker with two ranks; a killed simulation resumed exactly."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


import pytest
import torch

import flwr  # noqa: F401  (the flower extra is part of the test set-up: `make test` installs it)
from fedmoe.config import load_config
from fedmoe.federation import run_federated
from fedmoe.federation.flower.localdeploy import LocalDeployment
from fedmoe.federation.flower.relay import kill_worker
from fedmoe.federation.flower.records import also_from_records, from_records, to_records
from fedmoe.messages import Message
from helpers import interruptible

BIN = Path(sys.executable).parent
TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-olmoe", "data.max_examples=200", "data.max_length=48", "data.partition.num_clients=2",
        "train.max_steps=2", "train.batch_size=2", "train.lr=0.05", "eval.max_examples=2", "eval.max_new_tokens=3",
        "data.max_test_per_client=3", "lora.rank=4", "federation.rounds=2"]
METHODS = {"fedit": ["algorithm.name=fedit"],
           "flame": ["algorithm.name=flame", "algorithm.budgets.top_k=[2,1]"],
           "flex": ["algorithm.name=flex", "lora.experts=false", "algorithm.flex.calibration_size=4"]}
# on Flower's simulation: FC-MoE (residuals in the downlink, a 3rd round) here, FLAME (private rescalers, activation
# counts in the reply, its validation loss) in the stopped simulation's test, with one CPU per client; FedIT's and
# FLEx's numbers are checked on the real deployment below
# FC-MoE's clients reserve both CPUs of a two-core machine: one simulated client at a time, in one Ray actor
SIM_METHODS = {"fcmoe": ["algorithm.name=fcmoe", "federation.rounds=3", "federation.simulation.client_cpus=2"]}


def _env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
            **extra}


def _sets(args):
    return [x for a in args for x in ("--set", a)]


def _local(tmp_path, name, sets, threads=1):
    """The in-process run, with the thread count the Flower clients use (kernels sum in another order
    with another thread count, and Adam turns those last bits into different steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return run_federated(load_config(None, TINY + sets + [f"output_dir={tmp_path}", f"name={name}"]),
                             log=lambda *a: None)[0]
    finally:
        torch.set_num_threads(before)


def _descendants(pid: int) -> set[int]:
    """The processes ``pid`` started and theirs, alive now (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200]
    except OSError:
        return f"{pid} (gone)"


def _same_numbers(a, b):
    assert [c["loss"] for c in a["clients"]] == [c["loss"] for c in b["clients"]]
    assert [c["rouge_l"] for c in a["clients"]] == [c["rouge_l"] for c in b["clients"]]
    assert [(c["bytes_up"], c["bytes_down"]) for c in a["clients"]] == [(c["bytes_up"], c["bytes_down"])
                                                                      for c in b["clients"]]
    # the global model: the in-process runtime evaluates it on the union of the test sets in one pass,
    # Flower's clients each on their own test set (other batches): equal up to float rounding
    assert b["global"]["loss"] == pytest.approx(a["global"]["loss"], rel=1e-6)
    assert [c.get("val_loss") for c in a["clients"]] == [c.get("val_loss") for c in b["clients"]]
    assert [c.get("n_val") for c in a["clients"]] == [c.get("n_val") for c in b["clients"]]
    if "val_loss" in a["global"]:
        assert a["global"]["val_loss"] > 0 and b["global"]["val_loss"] == pytest.approx(a["global"]["val_loss"], rel=1e-6)
        assert b["global"]["val_loss_lowest"]["round"] == a["global"]["val_loss_lowest"]["round"]


def test_messages_travel_as_records_exactly():
    g = torch.Generator().manual_seed(0)
    msg = Message(tensors={"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
                           "c": torch.arange(6).reshape(2, 3), "d": torch.randn(2, generator=g).half()},
                  scalars={"n_train": 17, "rank": 3, "w": 0.25}, header={"kind": "train", "round": 2})
    back, info = from_records(to_records(msg, {"x": [1, 2]}))
    assert info == {"x": [1, 2]} and back.header == msg.header and back.scalars == msg.scalars
    for n, t in msg.tensors.items():
        assert back.tensors[n].dtype == t.dtype and torch.equal(back.tensors[n], t)
    assert back.nbytes() == msg.nbytes() == 12 * 4 + 5 * 2 + 6 * 8 + 2 * 2 + 3 * 8
    # a second message beside it (an evaluation's global model): what it shares with the first, by name and value,
    # travels once; the rest (another value, another dtype, a name of its own) travels, and both come back exactly
    also = Message(tensors={"a": msg.tensors["a"].clone(), "b": msg.tensors["b"] + 1, "c": msg.tensors["c"].float(),
                            "e": torch.ones(4, dtype=torch.bfloat16)}, scalars={"k": 2}, header={"kind": "evaluate"})
    rd = to_records(msg, None, also)
    assert sorted(rd["also.tensors"].keys()) == ["b", "c", "e"] and json.loads(rd["also.header"]["shared"]) == ["a"]
    first, _ = from_records(rd)
    second = also_from_records(rd, first)
    assert second.header == also.header and second.scalars == also.scalars and set(second.tensors) == set(also.tensors)
    for n, t in also.tensors.items():
        assert second.tensors[n].dtype == t.dtype and torch.equal(second.tensors[n], t)
    assert second.tensors["a"].data_ptr() != first.tensors["a"].data_ptr()  # loading one cannot change the other
    assert also_from_records(to_records(msg), msg) is None
    for shared in (["zz"], "a", ["b"]):  # a name the first lacks, not a list, a name the second also holds
        bad = to_records(msg, None, also)
        bad["also.header"]["shared"] = json.dumps(shared)
        with pytest.raises(ValueError, match="shared"):
            also_from_records(bad, first)


def test_a_train_report_travels_as_json_exactly():
    from fedmoe.federation.transport import TrainReport
    from fedmoe.train import LocalResult

    counts = torch.tensor([[3, 0, 5], [1, 1, 6]])
    result = LocalResult(loss=2.5, steps=3, tokens=96, activation_counts=counts, tokens_per_layer=counts.sum(1),
                         n_train=12, lr=1e-3)
    sent = TrainReport.of(result, {"rescaler_by_layer": [1.0, 0.75]}, train_s=4.0)
    back = TrainReport.from_info(json.loads(json.dumps(sent.to_info())), load_s=1.5, train_s=4.0)
    assert (back.loss, back.steps, back.lr, back.tokens, back.metrics) == (2.5, 3, 1e-3, 96, sent.metrics)
    assert back.activation_counts.dtype == torch.long and torch.equal(back.activation_counts, counts)
    assert back.overhead == {"load_s": 1.5, "train_s": 4.0} and "overhead" not in sent.to_info()
    # the counts travel once: a reply that holds them (FLAME, FC-MoE) carries them, the report does not
    from fedmoe.messages import ACTIVATION_COUNTS

    reply = Message(tensors={ACTIVATION_COUNTS: counts.clone()}, scalars={"n_train": 12})
    info = json.loads(json.dumps(sent.to_info(reply)))
    assert ACTIVATION_COUNTS not in info
    assert torch.equal(TrainReport.from_info(info, reply).activation_counts, counts)
    assert ACTIVATION_COUNTS in sent.to_info(Message(tensors={}, scalars={"n_train": 12}))
    with pytest.raises(ValueError, match="no activation counts"):
        TrainReport.from_info(info)
    # a hostile report's numbers: text, booleans, fractions of a step and a non-finite lr are refused (the
    # report's curves would choke on a text loss); a NaN loss is reported (the runtime leaves that update out)
    good = json.loads(json.dumps(sent.to_info()))
    for key, bad in (("loss", "low"), ("loss", True), ("lr", float("inf")), ("lr", "1e-3"), ("lr", 10 ** 400),
                     ("steps", 2.5), ("steps", -1), ("tokens", "96"), ("tokens", False)):
        with pytest.raises(ValueError, match=f"{key} = "):
            TrainReport.from_info({**good, key: bad})
    assert math.isnan(TrainReport.from_info({**good, "loss": float("nan")}).loss)


@pytest.mark.parametrize("method", sorted(SIM_METHODS))
def test_flower_simulation_gives_the_in_process_numbers(tmp_path, method):
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--runtime", "flower-sim", "--quiet",
           *_sets(TINY + SIM_METHODS[method] + [f"output_dir={tmp_path}", "name=sim"])]
    # no OMP_NUM_THREADS: Ray gives each client as many torch threads as the CPUs it reserves
    env = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert sim["runtime"] == "flower-sim"
    _same_numbers(_local(tmp_path, "local", SIM_METHODS[method], threads=2), sim)
    assert "each client reserves 2 CPU(s) and no GPU" in r.stdout
    # notices to fedmoe's developers (Flower's deprecation of run_simulation, Ray's tip on hidden GPUs) are not shown
    assert "DEPRECATED FEATURE" not in r.stdout + r.stderr and "RAY_ACCEL_ENV_VAR" not in r.stdout + r.stderr
    # each client's process start is in the record: its load, and the model's when its process loaded it
    starts = _rows(tmp_path / "sim", "start")
    assert sorted(r["client"] for r in starts) == [0, 1] and {r["round"] for r in starts} == {1}
    assert all(r["load_s"] >= r["model_s"] >= 0 and r["device"] == "cpu" for r in starts)
    assert sum(r["model_s"] > 0 for r in starts) == 1, starts  # one actor (both CPUs each) loads the model once


def test_flame_under_local_dp_on_flower_sends_only_noised_updates(tmp_path):
    """FLAME with local DP and withheld reports (the default) on Flower's simulation, every message recorded at
    the server's grid: the same global model and numbers as in-process (the noise seeded), and what the clients
    sent is only the noised tensors they were sent, n_train = 1, a training report of lr and the names of what
    it withheld, and a setup without the size or categories of its data or FLEx-style calibration counts; no
    activation count, loss or token count of a client reaches the server."""
    from fedmoe.federation.checkpoint import load_checkpoint

    sets = METHODS["flame"] + ["federation.dp.clip_norm=0.05", "federation.dp.noise_multiplier=0.5",
                               "federation.dp.where=client", "federation.dp.client_noise=seeded", "federation.rounds=1",
                               "eval.zero_shot=false"]
    dump = tmp_path / "messages.bin"
    cmd = [sys.executable, str(Path(__file__).parent / "flower_capture.py"), str(dump), "run", "--runtime",
           "flower-sim", "--quiet", *_sets(TINY + sets + [f"output_dir={tmp_path}", "name=sim"])]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    local = _local(tmp_path, "local", sets)
    _same_numbers(local, sim)
    a = load_checkpoint(tmp_path / "sim", log=lambda *a: None).state["global_state"]
    b = load_checkpoint(tmp_path / "local", log=lambda *a: None).state["global_state"]
    assert all(torch.equal(a[n], b[n]) for n in b)
    from_clients = [json.loads(x) for x in Path(f"{dump}.jsonl").read_text().splitlines()]
    from_clients = [m for m in from_clients if m["direction"] == "from-client"]
    trains = [m for m in from_clients if m["type"] == "train"]
    assert len(trains) == 2
    for m in trains:
        assert set(m["records"]["tensors"]) == set(b)  # the global tensors, no activation or token counts
        assert m["values"]["scalars"] == {"n_train": 1}
        info = json.loads(m["values"]["info"]["json"])
        assert info["report"] == {"lr": info["report"]["lr"], "withheld": ["loss", "steps", "tokens",
                                                                           "activation_counts", "metrics"]}
    setups = [json.loads(m["values"]["info"]["json"]) for m in from_clients if "info" in m["values"]
              and "data" in json.loads(m["values"]["info"]["json"])]
    assert len(setups) == 2
    for info in setups:
        assert not {"n_train", "category_counts", "skipped_rows"} & set(info["data"]) and set(info["setup"]) == {"seconds"}
    assert all(c["n_train"] is None and c["expert_activation"] is None for c in sim["clients"])
    assert sim["privacy"]["reports"] == "withhold"


# ------------------------------------------------------------------------------- a real deployment
def _deploy(tmp_path, **kw):
    # the clients' processes run on one thread, like the in-process run they are compared with
    return LocalDeployment(tmp_path, threads=1, **kw)


# a real deployment starts a ClientApp process per message: evaluated once, after the last round (the
# evaluation at every round is the simulation's test above), each method's run takes half the messages
ENDS_ONLY = ["eval.zero_shot=false", "eval.loss_every_round=false"]


def _rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_superlink_and_two_supernodes_run_flex(tmp_path):
    """FLEx: its shared attention LoRA gives the in-process numbers, its private grafts stay on the nodes'
    disks, each read back by the node's worker for every message. (A SuperNode without a worker, loading the
    model for every message, is the two-ranks test's client 1.) FLAME on a real deployment is the killed-node
    test's method (its private rescalers continue from the node's disk)."""
    with _deploy(tmp_path, workers=True, database=True) as deployment:
        _flex_run(deployment, tmp_path)


def _resume(deployment, run):
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--resume", str(run), "--federation", "local", "--quiet"]
    return subprocess.Popen(cmd, cwd=deployment.root, env=deployment.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=interruptible)


def _resume_watching(deployment, run):
    """(process, its output) of a resume that has printed its first round line. After a stopped or lost run,
    Flower 1.42's SuperNode race (a node that was pulling a message of that run keeps it and answers one
    message late from then on) can fail a resume with fedmoe's error naming the remedy: the operator restarts
    the SuperNodes (their state-dirs keep the clients' stores) and resumes again, once."""
    for attempt in (0, 1):
        proc = _resume(deployment, run)
        watch = _Output(proc)
        try:
            watch.wait_for(r"round \d/5: ")
            return proc, watch
        except AssertionError:
            if attempt or proc.poll() is None or "restart that SuperNode" not in "".join(watch.lines):
                raise
            for c in (0, 1):
                deployment.kill(f"node{c}")
                deployment.restart(f"node{c}")
    raise AssertionError("unreachable")


def _wait_for_row(run: Path, text: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and text in (run / "metrics.jsonl").read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {run / 'metrics.jsonl'}")


class _Output:
    """A process's combined output, read line by line as it comes (a thread), so a test can wait for a
    line the process itself printed — not a metrics row another process (a ServerApp left running by a
    killed `fedmoe run`) may have written."""

    def __init__(self, proc):
        import threading

        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        import re

        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self.thread.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} in the output:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 300) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=30)
        return "".join(self.lines)


def _flex_run(deployment, tmp_path):
    """Five rounds, operated: `fedmoe run` SIGKILLed after round 1 leaves its ServerApp running, so a resume is
    refused (naming `flwr stop`; the ServerApp may finish a round or two more before it is stopped); once
    stopped, a resume Ctrl-C'd after its first round stops its own Flower run on the SuperLink; the next resume
    loses its SuperLink after its first round (killed and restarted on its database: the SuperNodes stay up).
    Then either the restarted SuperLink marks the run it lost as failed and a last resume finishes it, or —
    the ServerApp reconnected before the SuperLink gave up on it — the run finished as it was; which one
    depends on timing, and both end with the uninterrupted in-process numbers. Each stage waits for a round
    line its own process printed."""
    from fedmoe.federation.flower.launch import FLOWER_RUN, flower_run_status

    for method in ("flex",):
        sets = METHODS[method] + ENDS_ONLY + ["federation.rounds=5", "federation.node_wait_s=60"]
        run = tmp_path / "runs" / method
        proc = deployment.run(TINY + sets + [f"output_dir={tmp_path / 'runs'}", f"name={method}"])
        _wait_for_row(run, '"round": 1, "client": null, "kind": "round"', proc)
        # the SuperNodes paused: the ServerApp this kill leaves running finishes no round until it is stopped (on a
        # loaded host it otherwise got through round 4 of 5 meanwhile, leaving the Ctrl-C below nothing to stop)
        for c in (0, 1):
            os.killpg(deployment.procs[f"node{c}"].pid, signal.SIGSTOP)
        proc.kill()
        proc.communicate()
        first = json.loads((run / FLOWER_RUN).read_text())["flower_run_id"]
        refused = _resume(deployment, run)
        out, _ = refused.communicate(timeout=300)
        assert refused.returncode != 0 and f"stop it with `flwr stop {first} local`" in out, out[-3000:]
        assert "Traceback" not in out
        subprocess.run([str(BIN / "flwr"), "stop", str(first), "local"], env=deployment.env, check=True,
                       capture_output=True, timeout=120)
        for c in (0, 1):
            os.killpg(deployment.procs[f"node{c}"].pid, signal.SIGCONT)
        # Ctrl-C as a run ends: stopping it finds it finished, and says so (not "could not stop ... before resuming")
        from unittest.mock import patch

        from fedmoe.federation.flower.launch import stop_flower_run

        said = []
        with patch.dict(os.environ, {"FLWR_HOME": str(deployment.home)}):
            stop_flower_run(first, "local", log=said.append)
        assert said == [f"the Flower run {first} on local had already finished: nothing to stop"], said
        interrupted, watch = _resume_watching(deployment, run)
        interrupted.send_signal(signal.SIGINT)
        out = watch.finish()
        second = json.loads((run / FLOWER_RUN).read_text())["flower_run_id"]
        assert second != first and f"stopped the Flower run {second} on local" in out, out[-3000:]
        status = flower_run_status(second, "local", deployment.env)
        assert status is not None and status.startswith("finished"), status
        lost, watch = _resume_watching(deployment, run)
        deployment.kill("superlink")
        deployment.restart("superlink")
        out = watch.finish()
        assert "Traceback" not in out, out[-3000:]
        assert all(deployment.procs[f"node{i}"].poll() is None for i in (0, 1))  # the SuperNodes stayed up
        if lost.returncode != 0:  # the SuperLink lost the run: it marks it failed, and a resume finishes it
            lost_id = json.loads((run / FLOWER_RUN).read_text())["flower_run_id"]
            assert lost_id not in (first, second)
            # the restarted SuperLink marks the run it lost as failed when the ServerApp's claim expires: 60 s
            # after its last heartbeat (Flower 1.42: 2 x 30 s), and a loaded host adds its own delay
            deadline = time.time() + 180
            while not str(status := flower_run_status(lost_id, "local", deployment.env)).startswith("finished") \
                    and time.time() < deadline:
                time.sleep(0.5)
            assert status is not None and status.startswith("finished"), status
            last = _resume(deployment, run)
            out, _ = last.communicate(timeout=600)
            if last.returncode != 0 and ("did not answer" in out or "Node Unavailable" in out):
                # Flower 1.42: a SuperNode that was pulling a message of the run the SuperLink lost keeps it and
                # answers one message late from then on, or stops its heartbeat (a race; fedmoe's error names it
                # and the remedy): the operator restarts the SuperNodes, and the resume finishes
                assert "restart that SuperNode" in out, out[-3000:]
                for c in (0, 1):
                    deployment.kill(f"node{c}")
                    deployment.restart(f"node{c}")
                last = _resume(deployment, run)
                out, _ = last.communicate(timeout=600)
            assert last.returncode == 0, out[-4000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["runtime"] == "flower" and [c["rounds_trained"] for c in summary["clients"]] == [5, 5]
        _same_numbers(_local(tmp_path, f"local-{method}", sets), summary)
        # each client's private state lives only in its own node's state directory
        for i, state in deployment.state.items():
            dirs = {p.name for p in state.glob("*/client-*")}
            assert dirs and dirs == {f"client-{i}"}, (method, i, dirs)
        train = _rows(run, "train")
        assert len(train) == 10
        # the workers loaded the model once, at the first query (a resume's query reaches the same workers)
        assert all(r["load_s"] == 0 for r in train)
        assert "## Client time per round" in (run / "report.md").read_text()
        # FLEx's clients run their own models: each evaluates the global model in the same message, no second one
        log = (deployment.root / "node0.log").read_text()
        assert "Receiving: evaluate message" in log and "evaluate.global" not in log
    # FLEx's grafts: in the clients' stores (the last round's; a store keeps its newest rounds)
    for i, state in deployment.state.items():
        privates = [torch.load(p, weights_only=False) for p in sorted(state.glob("*/client-*/private-r00005.pt"))]
        keys = set().union(*(p.keys() for p in privates))
        assert "graft_index" in keys and any(".mlp.grafted." in k for k in keys)


def test_a_supernode_killed_mid_run_leaves_the_run_to_the_other(tmp_path):
    """Client 0 trains on its own file (data-path); client 1's node is killed after round 1, fails
    round 2, and comes back (restarted) for round 3 with the private state it kept on its disk. Both
    relay to workers: the restarted SuperNode takes its running worker back (nothing is loaded again)."""
    from fedmoe.data import load_examples, prepare_client_data

    own = tmp_path / "client0.jsonl"
    rows = load_examples("dolly").examples[:60]
    own.write_text("\n".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output,
                                         "category": e.category}) for e in rows))
    with _deploy(tmp_path, data_paths={0: own}, workers=True) as deployment:
        _killed_node_run(deployment, tmp_path)
        assert all(r["load_s"] == 0 for r in _rows(tmp_path / "runs" / "kill", "train"))
        assert (tmp_path / "worker-1.sock.log").read_text().count("listening on") == 1
    cfg = load_config(None, TINY)
    mine, _ = prepare_client_data(cfg.data, cfg.seed, 0, str(own))
    summary = json.loads((tmp_path / "runs" / "kill" / "summary.json").read_text())
    assert summary["clients"][0]["n_train"] == len(mine.train) == 48  # 80% of its 60 rows


def _killed_node_run(deployment, tmp_path):
    run = tmp_path / "runs" / "kill"
    # the timeout is long enough for a restarted SuperNode's first messages on a loaded machine (three test
    # workers on two cores: each message starts a ClientApp process), and is what round 2 waits for node 1
    proc = deployment.run(TINY + ["federation.rounds=3", "federation.round_timeout_s=60", "algorithm.name=flame",
                                  "eval.zero_shot=false",
                                  "algorithm.budgets.top_k=[2,1]", f"output_dir={tmp_path / 'runs'}", "name=kill"])
    metrics = run / "metrics.jsonl"

    def wait_for(text):
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and text in metrics.read_text():
                return
            time.sleep(0.5)

    wait_for('"round": 1, "client": null, "kind": "test"')  # kill client 1's node once round 1 is evaluated
    deployment.kill("node1")
    # bring it back once round 2's train messages are out (client 0's node received its own): the one to the killed
    # node's id goes unanswered, so client 1 fails round 2 at its timeout, while the new node has that time to
    # connect before round 3 (restarted only after the failure, a loaded host's SuperNode start missed the start
    # of round 3: "not connected", and client 1 trained in round 1 alone)
    _worker_log_wait(deployment.root / "node0.log", "Receiving: train message", 2, proc)
    deployment.restart("node1")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "client 1 failed to train" in out and "client 1 is back" in out
    summary = json.loads((run / "summary.json").read_text())
    assert [c["rounds_trained"] for c in summary["clients"]] == [3, 2], summary["failures"]
    assert {(f["round"], f["client"], f["stage"]) for f in summary["failures"]} >= {(2, 1, "train")}
    assert not any(f["round"] == 3 for f in summary["failures"])
    assert [c["evaluated_round"] for c in summary["clients"]] == [3, 3]
    # its learned rescalers continued from its disk: the round-3 store differs from round 1's
    store = deployment.state[1]
    r1, r3 = (torch.load(next(store.glob(f"*/client-1/private-r0000{r}.pt")), weights_only=False) for r in (1, 3))
    assert set(r1) == set(r3) and any(not torch.equal(r1[k], r3[k]) for k in r1)
    assert "## Failures" in (run / "report.md").read_text()
    # the record of each client process's start: both workers loaded the model for round 1; client 1's restarted
    # SuperNode, seen again in round 2 or 3, found its worker with the model and its data (nothing loaded)
    starts = {(r["round"], r["client"]): r for r in _rows(run, "start")}
    back = [k for k in starts if k[0] > 1]
    assert set(starts) - set(back) == {(1, 0), (1, 1)} and len(back) == 1 and back[0][1] == 1 and back[0][0] in (2, 3)
    assert starts[(1, 0)]["model_s"] > 0 and starts[(1, 1)]["model_s"] > 0
    assert starts[back[0]]["load_s"] == starts[back[0]]["model_s"] == 0


def _worker_log_wait(log: Path, text: str, count: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().count(text) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"'{text}' x{count} did not appear in {log}")


def test_a_worker_killed_mid_train_is_restarted_and_the_client_comes_back(tmp_path):
    """FedIT, 3 rounds, both clients on workers: client 1's worker is SIGKILLed while it trains round 1. The
    round is aggregated from client 0 (the relay reports the failure at once, not at a timeout); round 2's
    message starts a new worker, which loads the model and continues from the client's store of round 0."""
    with _deploy(tmp_path, workers=True) as deployment:
        run = tmp_path / "runs" / "wk"
        proc = deployment.run(TINY + ["federation.rounds=3", "train.max_steps=30", "eval.zero_shot=false",
                                      "eval.loss_every_round=false", "federation.round_timeout_s=120",
                                      f"output_dir={tmp_path / 'runs'}", "name=wk"])
        log = tmp_path / "worker-1.sock.log"
        _worker_log_wait(log, "partition 1: train ...", 1, proc)
        t_kill = time.time()
        kill_worker(deployment.sockets[1])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        summary = json.loads((run / "summary.json").read_text())
        assert [c["rounds_trained"] for c in summary["clients"]] == [3, 2], summary["failures"]
        assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(1, 1, "train")]
        assert "WorkerError" in summary["failures"][0]["error"] and "closed the connection" in summary["failures"][0]["error"]
        rounds = _rows(run, "round")
        assert rounds[0]["wall_s"] < 100 and time.time() - t_kill < 300  # not the 120 s timeout (margin for a loaded host)
        train = {(r["round"], r["client"]): r for r in _rows(run, "train")}
        assert set(train) == {(1, 0), (2, 0), (2, 1), (3, 0), (3, 1)}
        assert train[(2, 1)]["load_s"] > 0 and train[(3, 1)]["load_s"] == 0  # the new worker loaded once
        assert log.read_text().count("listening on") == 2
        store = sorted(p.name for p in deployment.state[1].glob("*/client-1/private-r*.pt"))
        assert store == ["private-r00000.pt", "private-r00002.pt", "private-r00003.pt"]


def test_a_worker_with_two_ranks_gives_the_in_process_numbers(tmp_path):
    """Client 0's worker trains on two gloo ranks (torchrun), each half of every batch: the run's numbers
    are the in-process run's to float rounding (client 1 sees them through the global model). Client 1's
    SuperNode has no worker: it loads the model for every message, in the ClientApp process Flower starts
    for it. SGD: Adam's normalised step would turn rounding in near-zero gradients into steps of size lr."""
    sets = ["algorithm.name=fedit", "train.batch_size=4", "train.optimizer=sgd", "train.lr=0.5"] + ENDS_ONLY
    with _deploy(tmp_path, workers={0: 2}) as deployment:
        proc = deployment.run(TINY + sets + [f"output_dir={tmp_path / 'runs'}", "name=ranks"])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        assert "(2 ranks)" in (tmp_path / "worker-0.sock.log").read_text()
        assert not (tmp_path / "worker-1.sock.log").exists()
    ranks = json.loads((tmp_path / "runs" / "ranks" / "summary.json").read_text())
    # the worker loaded the model once, at the query; client 1's SuperNode for each message
    train = _rows(tmp_path / "runs" / "ranks", "train")
    assert sorted((r["round"], r["client"]) for r in train) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all((r["load_s"] > 0) == (r["client"] == 1) for r in train)
    local = _local(tmp_path, "local-ranks", sets)
    for a, b in zip(local["clients"], ranks["clients"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (a["bytes_up"], a["bytes_down"], a["n_train"]) == (b["bytes_up"], b["bytes_down"], b["n_train"])
    assert ranks["global"]["loss"] == pytest.approx(local["global"]["loss"], rel=1e-5)


def test_a_stopped_simulation_exits_and_resumes_exactly(tmp_path):
    """Ctrl-C, then SIGTERM, each after a checkpoint: the process says so and exits (130, 143). Before, Ctrl-C left
    the ServerApp's thread polling an engine that was gone (the process never ended after printing "interrupted"),
    and Ray's handler aborted SIGTERM (exit 134, no word of the checkpoint). Each resume goes on from the checkpoint,
    and the end is the in-process run's numbers: FLAME on Flower's simulation (private rescalers, activation counts in
    the reply, its clients' own models' validation loss), each client in an actor of one CPU."""
    flame = ["federation.rounds=4", *METHODS["flame"], "eval.val_loss=true"]  # its clients' own models' validation loss
    sets = TINY + flame + [f"output_dir={tmp_path}", "name=cut"]
    ck = tmp_path / "cut" / "checkpoints" / "state.pt"

    def checkpointed() -> int:
        return torch.load(ck, weights_only=False)["round"] if ck.is_file() else 0

    starts = ([sys.executable, "-m", "fedmoe.cli", "run", "--runtime", "flower-sim", "--quiet", *_sets(sets)],
              [sys.executable, "-m", "fedmoe.cli", "run", "--quiet", "--resume", str(tmp_path / "cut")])
    for cmd, sig, status, name in ((starts[0], signal.SIGINT, 130, "Ctrl-C"), (starts[1], signal.SIGTERM, 143, "SIGTERM")):
        after = checkpointed() + 1  # a round this process checkpoints itself (then its handlers are in place)
        err = tmp_path / f"{name}.err"
        with open(err, "w") as f:
            # SIGINT at its default in the child: a pytest-xdist worker ignores it, and a process started with it
            # ignored keeps ignoring it (Python installs no KeyboardInterrupt handler then)
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=f,
                                    start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if checkpointed() >= after:
                    break
                time.sleep(0.5)
            assert proc.poll() is None, err.read_text()[-3000:]
            ray = _descendants(proc.pid)  # Ray's processes (its node's daemons, the clients' actors)
            assert len(ray) >= 3, ray
            proc.send_signal(sig)  # to the main process alone, as `timeout` and `kill` send it
            assert proc.wait(timeout=120) == status, err.read_text()[-3000:]
            # none outlives the run: a stopped simulation leaves Ray's shutdown to its exit, whose fate they share
            deadline = time.time() + 60
            while time.time() < deadline and any(map(_alive, ray)):
                time.sleep(0.5)
            assert not [_cmdline(p) for p in ray if _alive(p)]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        text = " ".join(err.read_text().split())
        assert f"stopped ({name})" in text and "--resume" in text, text[-2000:]
        # Ray is shut down as the process ends, not under the engine's threads still waiting on its actors (a thread
        # that touched it afterwards ended the process with status 1 before it could say the above)
        assert "its owner has died" not in text, text[-2000:]
        assert not (tmp_path / "cut" / "summary.json").exists()
    r = subprocess.run(starts[1], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = json.loads((tmp_path / "cut" / "summary.json").read_text())
    _same_numbers(_local(tmp_path, "full", flame), resumed)
    assert "each client reserves 1 CPU(s) and no GPU" in r.stdout
    # notices to fedmoe's developers (Flower's deprecation of run_simulation, Ray's tip on hidden GPUs) are not shown
    assert "DEPRECATED FEATURE" not in r.stdout + r.stderr and "RAY_ACCEL_ENV_VAR" not in r.stdout + r.stderr
    # each client's process start is in the record, once per process of the run (its first round): its load, and the
    # model's when its process loaded it (each client in an actor of its own, one CPU each: one or two loads)
    starts: dict[int, list] = {}
    for row in _rows(tmp_path / "cut", "start"):
        starts.setdefault(row["round"], []).append(row)
    assert len(starts) == 3 and 1 in starts, starts
    for rows in starts.values():
        assert sorted(x["client"] for x in rows) == [0, 1]
        assert all(x["load_s"] >= x["model_s"] >= 0 and x["device"] == "cpu" for x in rows)
        assert 1 <= sum(x["model_s"] > 0 for x in rows) <= 2, rows


def test_supernodes_under_their_own_privacy_budgets(tmp_path):
    """FedIT with local DP (σ = 1, 2 rounds) on two SuperNodes with budgets in their node configs, both on
    workers. Node 0's dp-epsilon admits one release: it trains round 1 and refuses round 2 (its failure names
    the budget; the round is the other client's), and its ledger holds its one release. Its evaluation stays on
    it: no test row and no failure of it, the global row names it, its setup had no test-set size. Node 1
    (dp-evaluation=send) trains and evaluates both rounds as usual."""
    from fedmoe.federation.dp import epsilon
    from fedmoe.federation.flower.budget import PrivacyLedger

    budget = (epsilon(0.5, 1, 1e-5) + epsilon(0.5, 2, 1e-5)) / 2
    nodes = {0: f"dp-epsilon={budget}", 1: 'dp-epsilon=1000 dp-evaluation="send"'}
    sets = ["algorithm.name=fedit", "federation.dp.clip_norm=0.05", "federation.dp.noise_multiplier=1",
            "federation.dp.where=client", "federation.min_replies=1", "eval.zero_shot=false"]
    with _deploy(tmp_path, workers=True, node_config=nodes) as deployment:
        proc = deployment.run(TINY + sets + [f"output_dir={tmp_path / 'runs'}", "name=budget"])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        ledgers = [PrivacyLedger(deployment.state[c]).releases() for c in (0, 1)]
    run = tmp_path / "runs" / "budget"
    summary = json.loads((run / "summary.json").read_text())
    # a client that failed a round is not asked again in it (its evaluation of round 2 fails with it)
    assert [(f["round"], f["client"], f["stage"]) for f in summary["failures"]] == [(2, 0, "train"), (2, 0, "evaluate")]
    assert "privacy budget is spent" in summary["failures"][0]["error"]
    assert [c["rounds_trained"] for c in summary["clients"]] == [1, 2]
    assert [(r["round"], r["noise_multiplier"]) for r in ledgers[0]] == [(1, 0.5)]
    assert [r["round"] for r in ledgers[1]] == [1, 2]
    tests = _rows(run, "test")
    assert [(r["round"], r["client"]) for r in tests] == [(1, 1), (1, None), (2, 1), (2, None)]
    assert tests[1]["clients_withheld"] == [0] and "clients_withheld" not in tests[3]
    assert tests[3]["clients_missing"] == [0] and "clients_missing" not in tests[1]
    assert summary["global"]["clients_missing"] == [0]
    assert "The global numbers leave out the test data of clients 0: they failed their evaluation" in (run / "report.md").read_text()
    assert tests[1]["loss"] == pytest.approx(tests[0]["loss"], rel=1e-12)  # the global numbers are client 1's alone
    assert summary["clients"][0]["n_test"] is None and summary["clients"][1]["n_test"] == 3
    assert summary["clients"][0]["evaluated_round"] is None


def test_what_a_simulated_client_reserves_is_checked_against_the_machine():
    """federation.simulation as Ray's client_resources, for a machine of `cpus` CPUs and `gpus` CUDA devices (given,
    so that GPU machines are checked here too): the default is a GPU per client where model.device is a GPU; what no
    client would fit, a GPU Ray hides or renumbers, and a GPU on a machine without one are refused, naming the key."""
    from fedmoe.config import ConfigError
    from fedmoe.federation.flower.launch import simulation_resources

    def resources(sets, cpus=2, gpus=0):
        return simulation_resources(load_config(None, TINY + sets), cpus=cpus, gpus=gpus)

    assert resources([]) == {"num_cpus": 1, "num_gpus": 0.0}  # a CPU machine
    assert resources([], gpus=1) == {"num_cpus": 1, "num_gpus": 1.0}  # device auto on a GPU machine: a GPU each
    assert resources(["model.device=cuda", "federation.simulation.client_gpus=0.25"], gpus=2) == \
        {"num_cpus": 1, "num_gpus": 0.25}  # four clients' models on each GPU
    assert resources(["federation.simulation.client_cpus=8"], cpus=16) == {"num_cpus": 8, "num_gpus": 0.0}
    # auto, and the user wants the clients on the CPU beside a GPU: Ray hides it from them
    assert resources(["federation.simulation.client_gpus=0"], gpus=1) == {"num_cpus": 1, "num_gpus": 0.0}
    refused = {
        "federation.simulation.client_cpus = 4, but this machine has 2 CPUs": (["federation.simulation.client_cpus=4"], 0),
        "client_gpus = 0.5, but this machine has no CUDA device": (["federation.simulation.client_gpus=0.5"], 0),
        "model.device = cuda, but this machine has no CUDA device": (["model.device=cuda"], 0),
        "client_gpus = 1 reserves a GPU for each client, but model.device is cpu":
            (["model.device=cpu", "federation.simulation.client_gpus=1"], 1),
        "model.device = cuda:1: Ray gives each simulated client its own GPU": (["model.device=cuda:1"], 2),
        "model.device = cuda, but federation.simulation.client_gpus = 0: Ray hides the GPUs":
            (["model.device=cuda", "federation.simulation.client_gpus=0"], 1),
    }
    for why, (sets, gpus) in refused.items():
        with pytest.raises(ConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
            resources(sets, gpus=gpus)
    with pytest.raises(ConfigError, match="client_gpus"):  # a share above one GPU: a client uses one device
        load_config(None, TINY + ["federation.simulation.client_gpus=2"])
