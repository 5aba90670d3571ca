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

from ..config import ConfigError, apply_overrides, config_from_tree, parse_override, unread_settings
from ..configbase import load_yaml
from ..eval.stats import format_change
from ..report.compare import (BYTES_PER_ROUND, bytes_per_round, personal_or_global,  # noqa: F401  (re-exported)
                              read_summary_file)
from ..rundir import atomic_write_text, md_cell


def _fmt(v) -> str:
    """A value in a point's name."""
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def _override(key: str, v) -> str:
    """``key=value`` that sets ``v`` exactly: a string that YAML, which reads the override, would read otherwise
    quoted (`` #`` starts a comment, ``~`` is null, ``'x'`` loses its quotes, ``yes`` is true), anything else as in
    a name."""
    text = f"{key}={_fmt(v)}"
    if isinstance(v, str):
        try:
            same = parse_override(text)[1] == v
        except ConfigError:  # not YAML as it stands: quoted
            same = False
        if not same:
            text = f"{key}={json.dumps(v)}"
    return text


def _overlaps(a: str, b: str) -> bool:
    """Whether config keys ``a`` and ``b`` set the same value (one is the other, or a section of it)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _section_overrides(key: str, v) -> list[str]:
    """The overrides that set ``v`` at ``key``: a mapping (a section's values, ``lora: [{rank: 2}]``) sets each of its
    keys and leaves the section's others as the base config has them (one override of the whole section replaced
    them with their defaults: the base's ``lora.alpha: 32`` became 16 without a word); anything else, itself."""
    if isinstance(v, dict) and v:
        return [o for sk, sv in v.items() for o in _section_overrides(f"{key}.{sk}", sv)]
    return [_override(key, v)]


def sweep_points(sweep: dict) -> list[tuple[str, list[str]]]:
    """(point name, ``key=value`` overrides) for every combination, in a stable order."""
    if not isinstance(sweep, dict) or not sweep:
        raise ConfigError("sweep: must map config keys to lists of values, e.g. {lora.rank: [4, 8]}")
    keys = list(sweep)
    # a swept key is named by its last part (lora.rank -> rank=4), by all of it where two keys share that part
    # (data.partition.alpha and lora.alpha: alpha=0.1,alpha=16 would name two points alike)
    leaves = [k.split(".")[-1] for k in keys]
    axes = []  # per key: list of (label, overrides)
    for k in keys:
        v = sweep[k]
        if isinstance(v, dict) and v:  # named variants: {label: {key: value, ...}}
            axis = []
            for label, sets in v.items():
                if not isinstance(sets, dict):
                    raise ConfigError(f"sweep.{k}.{label}: a named variant maps config keys to values")
                axis.append((f"{k}={label}", [_override(sk, sv) for sk, sv in sets.items()]))
            axes.append(axis)
        elif isinstance(v, list) and v:
            label = k if leaves.count(k.split(".")[-1]) > 1 else k.split(".")[-1]
            axes.append([(f"{label}={_fmt(x)}", _section_overrides(k, x)) for x in v])
        else:
            raise ConfigError(f"sweep.{k}: give a non-empty list of values (or named variants), got {v!r}")
    # a key set by two axes (a swept key a named variant sets too): the later one wins, and the point's name would
    # claim the value the other axis gave it
    owner: dict[str, str] = {}
    for k, axis in zip(keys, axes):
        for key in {o.split("=", 1)[0] for _, sets in axis for o in sets}:
            clash = next((o for o in owner if _overlaps(o, key)), None)
            if clash is not None and owner[clash] != k:
                raise ConfigError(f"sweep.{k} and sweep.{owner[clash]} both set {key if clash == key else clash}: a "
                                  "point's value of it would be one axis's while its name says the other's; set it in "
                                  "one axis only")
            owner[key] = k
    points = []
    for combo in itertools.product(*axes):
        name = ",".join(label for label, _ in combo)
        points.append((name.replace("/", "_").replace(" ", ""), [s for _, sets in combo for s in sets]))
    seen: dict[str, list[str]] = {}
    for name, sets in points:
        if name in seen:  # two combinations, one folder: the second would keep the first's results as its own
            raise ConfigError(f"sweep points {seen[name]} and {sets} are both named {name!r} (a '/' or ' ' becomes "
                              "'_' or nothing, a value its text): give the values distinct names, e.g. as named "
                              "variants ({label: {key: value}})")
        seen[name] = sets
    return points


def load_sweep(path: str | Path) -> tuple[dict, dict | None]:
    """The config tree without its ``sweep`` section, and that section (None if absent)."""
    tree = load_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree, tree.pop("sweep", None)


def stale_points(root: Path, configs) -> list[str]:
    """Of [(point, its config)], each point whose directory under ``root`` holds a run (finished, or with a
    checkpoint to continue) of another config than the point's now, as ``point (dir): key: before -> after; ...``,
    or on data files that changed since (its checkpoint's data fingerprint).
    The config a point's run would write is the one compared (a label set and a σ computed from the target ε, as
    the run fixes them); the keys that do not define a run (execution keys: where it runs, threads, progress)
    may differ."""
    from ..config import load_config
    from ..data.prepare import resolve_labels
    from ..rundir import RunDir
    from .checkpoint import (RunDirError, check_data_fingerprint, config_fingerprint, fingerprint_diffs, has_checkpoint,
                             stored_data_fingerprint)
    from .dp import resolve_noise

    stale = []
    for point, cfg in configs:
        d = root / point
        if not ((d / "summary.json").is_file() or has_checkpoint(d)):
            continue
        try:  # what the point ran: without its config.yaml it is not known, and its results are not this config's
            ran = config_fingerprint(load_config(d / RunDir.CONFIG))["keys"]
        except (ConfigError, OSError, ValueError) as e:
            stale.append(f"{point} ({d}): its {RunDir.CONFIG} is missing or cannot be read ({str(e)[:200]}), so what "
                         f"it ran is not known: {_DAMAGED_POINT.format(folder=d)}")
            continue
        diffs = fingerprint_diffs(ran, config_fingerprint(resolve_noise(resolve_labels(cfg)))["keys"])
        if diffs:
            stale.append(f"{point} ({d}): {'; '.join(diffs)}")
            continue
        try:  # the data it ran on: a file of data.source replaced since would mix two datasets in one table
            check_data_fingerprint(cfg, stored_data_fingerprint(d), d, log=lambda *a: None)
        except RunDirError as e:
            if "has no readable checkpoint" not in str(e):  # (that one is the point's own run to report)
                stale.append(f"{point} ({d}): its data changed since ({str(e).split(': ', 1)[-1][:300]})")
    return stale


_DAMAGED_POINT = "move the point's folder {folder} away and run the sweep again to run that point again"


def _run_point(point: str, tree: dict, sets: list[str], root: str, source: str, show_progress: bool, log,
               federation: str | None, threads: int | None = None, resume_sets: list[str] | None = None) -> str:
    """Run (or continue, or keep) one sweep point; returns its summary.json's path. ``resume_sets``: the sweep's
    ``--set`` of execution keys, written into a continued point's config.yaml (as ``fedmoe run --resume --set``
    does: activation checkpointing after running out of memory, another device)."""
    from .entry import continue_run, start_run
    from .checkpoint import has_checkpoint

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    root_p = Path(root)
    summary_path = root_p / point / "summary.json"
    cfg = config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets + [f"output_dir={root}", f"name={point}"]),
                           f"{source} (sweep point {point})")
    if summary_path.is_file() or has_checkpoint(root_p / point):
        # checked again as the point comes: the sweep checked every point before it began, but another sweep into this
        # folder (started at once, or narrowed to other values) may have written this one since
        stale = stale_points(root_p, [(point, cfg)])
        if stale:
            raise ConfigError(f"sweep point {stale[0]}: its folder now holds a run of another config than this sweep "
                              f"gives it (another sweep into {root} wrote it since this one began?); kept or continued, "
                              "its results would be reported as this config's: run one sweep into a folder at a time, "
                              "or give this sweep another name (--set name=NEW)")
    if summary_path.is_file():
        read_summary_file(summary_path, _DAMAGED_POINT.format(folder=root_p / point))  # kept only if it can be read
        log(f"{point}: done before, kept")
        return str(summary_path)
    if has_checkpoint(root_p / point):
        log(f"{point}: continuing from its checkpoint")
        continue_run(root_p / point, show_progress=show_progress, federation=federation, log=log,
                     overrides=resume_sets or None)
        return str(summary_path)
    from .directories import _run_dir_kind

    if _run_dir_kind(root_p / point) in ("other", "file"):  # a new run would go to a numbered folder beside it
        raise ConfigError(f"sweep point {point}: {root_p / point} holds files fedmoe did not mark as its own run; a point "
                          "runs in its own folder only (beside it, the sweep's table and its next start would not find "
                          "it, and each start would run it again): move them away and run the sweep again")
    log(f"{point}: started")
    # a point's directory holds no run here (or one that stopped before its first checkpoint), so the run goes there
    return str(start_run(cfg, show_progress=show_progress, federation=federation, log=log, unread_ok=True)[1].summary_path)


_STOPPING = {"now": False}  # in a sweep's worker process: the sweep was stopped (SIGTERM from its parent)


def _quiet_point(args) -> str:
    """A worker process's sweep point (no progress bars; its log lines prefixed with the point). SIGTERM (which the
    parent sends when the sweep is stopped) and Ctrl-C stop it as Ctrl-C stops a run (its checkpoint kept, its lock
    released), and no point queued to this process starts after."""
    import signal

    def stop(signum, frame):
        if _STOPPING["now"]:  # stopping already (Ctrl-C, then the parent's SIGTERM): let the run's cleanup finish
            return
        _STOPPING["now"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # Ctrl-C reaches the whole process group: this process too
    if _STOPPING["now"]:  # a point the pool had queued to this process before the sweep was stopped: never started
        raise KeyboardInterrupt
    point = args[0]
    return _run_point(*args[:5], False, lambda msg: print(f"[{point}] {msg}", flush=True), *args[5:])


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a sweep: ``sweep_root`` is the sweep's folder (its finished points kept)."""

    def __init__(self, path: Path):
        super().__init__()
        self.sweep_root = path


def expand_sweep(path: str | Path, overrides: list[str] | None = None):
    """(the config tree without its sweep, [(point, its overrides)], [(point, its validated config)], the plain
    overrides) of the sweep
    in ``path``: ``overrides`` apply to the tree, then each point's own on top; ``--set sweep.<key>=[values]``
    replaces one axis of the sweep (the key keeps its dots)."""
    tree, sweep = load_sweep(path)
    if sweep is None:
        raise ConfigError(f"{path}: has no sweep section")
    plain = []
    for item in overrides or []:
        if item.startswith("sweep."):
            key, value = parse_override(item)
            axis = ".".join(key[1:])
            if isinstance(sweep.get(axis), dict) and isinstance(value, list):  # named variants: a selection by label
                unknown = [str(v) for v in value if str(v) not in sweep[axis]]
                if unknown:
                    raise ConfigError(f"--set {item}: sweep.{axis} is an axis of named variants ({', '.join(sweep[axis])})"
                                      f", and {', '.join(unknown)} is not one: name variants it has")
                value = {str(v): sweep[axis][str(v)] for v in value}
            sweep[axis] = value
        else:
            plain.append(item)
    points = sweep_points(sweep)
    swept = {o.split("=", 1)[0] for _, sets in points for o in sets}
    for item in plain:  # the point's own value would win, and the --set be ignored without a word
        key = ".".join(parse_override(item)[0])
        hit = next((k for k in swept if _overlaps(k, key)), None)
        if hit is not None:
            raise ConfigError(f"--set {item}: the sweep sets {hit} in each of its points, which would win over "
                              f"--set: give the sweep's values instead, --set 'sweep.{hit}=[...]' (or a named "
                              "variant's own keys in the config)")
    tree = apply_overrides(tree, plain)
    configs = [(point, config_from_tree(apply_overrides(json.loads(json.dumps(tree)), sets),
                                        f"{path} (sweep point {point})")) for point, sets in points]
    return tree, points, configs, plain


def check_unread(path, configs, narrowed: bool = False) -> list[str]:
    """A sweep's settings no point would read are refused (:func:`~fedmoe.config.unread_settings`); returns a note on
    each of those only some points read (its base config's budget levels of one method among several), naming the
    points that do not. ``narrowed``: an axis was replaced by ``--set sweep.KEY=[...]``, and the points left out may
    be the ones that read a key: no refusal, every such key gets a note."""
    points_of: dict[str, list[str]] = {}
    why: dict[str, list[str]] = {}
    for point, cfg in configs:
        for key, reason in unread_settings(cfg):
            points_of.setdefault(key, []).append(point)
            if reason not in why.setdefault(key, []):
                why[key].append(reason)

    def reasons(key: str) -> str:
        return "; ".join(why[key][:3]) + ("; ..." if len(why[key]) > 3 else "")

    never = [] if narrowed else [k for k, pts in points_of.items() if len(pts) == len(configs)]
    if never:
        raise ConfigError(f"{path}: no point of this sweep would read "
                          + "; ".join(f"{k} ({reasons(k)})" for k in never) + ": remove "
                          + ("it" if len(never) == 1 else "them") + " (or set what would read "
                          + ("it" if len(never) == 1 else "them") + ")")
    notes = []
    for key, pts in points_of.items():
        shown = ", ".join(pts[:4]) + (f" and {len(pts) - 4} more" if len(pts) > 4 else "")
        notes.append(f"note: {key} changes nothing in {len(pts)} of the {len(configs)} sweep points ({shown}): "
                     f"{reasons(key)}")
    return notes


def _stop_pool(pool) -> None:
    """Cancel the points not started and stop the running ones as Ctrl-C stops a run (SIGTERM: their
    :func:`_quiet_point` handler), waiting for them to write what they hold."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            try:
                proc.terminate()  # SIGTERM
            except OSError:
                pass
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()


def run_sweep(path: str | Path, overrides: list[str] | None = None, show_progress: bool = False, log=print,
              federation: str | None = None, jobs: int = 1, results: list | None = None) -> Path:
    """Run every point of the sweep in ``path`` (``jobs`` > 1: that many points at once, each in its own
    process with an equal share of the CPU threads) and write the combined ``sweep_report.md``; ``results``, if
    given, receives [(point, its summary)] as the report tabulates them."""
    from .entry import check_federation_name

    from ..rundir import RunDir
    from .checkpoint import execution_key
    from .entry import check_model

    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    tree, points, configs, plain = expand_sweep(path, overrides)  # every point's config is valid before the first runs
    check_federation_name(federation, [cfg.federation.runtime for _, cfg in configs])
    base = config_from_tree(tree, str(path))
    root = Path(base.output_dir) / base.run_name()
    if (root / RunDir.CONFIG).is_file():  # a run's directory: `fedmoe run --overwrite` of that run would take the points
        raise ConfigError(f"{root} holds a run (its config.yaml), not a sweep: a sweep writes its points into a folder "
                          f"of its own; give this sweep a name (name: in {path}, or --set name=NEW)")
    for point, cfg in configs:  # a mistyped model, a context too short, a missing device: before any point runs
        try:
            check_model(cfg, log=lambda *a: None, fits=False)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"sweep point {point}: {e}") from None
    notes = check_unread(path, configs, narrowed=any(o.startswith("sweep.") for o in overrides or []))
    stale = stale_points(root, configs)
    if stale:
        raise ConfigError(
            f"{root} holds sweep point(s) run with another config than {path} gives them now, or on other data "
            "(before -> now): "
            + " | ".join(stale) + ". Kept and continued, their results would be reported as this config's: give this "
            "sweep another name (--set name=NEW), or move those points' directories away to run them again with this "
            "config")
    for note in notes:
        log(note)
    root.mkdir(parents=True, exist_ok=True)
    resume_sets = [o for o in plain if execution_key(".".join(parse_override(o)[0]))]
    if jobs == 1 or len(points) == 1:
        paths = []
        try:
            for i, (point, sets) in enumerate(points):
                paths.append(_run_point(point, tree, sets, str(root), str(path), show_progress,
                                        lambda msg, i=i: log(f"[{i + 1}/{len(points)}] {msg}"), federation,
                                        resume_sets=resume_sets))
        except KeyboardInterrupt as e:
            if getattr(e, "path", None) is None:  # between points, or before a point's run had its directory
                raise SweepInterrupted(root) from None
            raise
    else:
        import multiprocessing as mp
        import os
        from concurrent.futures import ProcessPoolExecutor

        threads = max(1, (os.cpu_count() or 1) // jobs)
        log(f"{len(points)} sweep points, {jobs} at a time ({threads} torch thread{'s' * (threads > 1)} each)")
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"))
        try:
            futures = [pool.submit(_quiet_point, (point, tree, sets, str(root), str(path), federation, threads,
                                                  resume_sets))
                       for point, sets in points]
            errors, paths = [], []
            for (point, _), fut in zip(points, futures):
                try:
                    paths.append(fut.result())
                except Exception as e:  # noqa: BLE001 -- the other points finish; every error is named below
                    errors.append((point, e))
                    paths.append(None)
                    log(f"{point}: failed ({type(e).__name__}: {e})")
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: no queued point starts, the running ones stop at a checkpoint
            _stop_pool(pool)
            raise SweepInterrupted(root) from None
        pool.shutdown(wait=True)
        if errors:
            done = sum(p is not None for p in paths)
            failed = "; ".join(f"sweep point {point} failed ({type(e).__name__}: {e})" for point, e in errors)
            raise RuntimeError(f"{failed}; {done} of {len(points)} points finished (kept): run the sweep again to retry "
                               "the others") from errors[0][1]
    done = [(point, read_summary_file(Path(p), _DAMAGED_POINT.format(folder=Path(p).parent)))
            for (point, _), p in zip(points, paths)]
    if results is not None:  # the caller's: [(point, its summary)] as tabulated
        results.extend(done)
    report = root / "sweep_report.md"
    atomic_write_text(report, format_sweep_report(str(path), done))
    return report


def _cell(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _clients_mean(summary: dict, key: str) -> float | None:
    """The mean of ``key`` over the clients that report it; None (a dash) when none does (answers not scored,
    every client's evaluation kept on its node): never a 0 from no client."""
    vals = [c[key] for c in summary["clients"] if c.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _client_label(results: list[tuple[str, dict]], cid: int) -> str:
    """The client's id, with its category when all its training data is one category, the same in every point that
    says (a seed or partition axis gives the client other data in other points: then its id alone)."""
    labels = set()
    for _, s in results:
        c = next((c for c in s["clients"] if c["id"] == cid), None)
        if c is None:  # a point without this client says nothing of it
            continue
        cats = [k for k, n in (c.get("category_counts") or {}).items() if n]
        labels.add(cats[0] if len(cats) == 1 else None)
    return f"{cid} ({md_cell(labels.pop())})" if len(labels) == 1 and None not in labels else str(cid)


def nonfinite_points(results: list[tuple[str, dict]]) -> list[str]:
    """The points whose runs left a client's non-finite update out (``fedmoe run``'s exit status 3 for one run)."""
    from .summary import NONFINITE

    return [point for point, s in results if any(f.get("stage") == NONFINITE for f in s.get("failures") or [])]


def format_sweep_report(source: str, results: list[tuple[str, dict]]) -> str:
    from ..report.report import answer_metric

    key, name = answer_metric(results[0][1]) if results else ("rouge_l", "ROUGE-L")
    lines = [f"# Sweep: {source}", "", f"{len(results)} runs. {name} (0–100) of each client's model on its own test set; "
             "the client's k, LoRA rank and forward FLOPs per sequence in brackets. Below the clients: the means, "
             "the global model, and where the runs measured them MMLU and general-text perplexity (the mean over "
             "the clients' own models for personalised methods), expert load balance and uplink bytes.", ""]
    n_clients = max(len(s["clients"]) for _, s in results)
    lines.append("| client | " + " | ".join(md_cell(p) for p, _ in results) + " |")
    lines.append("|---|" + "---:|" * len(results))
    for cid in range(n_clients):
        cells = []
        for _, s in results:
            c = next((c for c in s["clients"] if c["id"] == cid), None)
            if c is None:
                cells.append("–")
                continue
            fl = c.get("flops_per_seq")
            # a client whose last evaluation failed keeps an older round's score: said in its cell
            old = c.get("evaluated_round") not in (None, s.get("rounds"))
            cells.append(f"{_cell(c.get(key))} (k={c.get('k')}, r={c.get('rank')}"
                         + (f", {fl / 1e6:.1f}M" if fl else "") + ")"
                         + (f" from round {c['evaluated_round']}" if old else ""))
        lines.append(f"| {_client_label(results, cid)} | " + " | ".join(cells) + " |")
    lines.append("| mean over clients | " + " | ".join(_cell(_clients_mean(s, key)) for _, s in results) + " |")
    # a method that trains no global model (local_only): its global numbers are the initial model's, not shown as
    # a trained one's
    untrained = [p for p, s in results if s.get("global_model_trained") is False]

    def glob(s, k, digits=2):
        return "– ¹" if s.get("global_model_trained") is False else _cell(s["global"].get(k), digits)
    lines.append("| global model | " + " | ".join(glob(s, key) for _, s in results) + " |")
    if any(s["global"].get("clients_missing") for _, s in results):  # what the pooled numbers leave out
        lines.append("| clients missing from the global numbers (their evaluation failed) | " + " | ".join(
            ", ".join(map(str, s["global"].get("clients_missing") or [])) or "–" for _, s in results) + " |")
    lines.append("| global test loss | " + " | ".join(glob(s, "loss", 4) for _, s in results) + " |")
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
                             ("MMLU, 5-shot, mean over subjects (%)", "mmlu", 1), ("general-text perplexity", "general_perplexity", 2)):
        vals = [personal_or_global(s, k) for _, s in results]
        if any(v is not None for v in vals):
            lines.append(f"| {label} | " + " | ".join(_cell(v, digits) for v in vals) + " |")
    stds = [s["global"].get("expert_load_std") for _, s in results]
    if any(stds):
        lines.append("| expert load std (mean over layers) | " + " | ".join(
            _cell(sum(v) / len(v), 4) if v else "–" for v in stds) + " |")
    lines.append(f"| {BYTES_PER_ROUND} | " + " | ".join(bytes_per_round(s) for _, s in results) + " |")
    if any(s.get("failures") for _, s in results):  # what each point's report lists under Failures
        from .summary import NONFINITE

        lines.append("| client failures (of them non-finite updates left out) | " + " | ".join(
            f"{len(s.get('failures') or [])} ({sum(f.get('stage') == NONFINITE for f in s.get('failures') or [])})"
            for _, s in results) + " |")
    if untrained:
        lines += ["", f"¹ {', '.join(untrained)}: the method trains no global model (each client trains alone); its "
                  "global model is the initial one (its numbers are the zero-shot ones, in the point's report)"]
    lines += ["", "Runs: " + ", ".join(f"[{p}]({p}/report.md)" for p, _ in results), ""]
    return "\n".join(lines)
