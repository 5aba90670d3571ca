"""Client-level differential privacy (``federation.dp``): DP-FedAvg (McMahan, Ramage, Talwar, Zhang,
ICLR 2018, "Learning Differentially Private Recurrent Language Models") on a method's aggregation.

Each round, with θ the global state, m the number of clients sampled (a constant of the config:
the fixed denominator) and C, σ = ``federation.dp.clip_norm``, ``noise_multiplier``:

    Δ_i = θ_i − θ                      over the global tensors (all the server aggregates of reply i)
    Δ_i ← Δ_i · min(1, C / ‖Δ_i‖₂)     one L2 norm over all of them (flat clipping)
    Δ̄  = (Σ_i w_i ⊙ Δ_i + N(0, σ²C²)) / m      w_i in [0, 1] from reply i alone (``Server.dp_weights``;
                                                uniform by default: DP-FedAvg's estimator)
    θ ← the server optimizer on θ + Δ̄ (``none``: θ + Δ̄)

Adding or removing one client changes Σ_i w_i ⊙ Δ_i by at most C (‖w_i ⊙ Δ_i‖ ≤ ‖Δ_i‖ ≤ C) and m does
not depend on the data, so a round is the Gaussian mechanism with noise multiplier σ; everything
after it (the server optimizer, the downlinks, the next rounds) is post-processing. The noise is
added to the average before the server optimizer, so its moments are computed from private values too.

Accounting: Rényi DP of Google's ``dp-accounting`` (the library Flower's own ``RdpAccountant``
wraps), one Gaussian event per applied round, add-or-remove-one client, no amplification by client
sampling. With ``federation.fraction`` < 1 a fixed number m < N of clients is sampled without
replacement: a client added to the population may take the place of one that would have been sampled, so
the clipped sum moves by up to 2C and a round is accounted with noise multiplier σ/2
(:func:`central_multiplier`; the σ-accounting, which Flower's fixed-clipping strategies use, understates ε
there: a δ of 1e-2 at the ε it gives for 1e-5).

Clipping is done by the server on each reply (central DP: the server is trusted with individual
updates, as in Flower's server-side fixed clipping); what the guarantee covers is the sequence of
global models. The run's own logs (per-client losses, activation counts, the report) are not private.

Local DP (``where: client``): each client clips and noises its own update (:func:`privatize_reply`); with
``reports: withhold`` (the default) it applies its method's weights itself, sends nothing else its data
decides (n_train = 1; no counts, loss or data sizes) and the server takes the plain mean of the noised
updates (:class:`WithheldReports`, :func:`uniform_aggregate`).

Why not Flower's helpers (``flwr.supercore.differential_privacy``): fedmoe runs its own loop on both
runtimes (the methods' replies are not the identical ArrayRecords Flower's strategies wrap), its
noise helper draws from NumPy's global generator (fedmoe draws every random number from a named,
seeded stream, so that a resumed run is exact), and its clipping helper works on NumPy arrays and
divides by the norm of an all-zero update. The formulas are the same: tests compare with Flower's.
"""

from __future__ import annotations

import math

import torch

from ..algorithms.base import N_TRAIN
from ..algorithms.server_opt import server_update
from ..config import ConfigError
from ..seeds import Stream, derive_seed

State = dict[str, torch.Tensor]
CLIENT_ACCOUNTING = ("Rényi DP (dp-accounting) per client: one Gaussian mechanism of sensitivity 2C and noise σC "
                     "(noise multiplier σ/2) per update the client sent (usable or not), its data replaced by any other")
# what reaches the server from a client under local DP besides its noised updates, which ε does not cover
NOT_COVERED = {
    "withhold": "its evaluation results — the test loss and scores, on its own test data, of the models it is "
                "sent, which for a personalised method (FLAME's rescaler, FLEx's grafts) hold private parameters it "
                "trained without noise — and its test set's size (sent at setup and shown by every evaluation; its "
                "training set's size follows from it by the train/val/test split; a node under its own privacy budget, "
                "node config dp-epsilon, keeps both); with eval.share_examples, sample answers with their references; a "
                "failed client's error message; and how long its work took",
    "send": "its number of training examples, its training report (loss, steps, tokens, expert counts, the "
            "method's metrics), FLAME's activation counts, the categories of its data, and its evaluation results",
}
ACCOUNTING = ("Rényi DP (dp-accounting), one Gaussian mechanism per round, add-or-remove-one client, "
              "no amplification by client sampling")
ACCOUNTING_SAMPLED = ("Rényi DP (dp-accounting), one Gaussian mechanism per round of sensitivity 2C (noise multiplier "
                      "σ/2: a fixed number of clients is sampled, so one client added may replace one that would have "
                      "been sampled), add-or-remove-one client, no amplification by client sampling")


def require_dp_accounting() -> None:
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise ConfigError("federation.dp reports (ε, δ) with Google's dp-accounting, which is not installed: "
                          "pip install 'fedmoe[dp]' (or remove federation.dp)") from None


def update_norm(update: State) -> float:
    """The L2 norm of all tensors of ``update`` together (float64)."""
    return math.sqrt(sum(float((t.to(torch.float64) ** 2).sum()) for t in update.values()))


def clip_update(update: State, clip_norm: float) -> tuple[State, float]:
    """(update · min(1, C/‖update‖) in float64, ‖update‖): the flat clipping of DP-FedAvg."""
    norm = update_norm(update)
    scale = clip_norm / norm if norm > clip_norm else 1.0
    return {n: t.to(torch.float64) * scale for n, t in update.items()}, norm


def _broadcast(w, like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(w, dtype=torch.float64)
    if not bool(torch.all((w >= 0) & (w <= 1))):
        raise ValueError(f"DP weights must be in [0, 1], got {w}")
    return w.reshape(*w.shape, *([1] * (like.dim() - w.dim())))


def gaussian_noise(shape, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def private_aggregate(server, cfg, global_state: State, server_state: dict, replies, denominator: int,
                      round_idx: int) -> tuple[State, dict, dict]:
    """The round's aggregation under ``cfg.federation.dp``: (new global state, server state, metrics)."""
    dp = cfg.federation.dp
    C, sigma = dp.clip_norm, dp.noise_multiplier
    total = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in global_state.items()}
    clipped = 0
    for r in replies:
        delta = {n: r.message.tensors[n].to(torch.float64) - t.to(torch.float64) for n, t in global_state.items()}
        delta, norm = clip_update(delta, C)
        clipped += norm > C
        weights = server.dp_weights(global_state, r)
        for n in total:
            total[n] += delta[n] if n not in weights else _broadcast(weights[n], delta[n]) * delta[n]
    if dp.server_noise == "seeded":  # reproducible, and removable by whoever has the config: simulations only
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, Stream.DP_NOISE, round_idx))
        draw = lambda shape: gaussian_noise(shape, sigma * C, gen)  # noqa: E731
    else:  # every SuperNode has the config (its seed): a seeded noise could be rebuilt and subtracted
        draw = lambda shape: secret_normal(shape) * (sigma * C)  # noqa: E731
    averaged = {}
    for n, t in global_state.items():
        noisy = total[n] + draw(t.shape) if sigma > 0 else total[n]
        averaged[n] = (t.to(torch.float64) + noisy / denominator).to(t.dtype)
    new, server_state = server_update(cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                          round_idx=round_idx)
    return new, server_state, {"dp_clipped_fraction": clipped / max(1, len(replies)),
                               "dp_noise_std": sigma * C / denominator}


def secret_normal(shape) -> torch.Tensor:
    """Standard normal float64 values of ``shape`` drawn from the operating system's cryptographic generator
    (``client_noise: secret``): each pair by Box–Muller from fresh ``os.urandom`` bytes, kept nowhere. No seed stands
    behind them that a server could search: a generator seeded with a number (torch's CPU generator keeps 32 bits of
    its seed; PCG64's state can be recovered from its output) has few enough streams to try each against a release
    and subtract the noise; Opacus's secure mode draws its noise from a cryptographic generator for the same reason.
    No two releases share noise (a round sent again, by a restart or by a server replaying it with another model, gets
    new noise; two releases with the same noise would give away the difference of their updates).

    The radius's uniform has every float's share (:func:`_open_unit`): from a 53-bit uniform it could not pass
    √(106 ln 2) = 8.57, a Gaussian cut off there, whose missing tail is a δ the accounting does not count (at
    σ = 0.5 and sensitivity 2C, about 2.4e-6 per release). Now the tail goes on as the Gaussian's, down to a
    probability of 2^-1000."""
    import os

    import numpy as np

    n = math.prod(shape)
    pairs = (n + 1) // 2
    u = _open_unit(pairs)
    angle = 2.0 * np.pi * (np.frombuffer(os.urandom(8 * pairs), dtype="<u8") >> np.uint64(11)).astype(np.float64) \
        * 2.0 ** -53
    radius = np.sqrt(-2.0 * np.log(u))
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    return torch.from_numpy(z.copy()).reshape(shape)


def _open_unit(n: int):
    """``n`` uniforms on (0, 1) from ``os.urandom`` with every float's share: the binade [2^-(k+1), 2^-k) with
    probability 2^-(k+1), k the leading zero bits of a stream of random bits (a word of 64 at a time, the next only
    where one was all zeros: up to 1000 in all), then 52 random bits of mantissa within it."""
    import os

    import numpy as np

    lead = np.frombuffer(os.urandom(8 * n), dtype="<u8").copy()
    zeros = np.zeros(n, dtype=np.int64)
    empty = lead == 0
    while empty.any() and zeros.max() < 960:
        zeros[empty] += 64
        lead[empty] = np.frombuffer(os.urandom(8 * int(empty.sum())), dtype="<u8")
        empty = lead == 0
    zeros += 64 - _bit_length(lead)  # an all-zero word left at the cap: 64 more
    mantissa = (np.frombuffer(os.urandom(8 * n), dtype="<u8") >> np.uint64(12)).astype(np.float64) * 2.0 ** -52
    return np.ldexp(1.0 + mantissa, -(zeros + 1))


def _bit_length(words):
    """The bit length of each uint64 (0 for 0), exactly (no float rounding)."""
    import numpy as np

    x, out = words.copy(), np.zeros(words.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = x >= (np.uint64(1) << np.uint64(shift))
        out[big] += shift
        x[big] >>= np.uint64(shift)
    return out + (x > 0)


def withholds(cfg) -> bool:
    """Local DP with withheld reports (``federation.dp.where: client``, ``reports: withhold``)."""
    dp = cfg.federation.dp
    return dp is not None and dp.where == "client" and dp.reports == "withhold"


# what a client keeps to itself under withheld reports: of its training report, and of what it says of its data
WITHHELD_TRAINING = ("loss", "steps", "tokens", "activation_counts", "metrics")
WITHHELD_DATA = ("n_train", "category_counts", "skipped_rows")


def withhold_setup(cfg, metrics: dict, data: dict) -> tuple[dict, dict]:
    """What a client's one-shot setup tells the server: under withheld reports its time only, and its data's
    description without :data:`WITHHELD_DATA` (the size and categories of its training data; FLEx's
    calibration token count and the memory it took, which follow from them)."""
    if not withholds(cfg):
        return metrics, data
    return ({k: v for k, v in metrics.items() if k == "seconds"},
            {k: v for k, v in data.items() if k not in WITHHELD_DATA})


def privatize_reply(cfg, reply, sent, client: int, round_idx: int, weights: dict[str, torch.Tensor] | None = None):
    """``federation.dp.where: client``: the reply with each tensor it was sent replaced by θ + Δ̃, where
    Δ = θ_i − θ over those tensors together is clipped to L2 norm C, multiplied by ``weights`` (each in
    [0, 1]: the method's own, :meth:`Client.dp_weights`; a tensor not named weighs 1) and Δ̃ = Δ + N(0, σ²C²)
    (the noise drawn here, from the operating system's cryptographic generator, :func:`secret_normal`, or,
    ``client_noise: seeded``, from the run's seed).
    Returns (reply, ‖Δ‖ before clipping). A Δ that is not finite is replaced by zeros (the release is the noise
    alone; whether training diverged is itself data-dependent). Each release is a Gaussian mechanism of
    sensitivity 2C (any two weighted clipped updates of this client differ by at most 2C) and noise σC; what
    the server does with it is post-processing. With ``reports: withhold`` the reply keeps only those tensors and n_train = 1: any
    other tensor (FLAME's counts) and scalar were computed from the data without noise."""
    from ..messages import Message

    dp = cfg.federation.dp
    names = [n for n in sorted(reply.tensors) if n in sent.tensors and reply.tensors[n].is_floating_point()]
    delta = {n: reply.tensors[n].to(torch.float64) - sent.tensors[n].to(torch.float64) for n in names}
    delta, norm = clip_update(delta, dp.clip_norm)
    if not math.isfinite(norm):  # a diverged update (NaN: never clipped; inf: 0 · inf): nothing of it goes, noise only
        delta = {n: torch.zeros_like(d) for n, d in delta.items()}
    for n, w in (weights or {}).items():
        delta[n] = _broadcast(w, delta[n]) * delta[n]
    std = dp.noise_multiplier * dp.clip_norm
    if dp.client_noise == "seeded":  # reproducible, and removable by whoever has the config: simulations only
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, Stream.CLIENT_DP_NOISE, round_idx, client))
        draw = lambda shape: gaussian_noise(shape, std, gen)  # noqa: E731
    else:
        draw = lambda shape: secret_normal(shape) * std  # noqa: E731
    out = dict(reply.tensors)
    for n in names:
        noisy = delta[n] + draw(delta[n].shape)
        out[n] = (sent.tensors[n].to(torch.float64) + noisy).to(reply.tensors[n].dtype)
    scalars = dict(reply.scalars)
    if withholds(cfg):
        out = {n: t for n, t in out.items() if n in sent.tensors}
        scalars = {N_TRAIN: 1}
    return Message(out, scalars, dict(reply.header)), norm


def uniform_aggregate(cfg, global_state: State, server_state: dict, replies, round_idx: int) -> tuple[State, dict, dict]:
    """Local DP with withheld reports: θ + the plain mean of the replies' (noised) updates over the global
    tensors, then the server optimizer. The weights a method would give a reply (n_i, FLAME's counts) stayed on
    its client: FLAME's were applied there (:meth:`Client.dp_weights`), as central DP applies them on the server."""
    averaged = {}
    for n, t in global_state.items():
        total = sum(r.message.tensors[n].to(torch.float64) - t.to(torch.float64) for r in replies)
        averaged[n] = (t.to(torch.float64) + total / len(replies)).to(t.dtype)
    new, server_state = server_update(cfg.algorithm.server_optimizer, global_state, averaged, server_state,
                                      round_idx=round_idx)
    return new, server_state, {}


class WithheldReports:
    """The server half as the runtime meets the clients' replies under withheld reports: a reply carries the
    global tensors and n_train = 1 only (no method extras, no other scalar). The aggregation of a method that
    takes central DP (``supports_dp``) is its DP estimator, :func:`uniform_aggregate` (its weights applied on
    the clients); another method that takes local DP (FC-MoE with ``importance: n``) aggregates as its own,
    every client weighing 1. Everything else is the method's server half."""

    def __init__(self, server, cfg):
        self._server, self._cfg = server, cfg
        self.reply_scalars = (N_TRAIN,)

    def __getattr__(self, name):
        return getattr(self._server, name)

    def reply_extras(self, global_state: State) -> dict:
        return {}

    def aggregate(self, global_state: State, server_state: dict, replies, *, round_idx: int):
        if not self._server.supports_dp:
            return self._server.aggregate(global_state, server_state, replies, round_idx=round_idx)
        return uniform_aggregate(self._cfg, global_state, server_state, replies, round_idx)


def client_epsilon(cfg, rounds: int) -> float:
    """ε at δ of one client that released ``rounds`` locally privatised updates (where: client): Gaussian
    mechanisms of sensitivity 2C and noise σC, i.e. noise multiplier σ/2."""
    dp = cfg.federation.dp
    return epsilon(dp.noise_multiplier / 2, rounds, dp.delta)


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε at ``delta`` after ``rounds`` Gaussian mechanisms of noise multiplier σ (RDP accountant of
    dp-accounting, add-or-remove-one, no sampling amplification); ∞ without noise, 0 before round 1."""
    return composed_epsilon({noise_multiplier: rounds}, delta)


def composed_epsilon(releases: dict[float, int], delta: float) -> float:
    """ε at ``delta`` of Gaussian mechanisms composed, ``releases`` = {noise multiplier: how many} (RDP
    accountant of dp-accounting, add-or-remove-one, no sampling amplification): ∞ if any has no noise, 0 for
    none."""
    releases = {float(z): int(n) for z, n in releases.items() if n > 0}
    if not releases:
        return 0.0
    if min(releases) <= 0:
        return math.inf
    from dp_accounting import GaussianDpEvent, NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    try:
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        for z, n in sorted(releases.items()):
            accountant.compose(GaussianDpEvent(z), n)
        return float(accountant.get_epsilon(delta))
    except (OverflowError, ZeroDivisionError, FloatingPointError):
        # σ far outside any real setting (σ² overflows past ~1e154): the closed-form bound of the same
        # composition instead, never a crash. n Gaussian mechanisms of noise multiplier z are ρ-zCDP with
        # ρ = Σ n / (2z²), which is (ρ + 2·sqrt(ρ·log(1/δ)), δ)-DP (Bun & Steinke 2016, Prop. 1.3): a valid ε
        # for the same δ
        rho = sum(n / 2 / z / z for z, n in releases.items())
        bound = rho + 2 * math.sqrt(rho * math.log(1 / delta))
        return bound if math.isfinite(bound) else math.inf


def samples_everyone(cfg) -> bool:
    """Whether every round samples every client (``federation.fraction`` rounds to all of them)."""
    from .sampling import sample_clients

    n = cfg.data.partition.num_clients
    return len(sample_clients(n, cfg.federation.fraction, cfg.seed, 1)) == n


def central_multiplier(cfg, sigma: float | None = None) -> float:
    """The noise multiplier one round of central DP is accounted with: σ when every client is in every round (one
    client added or removed moves the clipped sum by at most C); σ/2 when a fixed number m < N is sampled without
    replacement: a client added may take the place of one that would have been sampled, and the sum moves by up to
    2C (sensitivity 2C, noise σC). Not amplified by the sampling (a fixed-size sample is no Poisson one)."""
    sigma = cfg.federation.dp.noise_multiplier if sigma is None else sigma
    return sigma if samples_everyone(cfg) else sigma / 2


def planned_epsilon(cfg, noise_multiplier: float | None = None) -> float:
    """ε at ``delta`` after ``federation.rounds`` rounds at σ (``noise_multiplier``, else the config's): the
    whole run's for central DP (:func:`central_multiplier`), a client's that sends an update every round for local
    DP (noise multiplier σ/2 per release)."""
    dp = cfg.federation.dp
    sigma = dp.noise_multiplier if noise_multiplier is None else noise_multiplier
    return epsilon(sigma / 2 if dp.where == "client" else central_multiplier(cfg, sigma), cfg.federation.rounds,
                   dp.delta)


def noise_for_epsilon(cfg) -> float:
    """The smallest σ (to 6 significant digits, rounded up) whose :func:`planned_epsilon` is at most
    ``federation.dp.target_epsilon``: bisection on ε(σ), which falls as σ grows."""
    target = cfg.federation.dp.target_epsilon
    hi = 1.0
    while planned_epsilon(cfg, hi) > target:
        hi *= 2
        if hi > 1e6:  # ε(1e6) ≈ 0 for any real number of rounds: not reached
            raise ConfigError(f"federation.dp.target_epsilon = {target:g} needs σ above 1e6 over "
                              f"{cfg.federation.rounds} rounds: raise target_epsilon or lower federation.rounds")
    lo = 0.0
    while hi - lo > 1e-7 * hi:
        mid = (lo + hi) / 2
        if planned_epsilon(cfg, mid) > target:
            lo = mid
        else:
            hi = mid
    digits = 5 - math.floor(math.log10(hi))
    sigma = math.ceil(hi * 10 ** digits) / 10 ** digits  # up: ε stays within the target
    return sigma if planned_epsilon(cfg, sigma) <= target else hi


def resolve_noise(cfg):
    """``cfg`` with ``federation.dp.noise_multiplier`` computed from ``target_epsilon`` where it is not given,
    so that the run's config.yaml fixes σ (a resume uses the same); a σ that is given must keep ε within a
    target given beside it. Other configs unchanged."""
    dp = cfg.federation.dp
    if dp is None or dp.target_epsilon is None:
        return cfg
    require_dp_accounting()
    if dp.noise_multiplier is None:
        dp = dp.model_copy(update={"noise_multiplier": noise_for_epsilon(cfg)})
        return cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"dp": dp})})
    spent = planned_epsilon(cfg)
    if spent > dp.target_epsilon:
        raise ConfigError(f"federation.dp.noise_multiplier = {dp.noise_multiplier:g} spends ε = {spent:.4g} over "
                          f"{cfg.federation.rounds} rounds (δ = {dp.delta:g}), more than federation.dp.target_epsilon = "
                          f"{dp.target_epsilon:g}: remove noise_multiplier to have the smallest σ that keeps within "
                          "the target computed, or raise it")
    return cfg


def round_metrics(cfg, rounds: int, client_rounds: list[int] | None = None) -> dict:
    """What a round's server row reports: ε after ``rounds`` releases (where: server, the noised aggregates computed;
    where: client, ε of the client that sent the most updates so far, ``client_rounds``), and δ."""
    dp = cfg.federation.dp
    if dp.where == "client":
        return {"dp_epsilon": client_epsilon(cfg, max(client_rounds or [0])), "dp_delta": dp.delta}
    return {"dp_epsilon": epsilon(central_multiplier(cfg), rounds, dp.delta), "dp_delta": dp.delta}


def _target(cfg) -> dict:
    dp = cfg.federation.dp
    return {"target_epsilon": dp.target_epsilon, "target_rounds": cfg.federation.rounds} if dp.target_epsilon else {}


def privacy_summary(cfg, rounds: int, denominator: int, client_rounds: dict[int, int] | None = None,
                    releases: int | None = None) -> dict:
    """summary.json's ``privacy`` block (where: client, with each client's ε over the updates it sent; where: server,
    ε over ``releases``, the noised aggregates computed — more than ``rounds`` where a round ran again after a resume)."""
    dp = cfg.federation.dp
    if dp.where == "client":
        per = {cid: client_epsilon(cfg, n) for cid, n in sorted((client_rounds or {}).items())}
        return {"where": "client", "epsilon": max(per.values(), default=0.0), "epsilon_by_client": per,
                "delta": dp.delta, "rounds": rounds, "clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier,
                "client_noise": dp.client_noise, "accounting": CLIENT_ACCOUNTING, "reports": dp.reports,
                "not_covered": NOT_COVERED[dp.reports], **_target(cfg)}
    releases = rounds if releases is None else max(rounds, releases)
    return {"where": "server", "epsilon": epsilon(central_multiplier(cfg), releases, dp.delta), "delta": dp.delta,
            "rounds": rounds, "releases": releases, "server_noise": dp.server_noise,
            "clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier, "clients_per_round": denominator,
            "noise_std_of_average": dp.noise_multiplier * dp.clip_norm / denominator,
            "accounting": ACCOUNTING if samples_everyone(cfg) else ACCOUNTING_SAMPLED, **_target(cfg)}


__all__ = ["WithheldReports", "clip_update", "composed_epsilon", "epsilon", "privacy_summary", "private_aggregate",
           "privatize_reply", "require_dp_accounting", "secret_normal", "uniform_aggregate", "update_norm", "withhold_setup", "withholds"]
