"""Sweeps: one config, a ``sweep:`` section of value lists, one command, one table.

    sweep:
      data.partition.alpha: [5.0, 0.5]
      lora.rank: [4, 8]
      variant:                     # named variants: several keys per point
        small: {lora.rank: 4, train.lr: 1.0e-3}
        large: {lora.rank: 16, train.lr: 5.0e-4}

runs the Cartesian product (8 runs) as ordinary runs under ``runs/<name>/<point>``; a point whose
``summary.json`` exists is not run again and one with a checkpoint but no summary is resumed, so an
interrupted sweep continues where it stopped — but only with the config it ran with: a point whose directory
holds a run of another config (the sweep's file or ``--set`` changed since) refuses the whole sweep before any
point runs, naming the keys (:func:`stale_points`), never reporting the old run as the new config's. The
combined ``sweep_report.md`` puts one row per client (= per budget level when clients map to budget levels) and
one column per sweep point.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from ..config import ConfigError, apply_overrides, config_from_tree, parse_override
from ..configbase import load_yaml
from ..eval.stats import format_change
from ..report.compare import BYTES_PER_ROUND, bytes_per_round, personal_or_global  # noqa: F401  (re-exported)
from ..rundir import atomic_write_text, loads, md_cell


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def sweep_points(sweep: dict) -> list[tuple[str, list[str]]]:
    """(point name, ``key=value`` overrides) for every combination, in a stable order."""
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError("sweep: must map config keys to lists of values, e.g. {lora.rank: [4, 8]}")
    keys = list(sweep)
    axes = []  # per key: list of (label, overrides)
    for k in keys:
        v = sweep[k]
        if isinstance(v, dict) and v:  # named variants: {label: {key: value, ...}}
            axis = []
            for label, sets in v.items():
                if not isinstance(sets, dict):
                    raise ConfigError(f"sweep.{k}.{label}: a named variant maps config keys to values")
                axis.append((f"{k}={label}", [f"{sk}={_fmt(sv)}" for sk, sv in sets.items()]))
            axes.append(axis)
        elif isinstance(v, list) and v:
            axes.append([(f"{k.split('.')[-1]}={_fmt(x)}", [f"{k}={_fmt(x)}"]) for x in v])
        else:
            raise ConfigError(f"sweep.{k}: give a non-empty list of values (or named variants), got {v!r}")
    points = []
    for combo in itertools.product(*axes):
        name = ",".join(label for label, _ in combo)
        points.append((name.replace("/", "_").replace(" ", ""), [s for _, sets in combo for s in sets]))
    return points


def load_sweep(path: str | Path) -> tuple[dict, dict | None]:
    """The config tree without its ``sweep`` section, and that section (None if absent)."""
    tree = load_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree, tree.pop("sweep", None)


def stale_points(root: Path, configs) -> list[str]:
    """Of [(point, its config)], each point whose directory under ``root`` holds a run (finished, or with a
    checkpoint to continue) of another config than the point's now, as ``point (dir): key: before -> after; ...``.
    The config a point's run would write is the one compared (a label set and a σ computed from the target ε, as
    the run fixes them); the keys that do not define a run (execution keys: where it runs, threads, progress)
    may differ."""
    from ..config import load_config
    from ..data.prepare import resolve_labels
    from ..rundir import RunDir
    from .checkpoint import config_fingerprint, fingerprint_diffs, has_checkpoint
    from .dp import resolve_noise

    stale = []
    for point, cfg in configs:
        d = root / point
        if not (d / RunDir.CONFIG).is_file() or not ((d / "summary.json").is_file() or has_checkpoint(d)):
            continue
        ran = config_fingerprint(load_config(d / RunDir.CONFIG))["keys"]
        diffs = fingerprint_diffs(ran, config_fingerprint(resolve_noise(resolve_labels(cfg)))["keys"])
        if diffs:
            stale.append(f"{point} ({d}): {'; '.join(diffs)}")
    return stale


def _run_point(point: str, tree: dict, sets: list[str], root: str, source: str, show_progress: bool, log,
               federation: str | None, threads: int | None = None) -> str:
    """Run (or continue, or keep) one sweep point; returns its summary.json's path."""
    from .entry import continue_run, start_run
    from .checkpoint import has_checkpoint

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    root_p = Path(root)
    summary_path = root_p / point / "summary.json"
    if summary_path.is_file():
        log(f"{point}: done before, kept")
        return str(summary_path)
    if has_checkpoint(root_p / point):
        log(f"{point}: continuing from its checkpoint")
        continue_run(root_p / point, show_progress=show_progress, federation=federation, log=log)
        return str(summary_path)
    cfg = config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets + [f"output_dir={root}", f"name={point}"]),
                           f"{source} (sweep point {point})")
    log(f"{point}: started")
    # a point's directory holds no run here (or one that stopped before its first checkpoint), so the run goes
    # there; were it taken by other files, where it went
    return str(start_run(cfg, show_progress=show_progress, federation=federation, log=log)[1].summary_path)


def _quiet_point(args) -> str:
    """A worker process's sweep point (no progress bars; its log lines prefixed with the point)."""
    point = args[0]
    return _run_point(*args[:5], False, lambda msg: print(f"[{point}] {msg}", flush=True), *args[5:])


def expand_sweep(path: str | Path, overrides: list[str] | None = None):
    """(the config tree without its sweep, [(point, its overrides)], [(point, its validated config)]) of the sweep
    in ``path``: ``overrides`` apply to the tree, then each point's own on top; ``--set sweep.<key>=[values]``
    replaces one axis of the sweep (the key keeps its dots)."""
    tree, sweep = load_sweep(path)
    if sweep is None:
        raise ConfigError(f"{path}: has no sweep section")
    plain = []
    for item in overrides or []:
        if item.startswith("sweep."):
            key, value = parse_override(item)
            sweep[".".join(key[1:])] = value
        else:
            plain.append(item)
    tree = apply_overrides(tree, plain)
    points = sweep_points(sweep)
    configs = [(point, config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets),
                                        f"{path} (sweep point {point})")) for point, sets in points]
    return tree, points, configs


def run_sweep(path: str | Path, overrides: list[str] | None = None, show_progress: bool = False, log=print,
              federation: str | None = None, jobs: int = 1) -> Path:
    """Run every point of the sweep in ``path`` (``jobs`` > 1: that many points at once, each in its own
    process with an equal share of the CPU threads) and write the combined ``sweep_report.md``."""
    from .entry import check_federation_name

    tree, points, configs = expand_sweep(path, overrides)  # every point's config is valid before the first runs
    check_federation_name(federation, [cfg.federation.runtime for _, cfg in configs])
    base = config_from_tree(tree, str(path))
    root = Path(base.output_dir) / base.run_name()
    stale = stale_points(root, configs)
    if stale:
        raise ConfigError(
            f"{root} holds sweep point(s) run with another config than {path} gives them now (before -> now): "
            + " | ".join(stale) + ". Kept and continued, their results would be reported as this config's: give this "
            "sweep another name (--set name=NEW), or move those points' directories away to run them again with this "
            "config")
    root.mkdir(parents=True, exist_ok=True)
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1 or len(points) == 1:
        paths = []
        for i, (point, sets) in enumerate(points):
            paths.append(_run_point(point, tree, sets, str(root), str(path), show_progress,
                                    lambda msg, i=i: log(f"[{i + 1}/{len(points)}] {msg}"), federation))
    else:
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // jobs)
        log(f"{len(points)} sweep points, {jobs} at a time ({threads} torch thread{'s' * (threads > 1)} each)")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_quiet_point, (point, tree, sets, str(root), str(path), federation, threads))
                       for point, sets in points]
            errors, paths = [], []
            for (point, _), fut in zip(points, futures):
                try:
                    paths.append(fut.result())
                except Exception as e:  # noqa: BLE001 -- the other points finish; the first error is raised below
                    errors.append((point, e))
                    paths.append(None)
        if errors:
            point, e = errors[0]
            done = sum(p is not None for p in paths)
            raise RuntimeError(f"sweep point {point} failed ({type(e).__name__}: {e}); {done} of {len(points)} points "
                               f"finished (kept): run the sweep again to retry the others") from e
    results = [(point, loads(Path(p).read_text())) for (point, _), p in zip(points, paths)]
    report = root / "sweep_report.md"
    atomic_write_text(report, format_sweep_report(str(path), results))
    return report


def _cell(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _clients_mean(summary: dict, key: str) -> float | None:
    """The mean of ``key`` over the clients that report it; None (a dash) when none does (answers not scored,
    every client's evaluation kept on its node): never a 0 from no client."""
    vals = [c[key] for c in summary["clients"] if c.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _client_label(results: list[tuple[str, dict]], cid: int) -> str:
    """The client's id, with its Dolly category when all its training data is one category."""
    for _, s in results:
        c = next((c for c in s["clients"] if c["id"] == cid), None)
        cats = [k for k, n in ((c or {}).get("category_counts") or {}).items() if n]
        if len(cats) == 1:
            return f"{cid} ({md_cell(cats[0])})"
    return str(cid)


def format_sweep_report(source: str, results: list[tuple[str, dict]]) -> str:
    from ..report.report import answer_metric

    key, name = answer_metric(results[0][1]) if results else ("rouge_l", "ROUGE-L")
    lines = [f"# Sweep: {source}", "", f"{len(results)} runs. {name} (0–100) of each client's model on its own test set; "
             "the client's k, LoRA rank and forward FLOPs per sequence in brackets. Below the clients: the means, "
             "the global model, and where the runs measured them MMLU and general-text perplexity (the mean over "
             "the clients' own models for personalised methods), expert load balance and uplink bytes.", ""]
    n_clients = max(len(s["clients"]) for _, s in results)
    lines.append("| client | " + " | ".join(p for p, _ in results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    for cid in range(n_clients):
        cells = []
        for _, s in results:
            c = next((c for c in s["clients"] if c["id"] == cid), None)
            if c is None:
                cells.append("–")
                continue
            fl = c.get("flops_per_seq")
            cells.append(f"{_cell(c.get(key))} (k={c.get('k')}, r={c.get('rank')}"
                         + (f", {fl / 1e6:.1f}M" if fl else "") + ")")
        lines.append(f"| {_client_label(results, cid)} | " + " | ".join(cells) + " |")
    lines.append("| mean over clients | " + " | ".join(_cell(_clients_mean(s, key)) for _, s in results) + " |")
    lines.append("| global model | " + " | ".join(_cell(s["global"].get(key)) for _, s in results) + " |")
    lines.append("| global test loss | " + " | ".join(_cell(s["global"].get("loss"), 4) for _, s in results) + " |")
    if any("val_loss" in s["global"] for _, s in results):  # eval.val_loss: choose a point by these, not by the test
        lines.append("| global validation loss | " + " | ".join(_cell(s["global"].get("val_loss"), 4)
                                                               for _, s in results) + " |")
        lines.append("| lowest global validation loss, at round | " + " | ".join(
            f"{_cell(low['val_loss'], 4)} at {low['round']}" if (low := s["global"].get("val_loss_lowest")) else "–"
            for _, s in results) + " |")
    if any(s["global"].get(f"{key}_change") for _, s in results):
        lines.append(f"| {name} change from zero-shot (each client's own model), 95% interval | " + " | ".join(
            format_change(s["global"].get(f"{key}_change")) for _, s in results) + " |")
    # knowledge retention, load balance and communication, where the runs measured them
    for label, k, digits in (("held-out accuracy, all labels (%)", "heldout_accuracy", 1),
                             ("MMLU, 5-shot (%)", "mmlu", 1), ("general-text perplexity", "general_perplexity", 2)):
        vals = [personal_or_global(s, k) for _, s in results]
        if any(v is not None for v in vals):
            lines.append(f"| {label} | " + " | ".join(_cell(v, digits) for v in vals) + " |")
    stds = [s["global"].get("expert_load_std") for _, s in results]
    if any(stds):
        lines.append("| expert load std (mean over layers) | " + " | ".join(
            _cell(sum(v) / len(v), 4) if v else "–" for v in stds) + " |")
    lines.append(f"| {BYTES_PER_ROUND} | " + " | ".join(bytes_per_round(s) for _, s in results) + " |")
    lines += ["", "Runs: " + ", ".join(f"[{p}]({p}/report.md)" for p, _ in results), ""]
    return "\n".join(lines)
