#!/usr/bin/env python
"""The tables and verdicts of benchmarks/EVIDENCE.md, from the runs of the four evidence sweeps.

    fedmoe run configs/evidence-concept-shift.yaml --jobs 2
    python benchmarks/evidence_tables.py concept-shift          # or label-skew, compute, fcmoe-paper, all
    python benchmarks/evidence_tables.py all --runs /elsewhere/runs --out tables.md

Reads ``<runs>/evidence-<scenario>/<point>/summary.json`` (and ``metrics.jsonl`` for the per-round
server metrics). A point is named by its sweep axes (``seed=0,method=FedIT``; a sweep without a seed axis,
``alpha=dirichlet-0.1,method=FedIT``, takes the seed from summary.json); every table groups the points by
everything but the seed. Numbers: the mean over seeds with a 95% t interval over seeds (2
degrees of freedom for 3 seeds). A comparison A − B: the per-seed differences' mean and t interval, and
the pooled paired bootstrap over every test example of every client of every seed (the same seed gives
both methods the same test examples, in the same order). Verdicts follow the rule EVIDENCE.md states:
*shown* / *refuted* when the pooled paired interval excludes 0 in / against the predicted direction,
*not shown* when it contains 0. That interval holds the training seeds fixed: a second column gives the verdict
of the t interval over seeds (the same rule on it; "one seed" without one), which is what says whether a
difference would survive other seeds (with 3 seeds it needs mean/se > 4.30). A mean over seeds with a seed
lacking its value, and a comparison with a seed lacking test examples, say so. ``all`` prints fcmoe-paper only
when its sweep folder exists.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedmoe.eval.stats import paired_bootstrap  # noqa: E402
from fedmoe.rundir import loads  # noqa: E402

# Student's t, 97.5th percentile, by degrees of freedom (scipy.stats.t.ppf to 3 decimals); beyond 30 its expansion in
# 1/df (Abramowitz & Stegun 26.7.5, within 1e-4 there): 1.96 from 10 seeds on made an interval 12% too narrow at 11
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
        12: 2.179, 13: 2.16, 14: 2.145, 15: 2.131, 16: 2.12, 17: 2.11, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.08,
        22: 2.074, 23: 2.069, 24: 2.064, 25: 2.06, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)


# ---------------------------------------------------------------------------------------- loading
def parse_point(name: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in name.split(","))


class Run:
    def __init__(self, path: Path):
        self.path = path
        self.axes = parse_point(path.name)
        self.summary = loads((path / "summary.json").read_text())
        self.seed = int(self.axes.pop("seed", self.summary.get("seed", 0)))  # a sweep without a seed axis
        self.key = tuple(sorted(self.axes.items()))
        from fedmoe.rundir import RunDir

        self.metrics = RunDir(path, create=False).read_metrics()  # rows of any fedmoe version (kind / split)

    @property
    def clients(self) -> list[dict]:
        return self.summary["clients"]

    def client_scores(self, cids) -> list[float]:
        out = []
        for c in self.clients:
            if c["id"] in cids:
                out += c.get("scores") or []
        return out

    def heldout_scores(self, cids) -> list[float]:
        """Each client's own model on the shared held-out set (a method without personal models: the
        global model's, once per client, so that the pairs line up)."""
        g = self.summary["global"].get("heldout_scores") or []
        out = []
        for c in self.clients:
            if c["id"] in cids:
                out += c.get("heldout_scores") or g
        return out

    def server_mean(self, key: str) -> float | None:
        vals = [r[key] for r in self.metrics if r.get("kind") == "server" and isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None


def load_runs(folder: Path) -> dict[tuple, dict[int, Run]]:
    """{axes without the seed: {seed: run}} for every finished point of a sweep folder."""
    runs: dict[tuple, dict[int, Run]] = defaultdict(dict)
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.is_dir() and (p / "summary.json").is_file() and "=" in p.name:
            r = Run(p)
            runs[r.key][r.seed] = r
    if not runs:
        raise SystemExit(f"no finished runs in {folder}: run the sweep first (see EVIDENCE.md)")
    return runs


# ---------------------------------------------------------------------------------------- statistics
class CI(tuple):
    """``(mean, half-width)`` of a 95% t interval over seeds, which also knows over how many of how many seeds: ``n``
    values went in, of ``of`` (a seed without the value, e.g. a run that logged no such metric, is left out and said)."""

    def __new__(cls, mean: float, half: float, n: int, of: int):
        ci = super().__new__(cls, (mean, half))
        ci.n, ci.of = n, of
        return ci


def mean_ci(values: list[float]) -> CI | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return CI(m, float("nan"), 1, len(values))
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return CI(m, t975(len(vals) - 1) * sd / math.sqrt(len(vals)), len(vals), len(values))


def fmt(mc, digits: int = 1) -> str:
    if mc is None:
        return "–"
    m, h = mc
    text = f"{m:.{digits}f}" if math.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"
    n, of = getattr(mc, "n", None), getattr(mc, "of", None)
    return text + (f" ({n} of {of} seeds)" if n is not None and of is not None and n < of else "")


def global_of(run, key: str):
    """The global model's ``key``; None ("–") for a method that trains no global model (local_only: its global model
    is the initial one, whose numbers are the zero-shot ones)."""
    return None if run.summary.get("global_model_trained") is False else run.summary["global"].get(key)


def accuracy(scores: list[float]) -> float | None:
    return sum(scores) / len(scores) if scores else None


def seed_verdict(seed_ci, direction: int) -> str:
    """The verdict of the t interval over seeds (each seed's difference a draw over training seeds and test samples):
    shown / refuted when it excludes 0 in / against ``direction``; "one seed" when there is no interval."""
    if seed_ci is None or math.isnan(seed_ci[1]):
        return "one seed"
    m, h = seed_ci
    sign = 1 if m - h > 0 else -1 if m + h < 0 else 0
    return "not shown" if sign == 0 else ("shown" if sign == direction else "refuted")


def compare(a: dict[int, Run], b: dict[int, Run], scores, direction: int) -> dict:
    """A − B on the per-example ``scores(run)``: per-seed means, pooled paired bootstrap, verdict (the rule set before
    the runs: the pooled interval, test-sample noise) and the seed interval's verdict (training seeds too)."""
    if not a or not b:
        return {"n": 0, "verdict": "not run"}
    seeds = sorted(set(a) & set(b))
    per_seed, xa, xb, empty = [], [], [], []
    for s in seeds:
        sa, sb = scores(a[s]), scores(b[s])
        if len(sa) != len(sb):
            raise ValueError(f"seed {s}: {len(sa)} vs {len(sb)} examples: not paired")
        if not sa:
            empty.append(s)  # no test example of these clients in this seed: no difference, said so
            continue
        per_seed.append(accuracy(sa) - accuracy(sb))
        xa += sa
        xb += sb
    if not xa:
        return {"n": 0, "seeds_empty": empty}
    boot = paired_bootstrap(xa, xb, seed=0)
    if boot["low"] > 0:
        sign = 1
    elif boot["high"] < 0:
        sign = -1
    else:
        sign = 0
    verdict = "not shown" if sign == 0 else ("shown" if sign == direction else "refuted")
    seed_ci = mean_ci(per_seed)
    return {"n": boot["n"], "seeds": len(per_seed), "seed_ci": seed_ci, "per_seed": per_seed,
            "seeds_unpaired": sorted(set(a) ^ set(b)),  # a seed one side lacks: left out of the comparison, said so
            "seeds_empty": empty, "mean": boot["mean"], "low": boot["low"], "high": boot["high"], "verdict": verdict,
            "seed_verdict": seed_verdict(seed_ci, direction)}


def fmt_compare(c: dict) -> str:
    if c.get("verdict") == "not run":
        return "(one side not run)"
    empty = c.get("seeds_empty")
    said = f"; seed(s) {', '.join(map(str, empty))} without a test example here, left out" if empty else ""
    if not c.get("n"):
        return "no paired examples" + said
    per = ", ".join(f"{d:+.1f}" for d in c["per_seed"])
    lacking = c.get("seeds_unpaired")
    return (f"{c['mean']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}] pooled over {c['n']} examples; "
            f"seeds {fmt(c['seed_ci'])} ({per})"
            + (f"; seed(s) {', '.join(map(str, lacking))} run on one side only, left out" if lacking else "") + said)


def label_concentration(by: dict[int, Run]) -> tuple[float, float]:
    """The premise of a label skew, from the clients' training labels over every seed: the mean client's
    largest label share and its number of labels with at least 5% of its examples."""
    shares, nlab = [], []
    for s in sorted(by):
        for c in by[s].clients:
            counts = c.get("category_counts") or {}
            tot = sum(counts.values())
            if tot:
                shares.append(max(counts.values()) / tot)
                nlab.append(sum(1 for v in counts.values() if v / tot >= 0.05))
    return sum(shares) / len(shares), sum(nlab) / len(nlab)


def find(runs, **axes) -> dict[int, Run]:
    """The runs (by seed) of one sweep point without its seed; {} when that point was not run (a smoke
    variant runs a few methods: its comparisons are then "not run")."""
    return runs.get(tuple(sorted(axes.items())), {})


def verdict_rows(preds) -> list[str]:
    lines = ["| id | comparison | difference (points): pooled paired 95% interval; seeds: mean ± 95% interval (each) "
             "| verdict | across seeds |", "|---|---|---|---|---|"]
    for pid, text, c in preds:
        lines.append(f"| {pid} | {text} | {fmt_compare(c)} | **{c.get('verdict', '–')}** | "
                     f"{c.get('seed_verdict', '–')} |")
    return lines


# ---------------------------------------------------------------------------------------- scenario 1
def concept_shift(folder: Path) -> str:
    runs = load_runs(folder)
    methods = [dict(k)["method"] for k in runs]
    any_run = next(r for by in runs.values() for r in by.values() if r.summary.get("label_groups"))
    groups = any_run.summary["label_groups"]["client_group"]
    major = {c for c, g in enumerate(groups) if g == 0}
    minor = {c for c, g in enumerate(groups) if g != 0}
    out = [f"### Scenario 1 tables ({folder.name}, {len(next(iter(runs.values())))} seeds)", "",
           f"Majority: clients {sorted(major)} (original labels); minority: clients {sorted(minor)} (shifted). "
           "Accuracy (%) of each client's own model on its own test set, mean over seeds ± 95% interval.", "",
           "| method | all clients | majority | minority | global model | conflicting expert-update pairs | "
           "FC-MoE: updates projected | zero-shot (all) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        by = find(runs, method=m)
        seeds = sorted(by)
        cell = lambda f: fmt(mean_ci([f(by[s]) for s in seeds]))  # noqa: E731
        all_c = set(range(len(groups)))
        zs = [accuracy([x for c in by[s].clients if c.get("zero_shot_scores") for x in c["zero_shot_scores"]])
              for s in seeds]
        out.append(f"| {m} | {cell(lambda r: accuracy(r.client_scores(all_c)))} | "
                   f"{cell(lambda r: accuracy(r.client_scores(major)))} | {cell(lambda r: accuracy(r.client_scores(minor)))} | "
                   f"{cell(lambda r: global_of(r, 'accuracy'))} | "
                   f"{fmt(mean_ci([by[s].server_mean('update_conflict_experts') for s in seeds]), 3)} | "
                   f"{fmt(mean_ci([by[s].server_mean('projected_fraction') for s in seeds]), 3)} | "
                   f"{fmt(mean_ci(zs))} |")
    # the premise: conflict with and without the shift, seed by seed
    shift, ctrl = find(runs, method="FedIT"), find(runs, method="FedIT-no-shift")
    seeds = sorted(set(shift) & set(ctrl))
    pairs = [(shift[s].server_mean("update_conflict_experts"), ctrl[s].server_mean("update_conflict_experts"))
             for s in seeds]
    cos = [(shift[s].server_mean("update_cosine_experts"), ctrl[s].server_mean("update_cosine_experts")) for s in seeds]
    holds = bool(pairs) and all(a is not None and b is not None and a > b for a, b in pairs)
    num = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    out += ["", "**Premise C0** (FedIT, mean over rounds, per seed): conflicting expert-update pairs with the shift "
            + ", ".join(num(a) for a, _ in pairs) + "; without it " + ", ".join(num(b) for _, b in pairs)
            + "; mean pairwise cosine of expert updates with the shift " + ", ".join(num(a) for a, _ in cos)
            + ", without " + ", ".join(num(b) for _, b in cos)
            + f". C0 {'holds' if holds else 'does not hold'} (higher with the shift in every seed: {holds})."
            if pairs else "(FedIT or FedIT-no-shift not run: no premise C0)"]
    fc = find(runs, method="FC-MoE")
    cos_fc = [fc[s].server_mean("mean_cosine_shared") for s in sorted(fc)]
    by_layer = [r.get("mean_cosine_by_layer") for s in sorted(fc) for r in fc[s].metrics if r.get("kind") == "server"]
    flat = [v for row in by_layer if row for v in row if v is not None]
    out += ["", "FC-MoE's own test (cosine of each client's expert update to the weighted consensus): mean "
            + (f"{sum(flat) / len(flat):.3f}, minimum {min(flat):.3f}" if flat else "–")
            + " over every (round, layer) mean; shared tensors " + ", ".join(f"{v:.3f}" for v in cos_fc if v is not None)
            + "."]
    fedit, local = find(runs, method="FedIT"), find(runs, method="local")
    preds = [
        ("C1", "FedIT < local, minority", compare(fedit, local, lambda r: r.client_scores(minor), -1)),
        ("C2", "FC-MoE > FedIT, minority", compare(fc, fedit, lambda r: r.client_scores(minor), 1)),
        ("C3", "FC-MoE > FC-MoE-no-retention, minority",
         compare(fc, find(runs, method="FC-MoE-no-retention"), lambda r: r.client_scores(minor), 1)),
        ("C4", "FLEx > FedIT, minority", compare(find(runs, method="FLEx"), fedit, lambda r: r.client_scores(minor), 1)),
        ("C5", "FedIT > local, majority", compare(fedit, local, lambda r: r.client_scores(major), 1)),
    ]
    return "\n".join(out + ["", *verdict_rows(preds), ""])


# ---------------------------------------------------------------------------------------- scenario 2
def label_skew(folder: Path) -> str:
    runs = load_runs(folder)
    skews = sorted({dict(k)["skew"] for k in runs})
    methods = list(dict.fromkeys(dict(k)["method"] for k in runs))
    out = [f"### Scenario 2 tables ({folder.name})", ""]
    for skew in skews:
        fed = find(runs, skew=skew, method="FedIT")
        if not fed:
            out += [f"**{skew}.** (FedIT not run)", ""]
            continue
        cids = {c["id"] for c in next(iter(fed.values())).clients}
        ms, ml = label_concentration(fed)  # the premise: label concentration per client (training data)
        out += [f"**{skew}.** Premise L0: the mean client's largest label share {ms:.2f} (the whole data: 0.25), "
                f"labels with ≥ 5% of a client's examples {ml:.1f} on average (of 8): "
                f"{'holds' if ms >= 0.45 and ml <= 3 else 'does not hold'}.", "",
                "| method | local accuracy | global accuracy (held-out, all labels) | general-text perplexity | "
                "global model on held-out | zero-shot local | zero-shot global |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for m in methods:
            by = find(runs, skew=skew, method=m)
            seeds = sorted(by)
            col = lambda f, d=1: fmt(mean_ci([f(by[s]) for s in seeds]), d)  # noqa: E731
            gp = lambda r: (sum(v for v in (c.get("general_perplexity") for c in r.clients) if v is not None)  # noqa: E731
                            / max(1, sum(1 for c in r.clients if c.get("general_perplexity") is not None))
                            if any(c.get("general_perplexity") is not None for c in r.clients)
                            else r.summary["global"].get("general_perplexity"))
            zs_local = lambda r: accuracy([x for c in r.clients for x in (c.get("zero_shot_scores") or [])])  # noqa: E731
            zs_held = lambda r: (r.summary.get("zero_shot") or {}).get("heldout_accuracy")  # noqa: E731
            out.append(f"| {m} | {col(lambda r: accuracy(r.client_scores(cids)))} | "
                       f"{col(lambda r: accuracy(r.heldout_scores(cids)))} | {col(gp, 2)} | "
                       f"{col(lambda r: global_of(r, 'heldout_accuracy_global_model'))} | "
                       f"{col(zs_local)} | {col(zs_held)} |")
        flex, local = find(runs, skew=skew, method="FLEx"), find(runs, skew=skew, method="local")
        nogate = find(runs, skew=skew, method="FLEx-no-gate")
        own = lambda r, c=cids: r.client_scores(c)  # noqa: E731
        held = lambda r, c=cids: r.heldout_scores(c)  # noqa: E731
        preds = [
            ("L1", f"FLEx > FedIT, local accuracy ({skew})", compare(flex, fed, own, 1)),
            ("L2", f"FLEx > local, global accuracy ({skew})", compare(flex, local, held, 1)),
            ("L3a", f"local > FedIT, local accuracy ({skew})", compare(local, fed, own, 1)),
            ("L3b", f"local < FedIT, global accuracy ({skew})", compare(local, fed, held, -1)),
            ("L4", f"FLEx > FLEx-no-gate, local accuracy ({skew})", compare(flex, nogate, own, 1)),
        ]
        gp_f = [fed[s].summary["global"].get("general_perplexity") for s in sorted(fed) if s in flex]
        gp_x = [sum(c["general_perplexity"] for c in flex[s].clients if c.get("general_perplexity") is not None)
                / max(1, sum(1 for c in flex[s].clients if c.get("general_perplexity") is not None))
                for s in sorted(flex) if s in fed]
        out += ["", *verdict_rows(preds), "",
                "L5 (retention, general-text perplexity, lower is better; no per-example pairing: per seed): FLEx "
                + ", ".join(f"{v:.3f}" for v in gp_x) + " (mean over its clients' own models); FedIT "
                + ", ".join(f"{v:.3f}" for v in gp_f if v is not None) + ": "
                + ("FLEx lower in every seed" if all(a < b for a, b in zip(gp_x, gp_f) if b is not None)
                   else "not lower in every seed") + ".", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- scenario 3
def compute(folder: Path) -> str:
    runs = load_runs(folder)
    methods = list(dict.fromkeys(dict(k)["method"] for k in runs))
    any_run = next(r for by in runs.values() for r in by.values())
    n_levels = 4
    levels = {lv: {c["id"] for c in any_run.clients if c["id"] % n_levels == lv} for lv in range(n_levels)}
    out = [f"### Scenario 3 tables ({folder.name})", "",
           "Accuracy (%) of each client's own model on its own test set; per budget level (2 clients each); the "
           "level's k, rank, forward FLOPs per 128-token sequence and active trainable parameters in brackets "
           "(seed 0).", "",
           "| method | all clients | " + " | ".join(f"β{lv + 1}" for lv in range(n_levels)) + " | zero-shot (all) |",
           "|---|---:|" + "---:|" * n_levels + "---:|"]
    all_c = {c["id"] for c in any_run.clients}
    for m in methods:
        by = find(runs, method=m)
        seeds = sorted(by)
        first = by[seeds[0]]
        cells = []
        for lv in range(n_levels):
            c0 = next(c for c in first.clients if c["id"] in levels[lv])
            acc = fmt(mean_ci([accuracy(by[s].client_scores(levels[lv])) for s in seeds]))
            cells.append(f"{acc} (k={c0['k']}, r={c0['rank']}, {c0['flops_per_seq'] / 1e6:.0f}M, "
                         f"{c0['active_trainable'] / 1e3:.0f}k)")
        zs = [accuracy([x for c in by[s].clients for x in (c.get("zero_shot_scores") or [])]) for s in seeds]
        out.append(f"| {m} | {fmt(mean_ci([accuracy(by[s].client_scores(all_c)) for s in seeds]))} | "
                   + " | ".join(cells) + f" | {fmt(mean_ci(zs))} |")
    flame = find(runs, method="FLAME")
    low = levels[n_levels - 1]
    allc = lambda r: r.client_scores(all_c)  # noqa: E731
    lowc = lambda r: r.client_scores(low)  # noqa: E731
    preds = [("B1", f"FLAME > {b}, all clients", compare(flame, find(runs, method=b), allc, 1))
             for b in ("HetLoRA", "FlexLoRA", "trivial")]
    preds += [("B2", f"FLAME > {b}, lowest budget (β4)", compare(flame, find(runs, method=b), lowc, 1))
              for b in ("HetLoRA", "FlexLoRA", "trivial")]
    preds += [("B3", "FLAME > FLAME-no-rescaler, lowest budget (β4)",
               compare(flame, find(runs, method="FLAME-no-rescaler"), lowc, 1)),
              ("B4", "FLAME > FLAME-t0, all clients", compare(flame, find(runs, method="FLAME-t0"), allc, 1))]
    return "\n".join(out + ["", *verdict_rows(preds), ""])


# ---------------------------------------------------------------------------------------- scenario 4
def fcmoe_paper(folder: Path) -> str:
    runs = load_runs(folder)
    alphas = sorted({dict(k)["alpha"] for k in runs}, key=lambda a: float(a.rsplit("-", 1)[-1]))
    methods = list(dict.fromkeys(dict(k)["method"] for k in runs))
    n_seeds = max(len(by) for by in runs.values())
    out = [f"### Scenario 4 tables ({folder.name}, {n_seeds} seed{'s' if n_seeds > 1 else ''}"
           + (": no seed interval)" if n_seeds == 1 else ")"), "",
           "Local accuracy: each client's own model on its own test set; global accuracy: each client's own model "
           "on the shared held-out set (all labels); accuracy (%), mean over seeds"
           + (" (one seed: the number itself)" if n_seeds == 1 else " ± 95% interval") + ". Server metrics: mean "
           "over rounds.", "",
           "| α | method | local accuracy | global accuracy (held-out, all labels) | global model on the test sets | "
           "global model on held-out | conflicting expert-update pairs | FC-MoE: updates projected | "
           "zero-shot local | zero-shot global |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    premise = []
    for a in alphas:
        fed = find(runs, alpha=a, method="FedIT")
        if fed:
            ms, ml = label_concentration(fed)
            premise.append(f"{a}: {ms:.2f} and {ml:.1f}")
        for m in methods:
            by = find(runs, alpha=a, method=m)
            if not by:
                continue
            seeds = sorted(by)
            cids = {c["id"] for c in by[seeds[0]].clients}
            col = lambda f, d=1: fmt(mean_ci([f(by[s]) for s in seeds]), d)  # noqa: E731
            zs_local = lambda r: accuracy([x for c in r.clients for x in (c.get("zero_shot_scores") or [])])  # noqa: E731
            zs_held = lambda r: (r.summary.get("zero_shot") or {}).get("heldout_accuracy")  # noqa: E731
            out.append(f"| {a} | {m} | {col(lambda r: accuracy(r.client_scores(cids)))} | "
                       f"{col(lambda r: accuracy(r.heldout_scores(cids)))} | "
                       f"{col(lambda r: global_of(r, 'accuracy'))} | "
                       f"{col(lambda r: global_of(r, 'heldout_accuracy_global_model'))} | "
                       f"{col(lambda r: r.server_mean('update_conflict_experts'), 3)} | "
                       f"{col(lambda r: r.server_mean('projected_fraction'), 3)} | "
                       f"{col(zs_local)} | {col(zs_held)} |")
    out += ["", "Label skew of the partition (training labels; the mean client's largest label share, and its labels "
            "with ≥ 5% of its examples, of 8): " + "; ".join(premise) + "."]
    # FC-MoE's projection, round by round (seed by seed)
    pf = {}
    for a in alphas:
        fc = find(runs, alpha=a, method="FC-MoE")
        if not fc:
            continue
        pf[a] = mean_ci([fc[s].server_mean("projected_fraction") for s in sorted(fc)])
        per_round = [", ".join(f"{r['projected_fraction']:.3f}" for r in fc[s].metrics
                               if r.get("kind") == "server" and isinstance(r.get("projected_fraction"), (int, float)))
                     for s in sorted(fc)]
        out += [] if not any(per_round) else ["", f"FC-MoE's projected fraction per round ({a}" + (f", seeds {', '.join(map(str, sorted(fc)))}"
                if len(fc) > 1 else f", seed {next(iter(fc))}") + "): " + "; ".join(per_round) + "."]
    # FC-MoE − FedIT per alpha: local and global accuracy
    preds, local_diff = [], {}
    lo, hi = alphas[0], alphas[-1]
    for a in alphas:
        fc, fed = find(runs, alpha=a, method="FC-MoE"), find(runs, alpha=a, method="FedIT")
        cids = {c["id"] for by in (fc, fed) for r in by.values() for c in r.clients}
        own = lambda r, c=cids: r.client_scores(c)  # noqa: E731
        held = lambda r, c=cids: r.heldout_scores(c)  # noqa: E731
        local_diff[a] = compare(fc, fed, own, 1)
        preds += [("P1" if a == lo else "(P3)" if a == hi else "–", f"FC-MoE > FedIT, local accuracy ({a})",
                   local_diff[a]),
                  ("P2" if a == lo else "–", f"FC-MoE > FedIT, global accuracy ({a})", compare(fc, fed, held, 1))]
    out += ["", *verdict_rows(preds), ""]
    # P0 and P3: two numbers compared
    num = lambda mc: "–" if mc is None else f"{mc[0]:.3f}"  # noqa: E731
    if lo in pf and hi in pf and pf[lo] is not None and pf[hi] is not None:
        p0 = ("does not hold (FC-MoE projected nothing at either α)" if pf[lo][0] == pf[hi][0] == 0
              else "holds" if pf[lo][0] > pf[hi][0] else "does not hold")
    else:
        p0 = "not measured (no FC-MoE run with projected_fraction at one of the two α)"
    out += (f"**P0** (premise: FC-MoE's projected fraction larger at {lo} than at {hi}): "
            f"{num(pf.get(lo))} vs {num(pf.get(hi))}: **{p0}**.", "")
    d_lo, d_hi = local_diff.get(lo, {}), local_diff.get(hi, {})
    if d_lo.get("n") and d_hi.get("n"):
        overlap = d_lo["low"] <= d_hi["high"] and d_hi["low"] <= d_lo["high"]
        larger = d_lo["mean"] > d_hi["mean"]
        p3 = "not shown" if overlap else ("shown" if larger else "refuted")
        out.append(f"**P3** (FC-MoE − FedIT, local accuracy, larger at {lo} than at {hi}): "
                   f"{d_lo['mean']:+.1f} [{d_lo['low']:+.1f}, {d_lo['high']:+.1f}] vs "
                   f"{d_hi['mean']:+.1f} [{d_hi['low']:+.1f}, {d_hi['high']:+.1f}]: "
                   f"{'larger' if larger else 'not larger'} at {lo}, the intervals "
                   f"{'overlap' if overlap else 'do not overlap'}: **{p3}**.")
    else:
        out.append("**P3**: (a side not run)")
    return "\n".join(out + [""])


SCENARIOS = {"concept-shift": concept_shift, "label-skew": label_skew, "compute": compute, "fcmoe-paper": fcmoe_paper}
OPTIONAL = {"fcmoe-paper"}  # in ``all`` only when its sweep folder exists


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"])
    ap.add_argument("--runs", default="runs", help="the sweeps' output_dir (default: runs)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    names = ([n for n in SCENARIOS if n not in OPTIONAL or (Path(args.runs) / f"evidence-{n}").is_dir()]
             if args.scenario == "all" else [args.scenario])
    text = "\n".join(SCENARIOS[n](Path(args.runs) / f"evidence-{n}") for n in names)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
