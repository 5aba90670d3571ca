"""A data owner's own privacy budget, kept and enforced on its node (a SuperNode's node config).

Local DP (``federation.dp.where: client``) protects a client's data from the server only as long as the
client, not the server, decides what leaves it. On Flower the run's config reaches a client from the
server: a server that sets ``noise_multiplier`` to 0, ``where: server`` (raw updates), ``client_noise:
seeded`` (noise it can compute and subtract) or ``reports: send`` (unnoised losses, counts and sizes), or that
simply asks for more rounds than were agreed, would get more than the data owner agreed to give.

With ``dp-epsilon=E`` in its node config a node trains only for runs that noise on the client with secret
noise (``client_noise: secret``) and withhold its reports, and keeps its own ledger of every update it
released (``dp-ledger.json`` in its state-dir, written before the reply leaves): its ε at ``dp-delta``
(default 1e-5) over every release recorded there — of every run, by the σ each release was noised with — never
exceeds E. A release that would
exceed it is refused (the server sees that client fail the round, with the reason). The ledger counts what
the node sent, not what a server says it used: a round asked twice counts twice.

A node under a budget also refuses epoch-based training (``train.max_steps: null``): its steps, withheld from its
reports, would show in how long its rounds take. With a fixed number of steps a round's length still follows the
data as far as the last, shorter batch of a pass over it (and the setup's, its tokenisation).

Evaluation results are not covered by ε (they are each client's scores on its own test data). Under a
budget a node withholds them, and the size of its test set, unless its node config says
``dp-evaluation=send``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ...rundir import shell_quote
from .paths import node_float

LEDGER = "dp-ledger.json"
BUDGET_KEYS = ("dp-epsilon", "dp-delta", "dp-evaluation")


class BudgetRefusal(RuntimeError):
    """This node's privacy budget refuses the run's request."""


@dataclass(frozen=True)
class NodeBudget:
    epsilon: float  # the most ε this node's data may spend, over every release in its ledger
    delta: float = 1e-5  # the δ at which the node counts ε
    send_evaluation: bool = False  # dp-evaluation=send: evaluation results leave the node (ε does not cover them)


def node_budget(node_config) -> NodeBudget | None:
    """The privacy budget a SuperNode's node config sets (``dp-epsilon``, ``dp-delta``, ``dp-evaluation``), or
    None (none set: the node follows the run's config). A malformed value is an error naming the key."""
    node_config = node_config or {}
    eps = node_float(node_config, "dp-epsilon", None, example="8")
    if eps is None:
        stray = [k for k in BUDGET_KEYS[1:] if node_config.get(k) not in (None, "")]
        if stray:
            raise ValueError(f"node config {stray[0]} is set without dp-epsilon: give the node's budget too "
                             "(--node-config 'dp-epsilon=E ...'), or remove it")
        return None
    delta = node_float(node_config, "dp-delta", 1e-5, hi=1.0, example="1e-5")
    evaluation = str(node_config.get("dp-evaluation", "withhold")).strip().lower()
    if evaluation not in ("withhold", "send"):
        raise ValueError(f"node config dp-evaluation = {node_config.get('dp-evaluation')!r}: give \"withhold\" (the "
                         "default: this node's evaluation results stay on it) or \"send\", quoted as Flower takes a "
                         "string: --node-config 'dp-evaluation=\"send\"'")
    return NodeBudget(eps, delta, evaluation == "send")


def budget_refusal(cfg, budget: NodeBudget) -> str | None:
    """Why the run's config asks this node for more than its budget allows its data to give, or None."""
    from ..dp import withholds

    dp = cfg.federation.dp
    why = None
    if dp is None:
        why = "the run has no federation.dp (its updates would leave unnoised)"
    elif dp.where != "client":
        why = f"federation.dp.where = {dp.where} (the server would see the raw update)"
    elif dp.client_noise != "secret":
        why = (f"federation.dp.client_noise = {dp.client_noise} (the noise is derived from the run's seed, which the "
               "server knows, so it can be removed)")
    elif not withholds(cfg):
        why = "federation.dp.reports = send (the training report, data sizes and counts would leave unnoised)"
    elif not dp.noise_multiplier:
        why = "federation.dp.noise_multiplier = 0 (no noise)"
    elif cfg.train.max_steps is None:
        why = ("train.max_steps = null (epoch-based training: the number of steps, and so how long each round takes "
               "this node, would follow its training set's size, which withheld reports keep from the server)")
    if why is None:
        return None
    return (f"this node trains only under local DP with secret noise, withheld reports and a fixed number of steps "
            f"(node config dp-epsilon = {budget.epsilon:g}), and this run asks otherwise: {why}")


# the largest noise multiplier a node records: σ/2 of the largest σ a run accepts (federation.dp.noise_multiplier ≤ 1e6)
MAX_RECORDED = 5e5


def _recordable(v) -> bool:
    """A noise multiplier a node could have written: a finite number in [0, MAX_RECORDED] (an infinite one would
    count its release as free)."""
    from ..transport import is_number

    return is_number(v) and 0 <= v <= MAX_RECORDED


def _is_stamp(a) -> bool:
    """An accepted store as a ledger writes it: {"path": name, "size": bytes, "mtime_ns": time}."""
    def whole(v):
        return isinstance(v, int) and not isinstance(v, bool)

    return isinstance(a, dict) and isinstance(a.get("path"), str) and whole(a.get("size")) and whole(a.get("mtime_ns"))


def _entry_path(a) -> str:
    """The store path of an ``accepted_stores`` entry (a stamp, or a path alone)."""
    return a if isinstance(a, str) else a["path"]


class PrivacyLedger:
    """The releases of one node (its state-dir): each locally privatised update it sent, with the noise
    multiplier of its Gaussian mechanism (σ/2: sensitivity 2C, noise σC)."""

    def __init__(self, state_dir):
        self.path = Path(state_dir) / LEDGER

    def trained_stores(self) -> list[Path]:
        """The private stores in this state-dir of rounds its client trained in (``<run>/client-<N>/private-rR.pt``,
        R ≥ 1): each after an update that left the node."""
        return [p for p, _ in self._listed()]

    def _listed(self) -> list[tuple[Path, tuple[int, int]]]:
        """The trained stores, each with its (size, mtime_ns) as it was listed (a link to nothing, or a store
        removed meanwhile, holds nothing and is none)."""
        found = []
        for p in sorted(self.path.parent.glob("*/client-*/private-r*.pt")):
            digits = p.stem[len("private-r"):]
            if re.fullmatch(r"[0-9]+", digits) and int(digits) >= 1:  # (isdigit() takes "²", which int() refuses)
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                found.append((p, (st.st_size, st.st_mtime_ns)))
        return found

    def _relative(self, store: Path) -> str:
        return store.relative_to(self.path.parent).as_posix()

    def _stamp(self, store: Path, stat: tuple[int, int]) -> dict:
        """What the ledger keeps of a store it accepts: its path in the state-dir, size and modification time (a store
        written anew at that path later, by a round trained without the budget, is then not taken for it)."""
        return {"path": self._relative(store), "size": stat[0], "mtime_ns": stat[1]}

    @staticmethod
    def _accepted(data: dict) -> dict[str, dict | None]:
        """The ledger's accepted stores, by path: each its stamp, or None for an entry of a path alone (as the
        ledgers of 2026-12-07 morning wrote them: accepted whatever the file holds now)."""
        return {_entry_path(a): None if isinstance(a, str) else a for a in data.get("accepted_stores", [])}

    def start(self) -> bool:
        """Start an empty ledger where there is none (the operator's word that what the data spent before is
        accounted for elsewhere, or is to be ignored: the trained stores already there are listed in it as
        accepted); False where one exists (it is never overwritten)."""
        from ...rundir import atomic_write_text

        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(LEDGER + ".lock"), "a") as lock:  # (a first release may be recording)
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    return False
                accepted = [self._stamp(p, st) for p, st in self._listed()]
                atomic_write_text(self.path, json.dumps({"releases": [], "accepted_stores": accepted}, indent=1))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return True

    def unrecorded_stores(self, data: dict, listed: list[tuple[Path, tuple[int, int]]] | None = None) -> list[Path]:
        """The trained stores in this state-dir (``listed``, with their size and mtime_ns, else listed now) that no
        release of the ledger ``data`` accounts for (a release is recorded before its round's store is written, so
        each store of a round the node trained in under its budget has one) and that the operator did not accept
        (``--start`` over existing stores, ``--accept-stores``: each accepted as it was then, its size and mtime).
        List the stores before reading the ledger: a store listed first has its release in any later read, while one
        written after the read (another process of the node recording a release in between) would have none."""
        return [p for p, _ in self._unrecorded(data, self._listed() if listed is None else listed)]

    def _unrecorded(self, data: dict, listed) -> list[tuple[Path, tuple[int, int]]]:
        recorded = {(str(r.get("run_id")), r.get("client"), r.get("round")) for r in data["releases"]}
        accepted = self._accepted(data)
        out = []
        for p, st in listed:
            run_id, client = p.parent.parent.name, p.parent.name[len("client-"):]
            key = (run_id, int(client) if re.fullmatch(r"[0-9]+", client) else client, int(p.stem[len("private-r"):]))
            if key in recorded:
                continue
            rel = self._relative(p)
            stamp = accepted.get(rel, False)
            if stamp is None or (stamp and st == (stamp["size"], stamp["mtime_ns"])):
                continue  # accepted (a path alone: whatever it holds)
            out.append((p, st))
        return out

    def _read(self) -> dict:
        """The ledger's content, checked: a release without a noise multiplier a node could have written, or an
        ``accepted_stores`` that is not a list of names, is a damaged ledger (:class:`BudgetRefusal`)."""
        try:
            data = json.loads(self.path.read_text())
            rel = data["releases"]
            if not isinstance(rel, list) or not all(isinstance(r, dict) and _recordable(r.get("noise_multiplier"))
                                                    for r in rel):
                raise ValueError(f"a release without a finite noise multiplier in [0, {MAX_RECORDED:g}] (σ/2 of "
                                 "a σ the run accepts)")
            named = {"run_id": (str,), "client": (int,), "round": (int,)}  # what record() writes (or nothing)
            for r in rel:
                for k, kinds in named.items():
                    if r.get(k) is not None and (not isinstance(r[k], kinds) or isinstance(r[k], bool)):
                        raise ValueError(f"a release whose {k} is {json.dumps(r[k])[:40]}, not a "
                                         f"{'name' if k == 'run_id' else 'whole number'}")
            accepted = data.get("accepted_stores", [])
            if not isinstance(accepted, list) or not all(isinstance(a, str) or _is_stamp(a) for a in accepted):
                raise ValueError("accepted_stores is not a list of stores (each a path, size and mtime_ns)")
        except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:
            raise BudgetRefusal(f"this node's privacy ledger {self.path} cannot be read ({type(e).__name__}: {e}); "
                                "it trains no more until the ledger is mended or restored from a backup — never "
                                "removed, which would forget what its data has spent") from None
        return data

    def accept_stores(self) -> list[Path]:
        """Accept, in the ledger, every trained store it has no release for (the operator's word that what those
        rounds released is accounted for elsewhere); the stores accepted. Under the ledger's lock."""
        import fcntl

        from ...rundir import atomic_write_text

        if not self.path.exists():
            raise BudgetRefusal(f"{self.path}: no ledger to accept stores into: start one with --start (which "
                                "accepts the stores already there)")
        with open(self.path.with_name(LEDGER + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                listed = self._listed()
                data = self._read()
                new = self._unrecorded(data, listed)
                if new:  # (a store accepted before and written anew since: its entry replaced)
                    stamps = [self._stamp(p, st) for p, st in new]
                    again = {st["path"] for st in stamps}
                    data["accepted_stores"] = [a for a in data.get("accepted_stores", [])
                                               if _entry_path(a) not in again] + stamps
                    atomic_write_text(self.path, json.dumps(data, indent=1))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return [p for p, _ in new]

    def releases(self) -> list[dict]:
        """The recorded releases. A ledger that cannot be read is an error, never taken for an empty one; so is a
        missing ledger in a state-dir whose stores show the node released updates before (a ledger deleted, or
        a budget set on a node that trained without one), and a ledger that lacks the releases of stores in its
        state-dir (an older copy restored from a backup, or rounds trained with the budget taken off): what its
        data spent then is not known."""
        return self._checked()["releases"]

    def _checked(self) -> dict:
        listed = self._listed()  # before the ledger is read (unrecorded_stores)
        if not self.path.exists():
            trained = [p for p, _ in listed]
            if trained:
                raise BudgetRefusal(
                    f"this node's state-dir {self.path.parent} holds the stores of {len(trained)} round(s) its client "
                    f"trained in (e.g. {trained[0]}) but no privacy ledger ({self.path.name}): what its data spent "
                    "then is not known, so it trains no more under a budget. Restore the ledger from a backup if it "
                    "was deleted, or start one knowingly: fedmoe node-privacy "
                    f"{shell_quote(self.path.parent)} --start")
            return {"releases": []}
        data = self._read()
        missing = self.unrecorded_stores(data, listed)
        if missing:
            accepted = self._accepted(data)
            anew = [p for p in missing if self._relative(p) in accepted]
            said = (f"; {len(anew)} of them accepted before and written anew since (e.g. {anew[0]})" if anew else "")
            raise BudgetRefusal(
                f"this node's privacy ledger {self.path} records no release for {len(missing)} store(s) of rounds its "
                f"client trained in (e.g. {missing[0]}{said}): the ledger may be an older copy (restored from a "
                "backup?), or the node trained without its budget; what its data spent then is not known, so it trains "
                "no more under a budget. Restore the newest ledger, or accept those rounds knowingly as accounted for "
                f"elsewhere: fedmoe node-privacy {shell_quote(self.path.parent)} --accept-stores")
        return data

    @staticmethod
    def spent(releases: list[dict], delta: float) -> float:
        from ..dp import composed_epsilon

        counts: dict[float, int] = {}
        for r in releases:
            counts[float(r["noise_multiplier"])] = counts.get(float(r["noise_multiplier"]), 0) + 1
        return composed_epsilon(counts, delta)

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` over every release recorded."""
        return self.spent(self.releases(), delta)

    def check(self, budget: NodeBudget, noise_multiplier: float, releases: list[dict] | None = None) -> float:
        """ε after one more release at ``noise_multiplier`` (after ``releases``, else the ledger's);
        :class:`BudgetRefusal` if that exceeds the budget."""
        releases = self.releases() if releases is None else releases
        after = self.spent([*releases, {"noise_multiplier": noise_multiplier}], budget.delta)
        if after > budget.epsilon:
            raise BudgetRefusal(
                f"this node's privacy budget is spent: its {len(releases)} release(s) so far make ε = "
                f"{self.spent(releases, budget.delta):.4g} at δ = {budget.delta:g} ({self.path}); one more at noise "
                f"multiplier {noise_multiplier:g} (σ = {2 * noise_multiplier:g}) would make ε = {after:.4g}, over its "
                f"dp-epsilon = {budget.epsilon:g}")
        return after

    def record(self, budget: NodeBudget, noise_multiplier: float, run_id: str, round_idx: int, client: int) -> float:
        """Record one release, checked against the budget under an exclusive lock (two processes of a node
        cannot both take its last share); written atomically before the reply leaves. Returns ε after it."""
        import fcntl

        from ...rundir import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(LEDGER + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._checked()
                releases = data["releases"]
                after = self.check(budget, noise_multiplier, releases)
                releases.append({"run_id": str(run_id), "round": int(round_idx), "client": int(client),
                                 "noise_multiplier": float(noise_multiplier), "time": time.time()})
                atomic_write_text(self.path, json.dumps({**data, "releases": releases}, indent=1))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return after


def check_state_dir(state_dir, missing_ok: bool = False) -> None:
    """Raise :class:`FileNotFoundError` / :class:`NotADirectoryError`, naming the path, unless ``state_dir`` is a
    folder (or, with ``missing_ok``, does not exist yet)."""
    p = Path(state_dir)
    if p.is_dir() or (missing_ok and not p.exists()):
        return
    if p.exists():
        raise NotADirectoryError(f"{p} is a file, not a SuperNode's state-dir: give the folder of its node config "
                                 f"state-dir (the one that holds {LEDGER})")
    raise FileNotFoundError(f"{p}: no such folder, so no ledger was read (its releases are not known, not zero): give "
                            "the SuperNode's node config state-dir, or start an empty ledger there knowingly with --start")


def ledger_report(state_dir, delta: float = 1e-5, budget: float | None = None) -> str:
    """What a node's ledger says, for its operator (``fedmoe node-privacy``): its releases by run, and ε at
    ``delta`` over all of them (and what is left of ``budget``). A ``state_dir`` that is not a folder is an
    error (a mistyped path must not read as "nothing spent")."""
    check_state_dir(state_dir)
    ledger = PrivacyLedger(state_dir)
    data = ledger._checked()
    releases = data["releases"]
    accepted = data.get("accepted_stores", [])
    said = (f"\n{len(accepted)} store(s) of rounds accepted without a recorded release (accounted for elsewhere, "
            "not counted here)" if accepted else "")
    if not releases:
        return f"{ledger.path}: no release recorded (ε = 0)" + said
    by_run: dict[str, list[dict]] = {}
    for r in releases:
        by_run.setdefault(str(r.get("run_id")), []).append(r)
    lines = [f"{ledger.path}: {len(releases)} release(s)"]
    for run, rs in by_run.items():
        sigmas = sorted({2 * float(r["noise_multiplier"]) for r in rs})
        lines.append(f"  run {run}: {len(rs)} (rounds {', '.join(str(r.get('round')) for r in rs)}; σ = "
                     f"{', '.join(f'{x:g}' for x in sigmas)}), ε = {ledger.spent(rs, delta):.4g} alone")
    spent = ledger.spent(releases, delta)
    lines.append(f"ε = {spent:.4g} at δ = {delta:g} over all of them"
                 + ("" if budget is None else f"; of dp-epsilon = {budget:g}, {max(0.0, budget - spent):.4g} left"))
    return "\n".join(lines) + said


__all__ = ["BUDGET_KEYS", "LEDGER", "BudgetRefusal", "NodeBudget", "PrivacyLedger", "budget_refusal", "check_state_dir", "ledger_report", "node_budget"]
