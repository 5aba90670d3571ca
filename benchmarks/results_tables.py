"""Markdown tables for benchmarks/RESULTS.md from the sweeps that benchmarks/paper_tables.sh runs.

    .venv/bin/python benchmarks/results_tables.py [RUNS_DIR]      # default: runs/

Reads runs/<sweep>-cpu/<point>/summary.json and prints one table per layout: FLAME Table 2 (per
budget, per method, both α), the FLAME ablations (rescaler, temperature), FLEx Table 1 (pathological),
the FLEx ablations and FLEx Table 2 (Dirichlet). Missing points are left out, so it can be run while
the sweeps are still going. Each ROUGE-L cell carries the zero-shot score of the same client's model
in brackets; "paired change" is the mean per-example change with its 95% bootstrap interval.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedmoe.eval import format_change
from fedmoe.rundir import RunDir, loads  # non-finite numbers ("NaN", "Infinity") read back as floats
from fedmoe.federation.sweep import bytes_per_round, personal_or_global


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def load(root: Path) -> dict[str, dict]:
    return {p.parent.name: loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def client_mean(s, key):
    return mean(c.get(key) for c in s["clients"])


def zero_shot_mean(s, key="rouge_l"):
    return mean((c.get("zero_shot") or {}).get(key) for c in s["clients"])


def change(s):
    return format_change((s.get("global") or {}).get("rouge_l_change"))


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def flame_table2(runs: Path) -> None:
    res = load(runs / "flame-table2-cpu")
    for alpha in ("5.0", "0.5"):
        pts = [(m, res[f"name={m},alpha={alpha}"]) for m in ("trivial", "hetlora", "flexlora", "flame")
               if f"name={m},alpha={alpha}" in res]
        if not pts:
            continue
        print(f"\n#### Dirichlet α = {alpha}\n")
        rows = []
        for cid in range(4):
            cells = []
            for _, s in pts:
                c = s["clients"][cid]
                cells.append(f"{fmt(c['rouge_l'])} ({fmt(c['zero_shot']['rouge_l'])}; k={c['k']}, r={c['rank']}, "
                             f"{c['flops_per_seq'] / 1e9:.3f}G)")
            rows.append([f"β{cid + 1}"] + cells)
        rows.append(["mean"] + [f"{fmt(client_mean(s, 'rouge_l'))} ({fmt(zero_shot_mean(s))})" for _, s in pts])
        rows.append(["paired change, 95% interval"] + [change(s) for _, s in pts])
        rows.append(["test loss (mean of clients)"] + [fmt(client_mean(s, "loss"), 4) for _, s in pts])
        rows.append(["wall"] + [f"{s['wall_s'] / 60:.1f} min" for _, s in pts])
        print(table(["budget"] + [f"{m} (zero-shot; k, r, FLOPs/seq)" for m, _ in pts], rows))


def flame_ablations(runs: Path) -> None:
    res = load(runs / "flame-ablations-cpu")
    order = ["rescaler-none", "rescaler-static", "learned-t2", "learned-t0", "learned-t1", "learned-t4", "learned-t8"]
    pts = [(v, res[f"variant={v}"]) for v in order if f"variant={v}" in res]
    if not pts:
        return
    print("\n#### FLAME ablations (α = 0.5)\n")
    rows = [[f"β{cid + 1} (k={pts[0][1]['clients'][cid]['k']})"] +
            [f"{fmt(s['clients'][cid]['rouge_l'])} ({fmt(s['clients'][cid]['zero_shot']['rouge_l'])})" for _, s in pts]
            for cid in range(4)]
    rows.append(["mean"] + [f"{fmt(client_mean(s, 'rouge_l'))} ({fmt(zero_shot_mean(s))})" for _, s in pts])
    rows.append(["paired change, 95% interval"] + [change(s) for _, s in pts])
    rows.append(["test loss (mean of clients)"] + [fmt(client_mean(s, "loss"), 4) for _, s in pts])
    print(table(["budget"] + [v for v, _ in pts], rows))


def flex_rows(pts) -> list[list[str]]:
    rows = [["average ROUGE-L (zero-shot)"] + [f"{fmt(client_mean(s, 'rouge_l'))} ({fmt(zero_shot_mean(s))})"
                                               for _, s in pts],
            ["paired change, 95% interval"] + [change(s) for _, s in pts],
            ["MMLU, 5-shot"] + [fmt(personal_or_global(s, "mmlu"), 1) for _, s in pts],
            ["general-text perplexity (zero-shot)"] + [
                f"{fmt(personal_or_global(s, 'general_perplexity'))} ({fmt(zero_shot_mean(s, 'general_perplexity'))})"
                for _, s in pts],
            ["expert load std (mean of layers)"] + [fmt(mean(s["global"]["expert_load_std"]), 4) for _, s in pts],
            ["bytes up per client per round"] + [bytes_per_round(s) for _, s in pts],
            ["wall"] + [f"{s['wall_s'] / 60:.1f} min" for _, s in pts]]
    return rows


def category_rows(pts) -> list[list[str]]:
    """One row per client of the pathological split (client i holds one Dolly category)."""
    cats = ["closed_qa", "information_extraction", "classification", "summarization"]
    return [[f"{cat} (client {cid})"] + [f"{fmt(s['clients'][cid]['rouge_l'])} ({fmt(s['clients'][cid]['zero_shot']['rouge_l'])})"
                                         for _, s in pts] for cid, cat in enumerate(cats)]


METHODS = ["FLEx", "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "SCAFFOLD"]


def flex_pathological(runs: Path) -> None:
    res = load(runs / "flex-pathological-cpu")
    pts = [(m, res[f"method={m}"]) for m in METHODS if f"method={m}" in res]
    if not pts:
        return
    print("\n#### FLEx, pathological split\n")
    print(table([""] + [m for m, _ in pts], category_rows(pts) + flex_rows(pts)))


def flex_ablations(runs: Path) -> None:
    res = load(runs / "flex-ablations-cpu")
    order = ["FLEx", "no-gate", "general-calibration", "two-grafts"]
    pts = [(v, res[f"variant={v}"]) for v in order if f"variant={v}" in res]
    if not pts:
        return
    print("\n#### FLEx ablations (pathological split)\n")
    rows = category_rows(pts)
    rows += flex_rows(pts)
    rows.append(["grafting seconds per client (min–max)"] + [
        "–" if not s.get("client_setup") else
        f"{min(v['seconds'] for v in s['client_setup'].values()):.1f}–{max(v['seconds'] for v in s['client_setup'].values()):.1f}"
        for _, s in pts])
    print(table([""] + [v for v, _ in pts], rows))


def flex_dirichlet(runs: Path) -> None:
    res = load(runs / "flex-dirichlet-cpu")
    for alpha in ("0.5", "1.0"):
        pts = [(m, res[f"alpha={alpha},method={m}"]) for m in METHODS if f"alpha={alpha},method={m}" in res]
        if not pts:
            continue
        print(f"\n#### FLEx, Dirichlet α = {alpha} (10 clients)\n")
        print(table([""] + [m for m, _ in pts], flex_rows(pts)))


FCMOE = ["FC-MoE", "FedIT", "FLAME", "no-importance", "no-projection", "no-retention"]


def rounds_to(run: Path, target: float) -> str:
    """The first round whose global test loss is at or below ``target``."""
    rows = RunDir(run, create=False).read_metrics()  # rows of any fedmoe version (kind / split)
    for r in sorted((r for r in rows if r["kind"] == "test" and r["client"] is None), key=lambda r: r["round"]):
        if r["round"] > 0 and r["loss"] is not None and r["loss"] <= target:
            return str(r["round"])
    return "not reached"


def spread(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5
    return f"{m:.3f} ± {sd:.3f}"


def conflict_stat(run: Path, key: str) -> str:
    """FC-MoE's server metric averaged over rounds (and layers, for a per-layer list); – for other methods."""
    vals = []
    for r in RunDir(run, create=False).read_metrics():
        v = r.get(key) if r.get("kind") == "server" else None
        if isinstance(v, list):
            vals += [x for x in v if isinstance(x, (int, float))]
        elif isinstance(v, (int, float)):
            vals.append(v)
    if not vals:
        return "–"
    m = sum(vals) / len(vals)
    return f"{100 * m:.2f}%" if key == "projected_fraction" else f"{m:.3f}"


def fcmoe_dirichlet(runs: Path) -> None:
    root = runs / "fcmoe-dirichlet"
    res = load(root)
    for alpha in ("0.1", "0.5", "1.0"):
        pts = [(m, res[f"alpha={alpha},method={m}"]) for m in FCMOE if f"alpha={alpha},method={m}" in res]
        if not pts:
            continue
        fedit = res.get(f"alpha={alpha},method=FedIT")
        # 90% of the loss reduction FedIT reached in the whole run (its final loss itself is reached by
        # construction in the last round by every method that ties with it)
        target = None if not fedit else (fedit["zero_shot"]["loss"]
                                         - 0.9 * (fedit["zero_shot"]["loss"] - fedit["global"]["loss"]))
        print(f"\n#### FC-MoE, Dirichlet α = {alpha} (10 clients)\n")
        rows = [["global test loss (zero-shot)"] + [f"{fmt(s['global']['loss'], 4)} ({fmt(s['zero_shot']['loss'], 4)})"
                                                    for _, s in pts],
                ["rounds to 90% of FedIT's loss reduction" + ("" if target is None else f" ({target:.4f})")] + [
                    "–" if target is None else rounds_to(root / f"alpha={alpha},method={m}", target) for m, _ in pts],
                ["global ROUGE-L (zero-shot)"] + [f"{fmt(s['global']['rouge_l'])} ({fmt(s['zero_shot']['rouge_l'])})"
                                                  for _, s in pts],
                ["paired change, 95% interval"] + [change(s) for _, s in pts],
                ["client test loss, mean ± sd"] + [spread(c["loss"] for c in s["clients"]) for _, s in pts],
                ["client ROUGE-L, mean ± sd"] + [spread(c["rouge_l"] for c in s["clients"]) for _, s in pts],
                ["updates projected (mean over rounds)"] + [
                    conflict_stat(root / f"alpha={alpha},method={m}", "projected_fraction") for m, _ in pts],
                ["cosine to the consensus (mean over layers and rounds)"] + [
                    conflict_stat(root / f"alpha={alpha},method={m}", "mean_cosine_by_layer") for m, _ in pts],
                ["bytes up per client per round"] + [bytes_per_round(s) for _, s in pts],
                ["wall"] + [f"{s['wall_s'] / 60:.1f} min" for _, s in pts]]
        print(table([""] + [m for m, _ in pts], rows))


def main(argv: list[str]) -> None:
    runs = Path(argv[1] if len(argv) > 1 else "runs")
    for f in (flame_table2, flame_ablations, flex_pathological, flex_ablations, flex_dirichlet, fcmoe_dirichlet):
        f(runs)


if __name__ == "__main__":
    main(sys.argv)
