"""report.md: results table, category histogram and learning curves of one run."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from pathlib import Path

from fedmoe.eval.stats import change_verdict
from fedmoe.report.method import method_parts
from fedmoe.rundir import RunDir, atomic_write_bytes, atomic_write_text, md_cell

DASH = "–"  # shown for a missing value (None)
NO_TEST = "no test data"  # shown for a test metric of a model that had no test tokens (never 0)
PLOT_NAME = "learning_curve.png"
NOT_DRAWN = "(figure not drawn: `report.figures: false`; its numbers are in metrics.jsonl)"
HEATMAP_NAME = "expert_activation.png"
CONFUSION_NAME = "confusion.png"


def answer_metric(summary: dict) -> tuple[str, str]:
    """(key, display name) of a run's answer metric: accuracy (``eval.task: choice``) or ROUGE-L."""
    return ("accuracy", "accuracy") if summary.get("task") == "choice" else ("rouge_l", "ROUGE-L")

# --------------------------------------------------------------------------------------------
# formatting


def human_bytes(n: int | float | None) -> str:
    """Decimal (SI) units: 999 -> "999 B", 1234 -> "1.23 kB", 1_234_567 -> "1.23 MB"."""
    if n is None:
        return DASH
    n = float(n)
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def format_flops(x: int | float | None) -> str:
    return DASH if x is None else f"{float(x):.2e}"


def _num(x, digits: int) -> str:
    if x is None:
        return DASH
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{float(x):.{digits}f}"


def _plain(x) -> str:
    return DASH if x is None else str(x)


def mmlu_shots(g: dict) -> str:
    """How many shots a run's MMLU prompts held: "5-shot" where every prompt fitted the prompt limit (4 ×
    ``data.max_length``, at most the model's positions), else how many kept fewer shots and lost part of their
    question (a summary from before these counts says "5-shot", as it did)."""
    n, fewer, cut = (g.get(k) for k in ("mmlu_questions", "mmlu_fewer_shots", "mmlu_questions_cut"))
    if not n or not fewer:
        return "5-shot"
    out = f"5-shot; {fewer:,} of {n:,} prompts kept fewer shots to fit the prompt limit"
    return out + (f", {cut:,} lost the start of the question itself" if cut else "")


def _test_num(x, digits: int, no_test: bool) -> str:
    """A test metric; ``no_test``: its model had no test data, so a missing value says so."""
    return NO_TEST if x is None and no_test else _num(x, digits)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _sum_or_none(values) -> int | float | None:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values)


def flops_seq_len(run_dir: RunDir) -> int | None:
    """The sequence length of a run's FLOPs/seq figures (its config.yaml's ``eval.flops_seq_len``), or None where
    the run directory has no readable config saying it."""
    import yaml

    try:
        tree = yaml.safe_load(run_dir.config_path.read_text(encoding="utf-8"))
        n = tree["eval"]["flops_seq_len"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


GLOBAL_ROW = "global model"  # the results table's last row: Σ-marked cells sum the clients, the rest are the model's
SUM = "Σ "  # marks a cell of the global model's row that is the sum over the clients' rows


def n_scored(entry: dict) -> int | None:
    """How many test examples a client's (or the global model's) answer metric is the mean over: summary.json's
    ``n_scored``, or the length of its per-example ``scores`` in a summary written before that field."""
    n = entry.get("n_scored")
    if n is None and isinstance(entry.get("scores"), list):
        n = len(entry["scores"])
    return n


def _lowest_val(lowest: dict | None) -> str:
    """The round of the lowest global validation loss, said beside the final one (``eval.val_loss``)."""
    if not lowest:
        return " (no validation examples)"
    return (f" (eval.val_loss; its lowest, {_num(lowest['val_loss'], 4)}, at round {lowest['round']}"
            f"{' — the initial model' if lowest['round'] == 0 else ''} of the {lowest['rounds_measured']} rounds measured)")


def _summed(text: str) -> str:
    return text if text == DASH else SUM + text


def format_results_table(summary: dict, seq_len: int | None = None) -> str:
    """The per-client results as a plain markdown table, with a last row for the global model.

    Each answer metric (ROUGE-L or accuracy) has beside it the number of test examples it is the mean over (``n
    scored``); bytes are each client's total over the run (every round it was sent a training message). In the last
    row the cells marked Σ (n_train, bytes) are sums over the clients; the answer metric, its n and the loss are the
    global model's own test metrics, said in a line below the table. Perplexity, MMLU and the held-out set, when
    known, follow on a line below. ``seq_len`` (``eval.flops_seq_len``, :func:`flops_seq_len`) goes into the
    FLOPs/seq header: the forward FLOPs of one sequence of that many tokens.
    """
    key, name = answer_metric(summary)
    flops = "FLOPs/seq" if seq_len is None else f"FLOPs/seq ({seq_len} tokens)"
    header = ["client", "k", "rank", "n_train", name, "n scored", "loss", "bytes up (total, all rounds)",
              "bytes down (total, all rounds)", flops]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    clients = summary.get("clients") or []
    for c in clients:
        no_test = c.get("n_test") == 0
        n = n_scored(c)
        row = [
            _plain(c.get("id")),
            _plain(c.get("k")),
            _plain(c.get("rank")),
            _plain(c.get("n_train")),
            _test_num(c.get(key), 2, no_test or n == 0),
            "0" if no_test and n is None else _plain(n),
            _test_num(c.get("loss"), 4, no_test),
            human_bytes(c.get("bytes_up")),
            human_bytes(c.get("bytes_down")),
            format_flops(c.get("flops_per_seq")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    g = summary.get("global") or {}
    no_test = bool(clients) and all(c.get("n_test") == 0 for c in clients)
    n = n_scored(g)
    row = [
        GLOBAL_ROW,
        DASH,
        DASH,
        _summed(_plain(_sum_or_none(c.get("n_train") for c in clients))),
        _test_num(g.get(key), 2, no_test or n == 0),
        "0" if no_test and n is None else _plain(n),
        _test_num(g.get("loss"), 4, no_test),
        _summed(human_bytes(_sum_or_none(c.get("bytes_up") for c in clients))),
        _summed(human_bytes(_sum_or_none(c.get("bytes_down") for c in clients))),
        DASH,
    ]
    lines.append("| " + " | ".join(row) + " |")
    lines += ["", f"{GLOBAL_ROW}: {SUM.strip()} marks a sum over the clients above (n_train, bytes); {name}, n scored and "
                  f"loss are the global model's own, on the test examples of all clients together (not an average of "
                  f"the client rows). n scored: how many test examples each {name} is the mean over."]
    extras = []
    if g.get("perplexity") is not None:
        extras.append(f"perplexity {_num(g['perplexity'], 3)}")
    if g.get("mmlu") is not None:
        own = g.get("mmlu_global_model")  # a personalised method's figure is the mean over the clients' own models
        extras.append(f"MMLU ({mmlu_shots(g)}, mean over subjects) {_num(g['mmlu'], 2)}"
                      + (f" (clients' own models, mean; the global model {_num(own, 2)})"
                         if own is not None and own != g["mmlu"] else "")
                      + (f", {_num(g['mmlu_micro'], 2)} over its {g['mmlu_questions']:,} questions"
                         if g.get("mmlu_micro") is not None and g.get("mmlu_questions") else ""))
    if g.get("heldout_accuracy") is not None:
        own = g.get("heldout_accuracy_global_model")
        extras.append(f"held-out accuracy {_num(g['heldout_accuracy'], 2)}"
                      + (f" (clients' own models, mean; the global model {_num(own, 2)})"
                         if own is not None and own != g["heldout_accuracy"] else ""))
    if "val_loss" in g:
        extras.append(f"validation loss {_num(g['val_loss'], 4)}" + _lowest_val(g.get("val_loss_lowest")))
    if extras:
        lines += ["", "Global: " + " · ".join(extras)]
    for key, why in (("clients_missing", "failed their evaluation in that round"),
                     ("clients_withheld", "keep their evaluation results on their nodes (a node's own privacy budget, "
                                          "node config dp-epsilon)")):
        if g.get(key):
            lines += ["", f"The global numbers leave out the test data of clients {', '.join(map(str, g[key]))}: they "
                          f"{why}."]
    empty = [str(c.get("id")) for c in clients if c.get("n_test") == 0]
    if empty:
        lines += ["", (f"No test data for any client ({NO_TEST}): nothing was evaluated; give the clients test examples "
                       "(data.split, data.max_examples, data.partition.num_clients)." if no_test else
                       f"{NO_TEST} for client(s) {', '.join(empty)}: they count in no global or mean test metric.")]
    if summary.get("global_model_trained") is False:  # said with the table, wherever it is shown
        lines += ["", f"{summary.get('algorithm')} trains no global model: the global model row is the initial model, and "
                      "the change from zero-shot is that of the clients' own models."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# learning curves


def _curves(metrics: list[dict], split: str, key: str) -> dict:
    """{client (None = global): [(round, value), ...]} for rows of ``split`` that carry ``key``.

    When a (round, client) appears twice (e.g. a resume that did not truncate), the last wins.
    """
    points: dict = defaultdict(dict)
    for row in metrics:
        if row.get("kind") != split or row.get(key) is None or row.get("round") is None:
            continue
        if not math.isfinite(float(row[key])):  # NaN/inf (the report's tables show them): no point to draw
            continue
        points[row.get("client")][row["round"]] = float(row[key])
    return {client: sorted(by_round.items()) for client, by_round in points.items()}


def _client_sort_key(client):
    return (0, client, "") if isinstance(client, (int, float)) else (1, 0, str(client))


def plot_learning_curve(metrics: list[dict], path: str | Path, metric: tuple[str, str] = ("rouge_l", "ROUGE-L")) -> bool:
    """Write the learning-curve PNG (loss, and the answer metric ``metric``: (key, name)); False (and
    nothing written) when no row has a loss."""
    test_loss = _curves(metrics, "test", "loss")
    train_loss = _curves(metrics, "train", "loss")
    rouge = _curves(metrics, "test", metric[0])
    if not test_loss and not train_loss:
        return False

    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if rouge else 1
    fig = Figure(figsize=(6.5 * panels, 4.2))
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(1, 10)]  # C0 is kept for the global line
    clients = sorted({c for d in (test_loss, train_loss, rouge) for c in d if c is not None}, key=_client_sort_key)
    color_of = {c: colors[i % len(colors)] for i, c in enumerate(clients)}

    many = len(clients) > 8  # then one legend entry per line style, not one per client

    def draw(ax, curves, style, label_prefix, lw):  # style has a marker: one-round runs show too
        first = True
        for client in clients:
            if client not in curves:
                continue
            xs, ys = zip(*curves[client])
            if many:
                label = f"{label_prefix} (each client)" if first else None
            else:
                label = f"{label_prefix} {client}"
            first = False
            ax.plot(xs, ys, style, color=color_of[client], lw=lw, alpha=0.7, label=label)

    ax = fig.add_subplot(1, panels, 1)
    draw(ax, test_loss, ".-", "test, client", 0.9)
    draw(ax, train_loss, ".--", "train, client", 0.8)
    if None in test_loss:
        xs, ys = zip(*test_loss[None])
        ax.plot(xs, ys, "-o", color="C0", lw=2.4, ms=4, label="global test")
    val = _curves(metrics, "test", "val_loss").get(None)  # eval.val_loss
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "--s", color="C0", lw=1.8, ms=4, label="global validation")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    if rouge:
        ax = fig.add_subplot(1, panels, 2)
        draw(ax, rouge, ".-", "client", 0.9)
        if None in rouge:
            xs, ys = zip(*rouge[None])
            ax.plot(xs, ys, "-o", color="C0", lw=2.4, ms=4, label="global")
        ax.set_xlabel("round")
        ax.set_ylabel(metric[1])
        ax.set_title(f"test {metric[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    for a in fig.axes:
        a.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return True


# --------------------------------------------------------------------------------------------


def expert_heatmap_figure(summary: dict):
    """The figure of :func:`plot_expert_heatmap` (None without activation counts). Panels share the
    client axis: its labels are drawn once per panel row, and the constrained layout keeps every
    title, label and the colour bar clear of the neighbouring panels."""
    rows = [(c["id"], c.get("expert_activation"), c.get("k")) for c in summary.get("clients", [])]
    rows = [r for r in rows if r[1]]
    if not rows:
        return None
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    counts = np.array([r[1] for r in rows], dtype=float)  # (clients, layers, experts)
    freq = counts / np.maximum(counts.sum(axis=2, keepdims=True), 1)
    n_layers, n_experts = freq.shape[1], freq.shape[2]
    cols = min(n_layers, 4)
    nrows = (n_layers + cols - 1) // cols
    panel_w = min(4.0, 1.2 + 0.06 * n_experts)
    panel_h = 0.9 + 0.2 * len(rows)  # a title, the expert axis and one line per client
    fig = Figure(figsize=(panel_w * cols + 2.2, panel_h * nrows + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    vmax = float(freq.max()) or 1.0
    labels = [f"c{cid} (k={k})" for cid, _, k in rows]
    im = None
    for layer in range(nrows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        im = ax.imshow(freq[:, layer, :], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_yticks(range(len(rows)))
        if layer % cols == 0:
            ax.set_yticklabels(labels, fontsize=7)
        ax.tick_params(axis="y", labelleft=layer % cols == 0)
        if layer // cols == nrows - 1 or layer + cols >= n_layers:
            ax.set_xlabel("expert", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=axes, shrink=0.9, label="share of routed tokens")
    return fig


def _save_cropped(fig, path: str | Path) -> bool:
    """Write ``fig`` as a PNG cropped to its content; False (nothing written) when ``fig`` is None."""
    if fig is None:
        return False
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.05)
    atomic_write_bytes(Path(path), buf.getvalue())
    return True


def plot_expert_heatmap(summary: dict, path: str | Path) -> bool:
    """Per-client expert activation frequency: one panel per MoE layer, clients x experts, colour =
    share of the client's routed assignments that went to the expert."""
    return _save_cropped(expert_heatmap_figure(summary), path)


def layer_metric_keys(metrics: list[dict]) -> list[str]:
    """The server metrics that are per-layer lists (``*_by_layer``) with a value measured in some round (not all
    None or NaN: e.g. no client pair changed an expert)."""
    rows = [r for r in metrics if r.get("kind") == "server"]
    keys = sorted({k for r in rows for k, v in r.items() if k.endswith("_by_layer") and isinstance(v, list)})
    measured = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)  # noqa: E731
    return [k for k in keys if any(measured(v) for r in rows if isinstance(r.get(k), list) for v in r[k])]


def plot_layer_metrics(metrics: list[dict], folder: Path) -> list[tuple[str, str]]:
    """A heatmap (round x MoE layer) of every server metric that is a per-layer list (``*_by_layer``,
    :func:`layer_metric_keys`); returns (key, file name) of the figures written."""
    rows = [r for r in metrics if r.get("kind") == "server"]
    keys = layer_metric_keys(metrics)
    if not keys:
        return []
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = []
    for key in keys:
        have = [r for r in rows if isinstance(r.get(key), list)]
        grid = np.array([[np.nan if v is None else float(v) for v in r[key]] for r in have], dtype=float)
        if grid.size == 0 or np.isnan(grid).all():  # nothing measured (e.g. no client pair changed an expert)
            continue
        fig = Figure(figsize=(1.2 + 0.5 * grid.shape[1], 1.0 + 0.3 * grid.shape[0]))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(grid, aspect="auto", cmap="coolwarm_r", vmin=-1 if np.nanmin(grid) < 0 else None,
                       interpolation="nearest")
        ax.set_yticks(range(len(have)))
        ax.set_yticklabels([str(r["round"]) for r in have], fontsize=7)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("MoE layer", fontsize=8)
        ax.set_ylabel("round", fontsize=8)
        ax.set_title(key, fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        name = f"{key}.png"
        atomic_write_bytes(Path(folder) / name, buf.getvalue())
        out.append((key, name))
    return out


def format_zero_shot_comparison(summary: dict) -> list[str]:
    """Zero-shot (the initial model, round 0) vs after federated training, per category and per client."""
    zs = summary.get("zero_shot")
    g = summary.get("global") or {}
    if not zs:
        return []
    key, name = answer_metric(summary)
    lines = ["## Zero-shot vs federated fine-tuning", "",
             "The initial model (round 0) and the final model, on the same test examples.", "",
             f"| | n scored | zero-shot {name} | final {name} | zero-shot loss | final loss |",
             "|---|---:|---:|---:|---:|---:|",
             f"| global model | {_plain(n_scored(g))} | {_num(zs.get(key), 2)} | {_num(g.get(key), 2)} | "
             f"{_num(zs.get('loss'), 4)} | {_num(g.get('loss'), 4)} |"]
    for c in summary.get("clients", []):
        z = c.get("zero_shot") or {}
        lines.append(f"| client {c['id']} | {_plain(n_scored(c))} | {_num(z.get(key), 2)} | {_num(c.get(key), 2)} | "
                     f"{_num(z.get('loss'), 4)} | {_num(c.get('loss'), 4)} |")
    before, after = zs.get(f"{key}_by_category") or {}, g.get(f"{key}_by_category") or {}
    if before or after:
        counts = g.get("examples_by_category") or zs.get("examples_by_category") or {}
        lines += ["", f"| category | test examples | zero-shot {name} | final {name} | change |",
                  "|---|---:|---:|---:|---:|"]
        for cat in sorted(set(before) | set(after)):
            b, a = before.get(cat), after.get(cat)
            change = _num(a - b, 2) if a is not None and b is not None else DASH
            lines.append(f"| {md_cell(cat)} | {counts.get(cat, DASH)} | {_num(b, 2)} | {_num(a, 2)} | {change} |")
        both = [c for c in before if c in after]  # the mean of each side over the same categories
        if both:
            mb, ma = (sum(side[c] for c in both) / len(both) for side in (before, after))
            lines.append(f"| **mean over categories** | | {_num(mb, 2)} | {_num(ma, 2)} | {_num(ma - mb, 2)} |")
    ch = g.get(f"{key}_change")
    if ch:
        verdict = change_verdict(ch)
        what = "generated" if key == "rouge_l" else "answered"
        unit = "" if key == "rouge_l" else " points"
        lines += ["", f"{name} change{unit}, paired over the {ch['n']} {what} test examples (each client's own model, "
                      f"final vs zero-shot): **{ch['mean']:+.2f}**, {100 * ch['confidence']:.0f}% bootstrap interval "
                      f"[{ch['low']:+.2f}, {ch['high']:+.2f}] ({verdict}); higher on {ch['better']} examples, "
                      f"lower on {ch['worse']}, equal on {ch['equal']}."]
    return lines + [""]


def confusion_figure(summary: dict):
    """One confusion matrix per client (its own model on its own test examples; rows: the right label,
    columns: the model's answer, each row as shares of its examples) and the pooled one; None when the
    run has none (a generate task, or per-example options)."""
    labels = summary.get("labels")
    panels = [(f"client {c['id']}", c["confusion"]) for c in summary.get("clients", []) if c.get("confusion")]
    g = (summary.get("global") or {}).get("confusion")
    if g:
        panels.append(("global model", g))
    if not labels or not panels:
        return None
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(labels)
    cols = min(len(panels), 4)
    rows = (len(panels) + cols - 1) // cols
    side = 1.6 + 0.32 * n
    fig = Figure(figsize=(side * cols + 1.0, side * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    short = [lab if len(lab) <= 14 else lab[:13] + "…" for lab in labels]
    im = None
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(panels):
            ax.axis("off")
            continue
        title, m = panels[i]
        m = np.asarray(m, dtype=float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        acc = np.trace(m) / max(m.sum(), 1)
        ax.set_title(f"{title}: {100 * acc:.1f}% of {int(m.sum())}", fontsize=8)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(short, rotation=90, fontsize=6)
        ax.set_yticklabels(short if i % cols == 0 else [], fontsize=6)
        for r in range(n):
            for c in range(n):
                if m[r, c]:
                    ax.text(c, r, int(m[r, c]), ha="center", va="center", fontsize=5,
                            color="white" if share[r, c] > 0.6 else "black")
        if i % cols == 0:
            ax.set_ylabel("right label", fontsize=7)
        ax.set_xlabel("answer", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of the right label's examples")
    return fig


def plot_confusion(summary: dict, path: str | Path) -> bool:
    return _save_cropped(confusion_figure(summary), path)


def format_label_groups(summary: dict) -> list[str]:
    """A label task's concept shift: which clients are in which group and what each group relabels."""
    lg = summary.get("label_groups")
    if not lg:
        return []
    members: dict = defaultdict(list)
    for cid, grp in enumerate(lg["client_group"]):
        members[grp].append(str(cid))
    lines = ["## Concept shift: label groups", "", "The clients of a group read the same inputs as every other "
             "group's but give some of them another label (group 0 keeps every label).", "",
             "| group | clients | labels it maps to others |", "|---:|---|---|"]
    for grp, m in enumerate(lg["maps"]):
        shift = ", ".join(f"{a} → {b}" for a, b in sorted(m.items())) or "none"
        lines.append(f"| {grp} | {', '.join(members[grp])} | {shift} |")
    return lines + [""]


def format_withheld(summary: dict) -> list[str]:
    """What the clients kept to themselves (Flower, ``eval.share_examples`` off or refused by a SuperNode)."""
    withheld = summary.get("withheld_by_clients") or {}
    if not withheld:
        return []
    lines = ["## What stayed on the clients", "",
             "These are the clients' data and were not sent to the server, so this report has no section built from "
             "them (eval.share_examples: true asks the clients for them; a SuperNode can still refuse with its node "
             "config share-examples=false):", ""]
    lines += [f"* {what}: clients {', '.join(map(str, clients))}" for what, clients in withheld.items()]
    return lines + [""]


def format_examples(summary: dict, per_client: int = 1) -> list[str]:
    """A few generated answers next to their references (the first test examples of each client)."""
    lines = []
    for c in summary.get("clients", []):
        for ex in (c.get("examples") or [])[:per_client]:
            pred = (ex.get("prediction") or "").strip().replace("\n", " ")[:300]
            ref = (ex.get("reference") or "").strip().replace("\n", " ")[:300]
            lines += [f"* client {c['id']} — model: {pred or '(empty)'}", f"  reference: {ref}"]
    return ["## Sample answers (final model)", "", *lines, ""] if lines else []


def format_metric(key: str, value) -> str:
    """A metric by its key's suffix: ``*_s``/``seconds`` a duration, ``*_bytes`` bytes, else a number."""
    if value is None:
        return DASH
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key == "seconds" or key.endswith("_s"):
        return f"{float(value):.3f} s" if float(value) < 60 else format_duration(value)
    if key.endswith("_bytes"):
        return human_bytes(value)
    if isinstance(value, int):
        return str(value)
    if math.isfinite(value) and 0 < abs(value) < 5e-5:  # would print as 0.0000 (a DP δ of 1e-05)
        return f"{value:.3g}"
    return _num(value, 4)


def _scalar_keys(rows, skip=()) -> list[str]:
    """Keys whose values are numbers in at least one row, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def _notes(summary: dict, keys) -> list[str]:
    notes = summary.get("metric_notes") or {}
    lines = [f"* `{k}`: {notes[k]}" for k in keys if k in notes]
    return ["", *lines] if lines else []


def format_client_setup(summary: dict) -> list[str]:
    """Each client's one-shot setup before round 1 (what the method reported: time, memory, ...)."""
    setup = summary.get("client_setup") or {}
    if not setup:
        return []
    cids = sorted(setup, key=int)
    keys = _scalar_keys([setup[c] for c in cids])
    lines = ["## Client setup", "", "The one-shot setup of each client before round 1, as the method reported it.", "",
             "| client | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for cid in cids:
        lines.append(f"| {cid} | " + " | ".join(format_metric(k, setup[cid].get(k)) for k in keys) + " |")
    return lines + _notes(summary, keys) + [""]


def format_client_reported(summary: dict) -> list[str]:
    """What the method reported of each client in its latest reply (numbers, and per-layer lists such as
    a value learned per MoE layer), so a user sees what each client learned or decided."""
    clients = [c for c in summary.get("clients") or [] if c.get("reported")]
    if not clients:
        return []
    keys: list[str] = []
    for c in clients:
        keys += [k for k in c["reported"] if k not in keys]

    def cell(k, v):
        if isinstance(v, list):
            return ", ".join(format_metric(k, x) for x in v)
        return format_metric(k, v)

    lines = ["## Client-reported values", "", "From each client's latest reply (the round it was sent in; per-layer "
             "lists in MoE-layer order).", "", "| client | round | " + " | ".join(keys) + " |",
             "|---|---:|" + "---|" * len(keys)]
    for c in clients:
        lines.append(f"| {c['id']} | {_plain(c.get('reported_round'))} | "
                     + " | ".join(cell(k, c["reported"].get(k)) for k in keys) + " |")
    return lines + _notes(summary, keys) + [""]


def format_server_metrics(metrics: list[dict], summary: dict | None = None) -> list[str]:
    """The server's aggregation per round, from metrics.jsonl: its time and whatever the method reported."""
    rows = [r for r in metrics if r.get("kind") == "server" and r.get("aggregate_s") is not None]
    if not rows:
        return []
    keys = _scalar_keys(rows, skip=("round",))
    lines = ["## Server per round", "", "| round | clients aggregated | " + " | ".join(keys) + " |",
             "|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['round']} | {len(r.get('clients') or [])} | "
                     + " | ".join(format_metric(k, r.get(k)) for k in keys) + " |")
    return lines + _notes(summary or {}, keys) + [""]


def format_failures(summary: dict) -> list[str]:
    """Clients that failed to train or to evaluate, and whose reported numbers are older than the run."""
    failures = summary.get("failures") or []
    if not failures:
        return []
    lines = ["## Failures", ""]
    if any(f["stage"] == "non-finite" for f in failures):
        lines += ["Stage non-finite: the client's training loss or update had NaN or infinite values; its update was "
                  "left out of that round's aggregation (`fedmoe run` exits with status 3).", ""]
    lines += ["| round | client | stage | error |", "|---:|---:|---|---|"]
    lines += [f"| {f['round']} | {f['client']} | {f['stage']} | {f['error']} |" for f in failures]
    stale = [c for c in summary.get("clients", []) if c.get("evaluated_round") not in (None, summary.get("rounds"))]
    if stale:
        lines += ["", "The results above show these clients' last evaluation: "
                  + ", ".join(f"client {c['id']} from round {c['evaluated_round']}" for c in stale) + "."]
    return lines + [""]


def format_health(summary: dict) -> list[str]:
    """Models whose final test loss is non-finite or no better than a uniform output (ln V)."""
    health = summary.get("health") or {}
    flagged = health.get("flagged") or []
    if not flagged:
        return []
    lines = ["## Warning: models that predict nothing", "",
             f"A test loss within {100 * health['tolerance']:.0f}% of ln V = {health['uniform_loss']:.3f} is the loss "
             "of a uniform distribution over the vocabulary: such a model has collapsed (or never learned). A zero-shot "
             "loss at the same level means the starting model was already uninformative (e.g. random weights).", "",
             "| model | final test loss | zero-shot loss | verdict |", "|---|---:|---:|---|"]
    for f in flagged:
        name = "global" if f["model"] == "global" else f"client {f['model']}"
        lines.append(f"| {name} | {_num(f['loss'], 4)} | {_num(f.get('zero_shot_loss'), 4)} | {f['verdict']} |")
    return lines + [""]


def privacy_line(summary: dict) -> str | None:
    """One line of a finished run's privacy (``fedmoe run`` prints it under the results), or None without DP."""
    p = summary.get("privacy")
    if not p:
        return None
    where = "local DP, the client that sent the most" if p.get("where") == "client" else "central DP"
    seeded = " (seeded noise: whoever has the config can remove it)" if "seeded" in (
        p.get("client_noise"), p.get("server_noise")) else ""
    return (f"privacy ({where}): ε = {_num(p.get('epsilon'), 3)} at δ = {p['delta']:g} after {_releases(p)}, "
            f"σ = {p['noise_multiplier']:g}, C = {p['clip_norm']:g}{_against_target(p)}{seeded}")


def _releases(p: dict) -> str:
    """"N rounds", or "R releases (N rounds)" where a round was released again after a resume (ε counts each)."""
    rounds, releases = p.get("rounds"), p.get("releases")
    return f"{releases} releases ({rounds} rounds)" if releases and releases != rounds else f"{rounds} rounds"


def _against_target(p: dict) -> str:
    """", within the target T" or ", over the target T" (``federation.dp.target_epsilon``), or ""."""
    target = p.get("target_epsilon")
    if not target:
        return ""
    if p.get("epsilon") is not None and p["epsilon"] > target:
        return f", over the target {target:g} (a round was released again after a resume, or a client sent more often)"
    return f", within the target {target:g}"


def format_privacy(summary: dict, metrics: list[dict]) -> list[str]:
    """Client-level differential privacy: the guarantee of the final model and ε after each round."""
    p = summary.get("privacy")
    if not p:
        return []
    target = (f" σ = {p['noise_multiplier']:g} keeps ε within the target {p['target_epsilon']:g} over the run's "
              f"{p.get('target_rounds')} rounds (federation.dp.target_epsilon; without a σ given, the smallest that "
              "does)." if p.get("target_epsilon") else "")
    if p.get("target_epsilon") and p.get("epsilon") is not None and p["epsilon"] > p["target_epsilon"]:
        target += (f" This run's ε, {_num(p['epsilon'], 3)}, is over it: a round was released again after a resume, "
                   "or a client sent more often than the target's rounds.")
    if p.get("where") == "client":
        per = ", ".join(f"client {c}: {_num(e, 3)}" for c, e in (p.get("epsilon_by_client") or {}).items())
        lines = ["## Differential privacy (local, on each client)", "",
                 f"Each client clipped its own update to L2 norm {p['clip_norm']:g} and added Gaussian noise of std "
                 f"{p['noise_multiplier']:g} × {p['clip_norm']:g} before sending it, so no raw update left a client. "
                 f"(ε, δ) per client at δ = {p['delta']:g}, over the updates it sent: {per or 'none'}. "
                 f"Accounting: {p['accounting']}."
                 + (" The noise was seeded from the run's seed (client_noise: seeded): whoever has the config can "
                    "remove it, so this holds only against those who do not." if p.get("client_noise") == "seeded" else
                    " Each client drew its noise from its operating system's cryptographic generator and kept nothing of "
                    "it.")
                 + (" Each client's training loss, steps, token and expert counts, the method's metrics and the size "
                    "and categories of its training data stayed on it (reports: withhold): every update "
                    "weighed the same, and a method's own weights of an update (per expert, from the client's own "
                    "counts) were applied on the client before the noise."
                    if p.get("reports") == "withhold" else " The clients sent their reports as without DP "
                    "(reports: send), and the aggregation weighed them by their sizes.")
                 + (f" Not covered by ε: {p['not_covered']}." if p.get("not_covered") else
                    " The clients' reported losses, counts and evaluation numbers are not covered.")
                 + target, ""]
        return lines
    lines = ["## Differential privacy (client level)", "",
             f"(ε, δ) = ({_num(p['epsilon'], 3)}, {p['delta']:g}) after {_releases(p)}: each round clips every "
             f"client's update to L2 norm {p['clip_norm']:g}, adds Gaussian noise of std {p['noise_multiplier']:g} × "
             f"{p['clip_norm']:g} to their sum and divides by the {p['clients_per_round']} clients sampled per round "
             f"(noise std of the average: {p['noise_std_of_average']:.3g}). Accounting: {p['accounting']}. The guarantee "
             "covers the global models; this report's per-client numbers are not private."
             + (" The noise was seeded from the run's seed (server_noise: seeded): whoever has the config can remove "
                "it, so this holds only against those who do not." if p.get("server_noise") == "seeded" else "")
             + target,
             ""]
    rows = [r for r in metrics if r.get("kind") == "server" and r.get("dp_epsilon") is not None]
    if rows:
        lines += ["| round | ε | share of updates clipped |", "|---:|---:|---:|"]
        lines += [f"| {r['round']} | {_num(r['dp_epsilon'], 3)} | {_num(r.get('dp_clipped_fraction'), 2)} |"
                  for r in rows]
    return lines + [""]


def format_round_time(metrics: list[dict]) -> list[str]:
    """Where each round's time went: the clients' training and evaluation, the aggregation, the rest."""
    rows = [r for r in metrics if r.get("kind") == "round" and r.get("wall_s") is not None]
    if not rows:
        return []
    lines = ["## Time per round", "", "Clients: the sum of the clients' training and evaluation times (clients that "
             "work in parallel can sum to more than the wall time: the overhead is then negative).", "",
             "| round | wall | clients | aggregation | overhead |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['round']} | " + " | ".join(format_metric("wall_s", r.get(k)) for k in
                                                     ("wall_s", "clients_s", "aggregate_s", "overhead_s")) + " |")
    return lines + [""]


def format_client_time(metrics: list[dict]) -> list[str]:
    """Per round, the clients' time to load model and data for a message (0 while a process keeps
    them) against their training time, where the runtime measured it; before a round's row, the client
    processes that started for it (the run's start or resume, a node that came back) and what they loaded."""
    rows = [r for r in metrics if r.get("kind") == "train" and r.get("load_s") is not None]
    starts = [r for r in metrics if r.get("kind") == "start" and r.get("load_s") is not None]
    if not rows and not starts:
        return []
    by_round: dict = defaultdict(list)
    for r in rows:
        by_round[r["round"]].append(r)
    started: dict = defaultdict(list)
    for r in starts:
        started[r["round"]].append(r)
    lines = ["## Client time per round", "", "Each client process's time to load the model and its data for a "
             "message (0 when the process kept them from an earlier message) and its training time. A row "
             "*start* counts the clients whose process started for that round (the run's start or resume, a node "
             "that came back): its load, and the model's share of it — a process that serves several clients loads "
             "the model once.", "",
             "| round | clients | load (mean) | load (max) | model load (at start) | training (mean) |",
             "|---:|---:|---:|---:|---:|---:|"]

    def load(rs):
        loads = [r["load_s"] for r in rs]
        return f"{format_metric('load_s', sum(loads) / len(loads))} | {format_metric('load_s', max(loads))}"

    for rnd in sorted(set(by_round) | set(started)):
        if started.get(rnd):
            rs = started[rnd]
            models = [r["model_s"] for r in rs if r.get("model_s") is not None]
            n = sum(m > 0 for m in models)
            model = f"{format_metric('load_s', sum(models))} ({n} load{'' if n == 1 else 's'})" if models else DASH
            lines.append(f"| {rnd}, start | {len(rs)} | {load(rs)} | {model} | {DASH} |")
        if by_round.get(rnd):
            rs = by_round[rnd]
            work = [r.get("train_s") or 0.0 for r in rs]
            lines.append(f"| {rnd} | {len(rs)} | {load(rs)} | {DASH} | {format_metric('work_s', sum(work) / len(work))} |")
    return lines + [""]


def write_report(
    run_dir: RunDir,
    summary: dict,
    metrics: list[dict],
    histogram_markdown: str | None = None,
    figures: bool = True,
) -> Path:
    """Write ``report.md`` (and its figures beside it, unless ``figures`` is False: ``report.figures``); returns
    the report's path."""
    title = f"# fedmoe run: {summary.get('algorithm', DASH)} on {summary.get('model', DASH)}"
    facts = (
        f"rounds: {_plain(summary.get('rounds'))} · seed: {_plain(summary.get('seed'))} · "
        f"wall time: {format_duration(summary.get('wall_s'))}"
    )
    # what the method runs beyond its name: the server optimizer as resolved, FedProx's μ, robust aggregation
    facts += "".join(f" · {part}" for part in method_parts(summary.get("method"), summary.get("robust")))
    parts = [title, "", facts, "", "## Results", "", format_results_table(summary, flops_seq_len(run_dir)), ""]
    parts += format_health(summary)
    parts += format_failures(summary)
    parts += format_privacy(summary, metrics)
    parts += format_zero_shot_comparison(summary)
    if figures and plot_confusion(summary, run_dir.path / CONFUSION_NAME):
        parts += ["## Confusion matrices (final models)", "",
                  "Each client's own model on its own test examples; rows: the right label, columns: the model's "
                  "answer (counts, coloured by the share of the row).", "", f"![confusion matrices]({CONFUSION_NAME})",
                  ""]
    parts += format_label_groups(summary)
    parts += format_examples(summary)
    parts += format_withheld(summary)
    if histogram_markdown:
        parts += ["## Data: categories per client", "", histogram_markdown.strip(), ""]
    parts += format_client_setup(summary)
    parts += format_client_reported(summary)
    parts += format_server_metrics(metrics, summary)
    drawn = dict(plot_layer_metrics(metrics, run_dir.path)) if figures else {}
    for key in layer_metric_keys(metrics):
        note = (summary.get("metric_notes") or {}).get(key, "")
        parts += [f"## {key} per round and layer", "", note, "",
                  f"![{key}]({drawn[key]})" if key in drawn else NOT_DRAWN, ""]
    parts += format_round_time(metrics)
    parts += format_client_time(metrics)
    parts += ["## Learning curve", ""]
    if not (_curves(metrics, "test", "loss") or _curves(metrics, "train", "loss")):  # (what the curve would plot)
        parts += ["(no loss was logged in metrics.jsonl)", ""]
    elif not figures:
        parts += [NOT_DRAWN, ""]
    elif plot_learning_curve(metrics, run_dir.path / PLOT_NAME, answer_metric(summary)):
        parts += [f"![learning curve]({PLOT_NAME})", ""]
    if not figures:
        parts += ["## Figures", "", "None drawn (`report.figures: false`): the learning curve, expert activation, "
                  "confusion matrices and per-layer metrics are in metrics.jsonl and summary.json.", ""]
    elif plot_expert_heatmap(summary, run_dir.path / HEATMAP_NAME):
        parts += ["## Expert activation per client", "",
                  "Share of each client's routed (token, expert) assignments per expert during local training "
                  "(all rounds), per MoE layer.", "", f"![expert activation]({HEATMAP_NAME})", ""]
    atomic_write_text(run_dir.report_path, "\n".join(parts))
    return run_dir.report_path
