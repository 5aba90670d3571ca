"""``fedmoe compare RUN_DIR...``: the runs side by side, one table and overlaid learning curves.

A run that has not finished (no summary.json) is compared on what its metrics.jsonl holds so far,
and the table says how far it got. A sweep's folder stands for its finished points; a run given twice
(the same folder however written) is refused.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..configbase import flat_keys, yaml_problem
from ..eval.stats import format_change
from ..rundir import RunDir, atomic_write_bytes, loads, run_dir_problem, shell_quote, sweep_points_in, sweep_report_points
from .method import config_robust, format_method, method_info


def personal_or_global(summary: dict, key: str):
    """The mean over the clients' own models when they were measured one by one (personalised
    methods), else the global model's value."""
    vals = [c[key] for c in summary["clients"] if c.get(key) is not None]
    return sum(vals) / len(vals) if vals else summary["global"].get(key)


# what bytes_per_round is: the results table's bytes are each client's total over the run, this divides it
BYTES_PER_ROUND = "bytes up per client per round (its total ÷ the replies it sent, mean over clients)"


def bytes_per_round(summary: dict) -> str:
    """Uplink per client per round: each client's total ``bytes_up`` over the run divided by the training replies it
    sent (those left out of the aggregation included, as their bytes are; a summary written before that count: the
    rounds it trained), averaged over the clients that replied (:data:`BYTES_PER_ROUND`)."""
    per = [c["bytes_up"] / n for c in summary["clients"] if (n := c.get("replies_received") or c.get("rounds_trained"))]
    return "–" if not per else f"{sum(per) / len(per) / 1e6:.2f} MB"


@dataclass
class Run:
    label: str
    path: Path
    config: dict
    metrics: list[dict]
    summary: dict | None  # None: not finished

    @property
    def rounds_done(self) -> int:
        return max((r["round"] for r in self.metrics if r.get("kind") == "round"), default=0)

    def setting(self, section: str, key: str, default=None):
        """``config[section][key]`` of the run's config.yaml (``default`` where it has no such setting)."""
        sec = self.config.get(section)
        return sec.get(key, default) if isinstance(sec, dict) else default


_LEAVE_OUT = "restore it or leave this run out of the comparison"


def _not_utf8(path: Path, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): the file is damaged; "
                      + _LEAVE_OUT)


def _read_config(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except yaml.YAMLError as e:
        where, why = yaml_problem(e)
        raise ValueError(f"{path}:{where} is not valid YAML ({why}): {_LEAVE_OUT}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: the top level is {type(tree).__name__ if tree is not None else 'empty'}, not the "
                         f"mapping of sections (model:, data:, ...) that `fedmoe run` writes: {_LEAVE_OUT}")
    return tree


METRIC_NUMBERS = ("loss", "rouge_l", "accuracy", "val_loss")  # what the comparison reads of a row, beside "round"


def _read_metrics(rd: RunDir) -> list[dict]:
    """The rows of metrics.jsonl, each a JSON object with a whole-number ``round`` (what every reader here
    relies on); anything else is refused naming the file and the line."""
    path = rd.metrics_path
    try:
        rows = rd.read_metrics()
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    linenos = [n for n, line in enumerate(text.split("\n"), start=1) if line.strip()]  # rows are the non-blank lines
    for lineno, row in zip(linenos, rows):
        if not isinstance(row, dict):
            why = f"is {type(row).__name__}, not a JSON object"
        elif "round" not in row:
            why = 'has no "round"'
        elif not isinstance(row["round"], int) or isinstance(row["round"], bool) or row["round"] < 0:
            why = f'has "round": {json.dumps(row["round"])}, not a whole number >= 0'
        elif (bad := next((k for k in METRIC_NUMBERS if row.get(k) is not None and not _number(row[k])), None)):
            why = f'has "{bad}": {json.dumps(row[bad])[:40]}, not a number or null'
        else:
            continue
        raise ValueError(f"{path}: line {lineno} {why} (every row `fedmoe run` writes has a whole-number \"round\", and "
                         "its scores are numbers or null): repair or delete that line, or leave this run out of the "
                         "comparison")
    return rows


# what the readers of a summary.json (fedmoe compare, a sweep's table) compute with: where present, a number or null
CLIENT_NUMBERS = ("loss", "rouge_l", "accuracy", "val_loss", "bytes_up", "bytes_down", "rounds_trained",
                  "replies_received", "evaluated_round", "flops_per_seq", "perplexity", "mmlu", "general_perplexity",
                  "heldout_accuracy")
GLOBAL_NUMBERS = ("loss", "rouge_l", "accuracy", "val_loss", "mmlu", "perplexity", "general_perplexity",
                  "heldout_accuracy")
CLIENT_KEYS = ("id", "loss", "bytes_up", "bytes_down")  # in every client's entry fedmoe writes


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def summary_problem(summary) -> str | None:
    """What in a summary.json's tree is not as ``fedmoe run`` writes it — where a reader would fail on it or, worse,
    compute from part of it (a client's entry without its loss left the mean to the others) —, or None."""
    if not (isinstance(summary, dict) and isinstance(summary.get("global"), dict)
            and isinstance(summary.get("clients"), list) and all(isinstance(c, dict) for c in summary["clients"])):
        return 'is not a fedmoe summary (a JSON object with "global" and "clients")'
    if not _number(summary.get("wall_s")):
        return f'has "wall_s": {json.dumps(summary.get("wall_s"))}, not a number'
    clients = summary["clients"]
    ids = [c.get("id") for c in clients]
    if ids != list(range(len(clients))):
        return f'has clients with ids {json.dumps(ids)[:80]}, not 0, 1, ... in order (every client is in a summary)'
    for c in clients:
        if (missing := [k for k in CLIENT_KEYS if k not in c]):
            return f'has client {c["id"]} without "{missing[0]}"'
        if (bad := next((k for k in CLIENT_NUMBERS if c.get(k) is not None and not _number(c[k])), None)):
            return f'has client {c["id"]}\'s "{bad}": {json.dumps(c[bad])[:40]}, not a number or null'
    g = summary["global"]
    if (bad := next((k for k in GLOBAL_NUMBERS if g.get(k) is not None and not _number(g[k])), None)):
        return f'has the global "{bad}": {json.dumps(g[bad])[:40]}, not a number or null'
    if (bad := next((k for k, v in g.items() if k.endswith("_change") and v is not None and not isinstance(v, dict)),
                    None)):
        return f'has the global "{bad}": {json.dumps(g[bad])[:40]}, not the paired change fedmoe writes'
    return None


def read_summary_file(path: Path, remedy: str) -> dict:
    """A summary.json, checked as its readers need it (:func:`summary_problem`); anything else is a ValueError
    naming the file, ending in ``remedy``."""
    try:
        summary = loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is truncated or damaged; {remedy}") from None
    if (problem := summary_problem(summary)) is not None:
        raise ValueError(f"{path} {problem}: the file was edited or damaged; {remedy}")
    return summary


def _read_summary(rd: RunDir) -> dict | None:
    path = rd.summary_path
    if not path.exists():
        return None
    return read_summary_file(path, "move it away to compare the run as unfinished (on its metrics.jsonl), or leave "
                                   "this run out")


def load_run(path: str | Path, label: str | None = None) -> Run:
    if (problem := run_dir_problem(path, "compare")) is not None:  # missing, a file, a sweep's folder, no config.yaml
        raise FileNotFoundError(problem)
    rd = RunDir(path, create=False)
    if not rd.config_path.exists() or not rd.metrics_path.exists():
        raise FileNotFoundError(f"{rd.path} is not a fedmoe run directory (no config.yaml and metrics.jsonl): pass the "
                                "folder `fedmoe run` wrote (runs/<name>)")
    config = _read_config(rd.config_path)
    return Run(label or rd.path.name, rd.path, config, _read_metrics(rd), _read_summary(rd))


def _labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, with its parent where two names clash; both read from the absolute path, so a
    run given as ``fedit`` or ``.`` is labelled by its folder (``runs/fedit``), never ``/fedit`` or an empty name."""
    full = [Path(os.path.abspath(p)) for p in paths]
    names = [p.name or str(p) for p in full]
    return [(f"{p.parent.name}/{p.name}" if p.parent.name else str(p)) if names.count(n) > 1 else n
            for p, n in zip(full, names)]


def _global_test(run: Run, key: str) -> list[tuple[int, float]]:
    return sorted((r["round"], r[key]) for r in run.metrics
                  if r.get("kind") == "test" and r.get("client") is None and r.get(key) is not None)


def _lowest(run: Run) -> str:
    pts = [(v, rnd) for rnd, v in _global_test(run, "val_loss") if math.isfinite(v)]
    if not pts:
        return "–"
    v, rnd = min(pts)
    return f"{_cell(v)} at {rnd}"


def _mean_train_loss(run: Run) -> list[tuple[int, float]]:
    by_round: dict[int, list[float]] = {}
    for r in run.metrics:
        if r.get("kind") == "train" and r.get("loss") is not None:
            by_round.setdefault(r["round"], []).append(r["loss"])
    return [(k, sum(v) / len(v)) for k, v in sorted(by_round.items())]


def _cell(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def run_method(run: Run) -> str:
    """The run's method with its server optimizer (settings as resolved), FedProx's μ and robust aggregation: from
    its summary.json's ``method`` (as the run resolved it), else — an unfinished run, or one written before the
    summary had it — from its config.yaml (an ``lr: null`` resolved by this fedmoe's defaults)."""
    summary = run.summary or {}
    method = summary.get("method")
    if not isinstance(method, dict):
        method = method_info(run.config)
    robust = summary.get("robust") or config_robust(run.config)
    return format_method(method, robust if isinstance(robust, dict) else None,
                         name=method.get("name") or run.setting("algorithm", "name", "–"))


def format_comparison(runs: list[Run]) -> str:
    head = ["", *[r.label for r in runs]]
    rows = [["method"] + [run_method(r) for r in runs],
            ["model"] + [r.setting("model", "name", "–") for r in runs],
            ["rounds done"] + [f"{r.rounds_done} of {r.setting('federation', 'rounds', '?')}"
                               + ("" if r.summary else " (unfinished)") for r in runs]]

    def trains_global(run) -> bool:
        from ..algorithms import METHODS

        method = METHODS.get(run.setting("algorithm", "name"))
        return method is None or method.server.trains_global_model

    untrained = [r.label for r in runs if not trains_global(r)]

    def zs(run, key, digits):
        pts = _global_test(run, key)
        last = pts[-1][1] if pts and pts[-1][0] > 0 else None
        first = pts[0][1] if pts and pts[0][0] == 0 else None
        if not trains_global(run):  # its "final" global model is the initial one
            return f"– ¹ ({_cell(first, digits)})"
        return f"{_cell(last, digits)} ({_cell(first, digits)})"

    choice = any(r.setting("eval", "task") == "choice" for r in runs)
    key, name = ("accuracy", "accuracy") if choice else ("rouge_l", "ROUGE-L")
    rows.append(["global test loss (zero-shot)"] + [zs(r, "loss", 4) for r in runs])
    rows.append([f"global {name} (zero-shot)"] + [zs(r, key, 2) for r in runs])
    if any(_global_test(r, "val_loss") for r in runs):  # eval.val_loss: the number to choose between these runs by
        rows.append(["global validation loss (zero-shot)"] + [zs(r, "val_loss", 4) for r in runs])
        rows.append(["lowest global validation loss, at round"] + [_lowest(r) for r in runs])
    # summary.global.<key>_change pairs each client's own model's final answers with its zero-shot ones (the global
    # model's only where every client ends with it): said in the row, which sits under the global model's rows
    unit = "" if key == "rouge_l" else " (points)"
    rows.append([f"{name} change{unit} of the clients' own models (final vs zero-shot), 95% interval"] + [
        format_change(r.summary["global"].get(f"{key}_change")) if r.summary else "–" for r in runs])
    rows.append(["client test loss, mean"] + [
        _cell(personal_or_global(r.summary, "loss")) if r.summary else "–" for r in runs])
    # what a personalised method (FLEx, FLAME's rescaled clients, FC-MoE with retention) reports: each client's own
    # model on its own test set, averaged over the clients; the global model's where clients were not scored one by one
    rows.append([f"client {name}, mean (each client's own model)"] + [
        _cell(personal_or_global(r.summary, key), 2) if r.summary else "–" for r in runs])
    rows.append([BYTES_PER_ROUND] + [bytes_per_round(r.summary) if r.summary else "–" for r in runs])
    rows.append(["wall"] + [f"{r.summary['wall_s'] / 60:.1f} min" if r.summary else "–" for r in runs])
    # what the numbers above leave out, as the sweep table says it: clients whose evaluation failed (the pooled global
    # numbers are without their test data), clients whose last score is of an earlier round, every client failure
    done = [r.summary or {} for r in runs]
    if any((d.get("global") or {}).get("clients_missing") for d in done):
        rows.append(["clients missing from the global numbers (their evaluation failed)"] + [
            ", ".join(map(str, (d.get("global") or {}).get("clients_missing") or [])) or "–" for d in done])
    stale = [[c["id"] for c in d.get("clients") or [] if c.get("evaluated_round") not in (None, d.get("rounds"))]
             for d in done]
    if any(stale):
        rows.append(["clients scored at an earlier round (their last evaluation failed)"] + [
            ", ".join(map(str, ids)) or "–" for ids in stale])
    if any(d.get("failures") for d in done):
        rows.append(["client failures (see each run's report)"] + [str(len(d.get("failures") or [])) for d in done])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(runs)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if untrained:
        lines += ["", f"¹ {', '.join(untrained)}: the method trains no global model (each client trains alone): its "
                  "global model is the initial one, whose numbers are the zero-shot ones in brackets"]
    differ = scoring_differences(runs)
    if differ and all(d.startswith("seed: ") for d in differ):  # a seed study: a spread that includes the split's
        lines += ["", f"Seeds differ ({differ[0]}): each run's seed also drew its partition and test split, so their "
                  "test numbers differ by the test examples as well as by training."]
    elif differ:
        lines += ["", "Not like for like: these runs were scored on different test data or scoring ("
                  + "; ".join(differ) + "), so their test numbers differ by that too."]
    return "\n".join(lines)


# the settings that decide which test examples a run is scored on, and how: every data key but those that touch
# only the training (or validation) data, the seed (the split and partition), and the evaluation's scoring
_TRAIN_ONLY_DATA = ("max_train_per_client", "pool_train", "on_bad_row", "max_val_per_client")
_SCORING = ("task", "choice_normalize", "rouge", "rouge_tokenizer", "max_new_tokens", "no_repeat_ngram_size",
            "max_examples")


def scoring_differences(runs: list[Run]) -> list[str]:
    """``key: value | value | ...`` (one value per run) for each setting of the test data or its scoring in which
    the runs differ: their test numbers are then not like for like."""
    def settings(run: Run) -> dict:
        data = {k: v for k, v in (run.config.get("data") or {}).items() if k not in _TRAIN_ONLY_DATA}
        scoring = {k: v for k, v in (run.config.get("eval") or {}).items() if k in _SCORING}
        return flat_keys({"data": data, "eval": scoring, "seed": run.config.get("seed")})

    from ..config import RunConfig, config_to_dict

    # a key a run's config.yaml lacks (written before fedmoe had it) has its default, e.g. eval.rouge_tokenizer
    default = flat_keys(config_to_dict(RunConfig()))
    each = [settings(r) for r in runs]
    keys = sorted({k for s in each for k in s})
    value = [{k: json.dumps(s[k] if k in s else default.get(k)) for k in keys} for s in each]
    out = [f"{k}: " + " | ".join(v[k] for v in value) for k in keys if len({v[k] for v in value}) > 1]
    # the same data.source may name files whose contents changed between runs: their fingerprints (size and SHA-256
    # of every file, beside each run's checkpoints) tell; a run without one is not compared by it
    from ..federation.checkpoint import data_fingerprint_file

    prints = [data_fingerprint_file(r.path) for r in runs]
    if all(p is not None for p in prints) and len({json.dumps(p, sort_keys=True) for p in prints}) > 1:
        groups: dict[str, list[str]] = {}
        for r, p in zip(runs, prints):
            groups.setdefault(json.dumps(p, sort_keys=True), []).append(r.label)
        out.append("the data files' contents (size and SHA-256): " + " | ".join(", ".join(g) for g in groups.values()))
    return out



def plot_comparison(runs: list[Run], path: str | Path) -> bool:
    """Global test loss, mean client training loss and (when measured every round) global ROUGE-L
    per round, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("global test loss", lambda r: _global_test(r, "loss")),
              ("mean client training loss", _mean_train_loss)]
    for key, name in (("rouge_l", "ROUGE-L"), ("accuracy", "accuracy")):
        if any(len(_global_test(r, key)) > 2 for r in runs):
            panels.append((f"global {name}", lambda r, key=key: _global_test(r, key)))
    if not any(f(r) for _, f in panels for r in runs):
        return False
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels):
        for run in runs:
            pts = series(run)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=run.label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True


def expand_sweeps(paths: list[str | Path], log=print) -> list[Path]:
    """``paths`` as given, a sweep's folder (:func:`~fedmoe.rundir.sweep_points_in`) replaced by its finished points
    in the sweep's order (its unfinished ones are named to ``log``: give a point's folder to compare it as it is so
    far); a sweep with no finished point is refused, naming its points. A run given twice — the same folder after
    symbolic links, ``..`` and a trailing ``/``, directly or as a sweep's point — is refused, naming it."""
    expanded: list[tuple[Path, str]] = []  # (path, how it was given)
    for p in map(Path, paths):
        points = sweep_points_in(p)
        if points is None:
            expanded.append((p, str(p)))
            continue
        done = [q for q in points if (q / RunDir.SUMMARY).is_file()]
        rest = [q.name for q in points if q not in done]
        if not done:
            raise ValueError(f"{p} is a sweep's folder with no finished point (points: {', '.join(rest) or 'none'}): "
                             "compare a point as it is so far by giving its folder"
                             + (f", e.g. `fedmoe compare {shell_quote(points[0])}`" if points else ""))
        if rest:
            log(f"{p} is a sweep's folder: comparing its {len(done)} finished points; not finished (give a point's folder "
                f"to compare it as it is so far): {', '.join(rest)}")
        listed = sweep_report_points(p)
        unlisted = [q.name for q in done if listed is not None and q.name not in listed]
        if unlisted:  # finished points of an earlier (or wider) run of the sweep than the one its report tabulates
            log(f"{p} is a sweep's folder whose sweep_report.md does not list the points {', '.join(unlisted)}: they "
                "were run by an earlier or wider run of the sweep, perhaps with another config (compared as they are)")
        expanded += [(q, f"{q} (a point of the sweep {p})") for q in done]
    seen: dict[Path, str] = {}
    for p, given in expanded:
        key = p.resolve()
        if key in seen:
            what = f"{given} is given twice" if seen[key] == given else f"{seen[key]} and {given} are the same run ({key})"
            raise ValueError(f"{what}: a run is compared once; leave one of them out")
        seen[key] = given
    return [p for p, _ in expanded]


def compare_runs(paths: list[str | Path], out: str | Path, log=print) -> tuple[str, Path | None]:
    """(the markdown table, the PNG written or None); writes ``out``/compare.md and compare.png. A sweep's folder
    among ``paths`` is its finished points (:func:`expand_sweeps`, which says to ``log`` what it leaves out)."""
    if not paths:
        raise ValueError("fedmoe compare needs at least one run directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: give a folder for compare.md and compare.png (a new "
                         "one is created)")
    said: list[str] = []  # what the comparison leaves out or should be read with: also into compare.md

    def note(msg: str) -> None:
        said.append(msg)
        log(msg)

    ps = expand_sweeps(paths, note)
    runs = [load_run(p, label) for p, label in zip(ps, _labels(ps))]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror or e}): give a folder you may write "
                         "for compare.md and compare.png") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write into it (Permission denied): give a folder you may write for "
                         "compare.md and compare.png")
    table = format_comparison(runs)
    png = out / "compare.png"
    drawn = plot_comparison(runs, png)
    from ..rundir import atomic_write_text

    atomic_write_text(out / "compare.md", "# fedmoe compare\n\n" + table + "\n\n"
                      + ("![learning curves](compare.png)\n" if drawn else "") + "\nRuns: "
                      + ", ".join(f"`{r.path}`" for r in runs) + "\n"
                      + "".join(f"\nNote: {m}\n" for m in said))
    return table, png if drawn else None
