"""The ``fedmoe`` command line. Logic lives in the library; this file only parses and prints."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Federated fine-tuning of Mixture-of-Experts LLMs.")


@app.callback()
def _root():
    """fedmoe: federated fine-tuning of MoE LLMs (FLEx, FLAME and their baselines; see `algorithm.name`)."""


def _error(message, label: str = "error") -> None:
    """``error: <cause and what to do>`` on stderr, never re-wrapped (one line stays one line when piped)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True, highlight=False).print(f"[red]{label}:[/] {escape(str(message))}")


def _os_error(e: OSError) -> str:
    """An OSError as its cause, the path, and what to do."""
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}: check that the path exists and that you may read (or write) it"
    return str(e)


# `fedmoe run` in a process of its own (main): SIGTERM — what a batch scheduler or `kill` sends — stops the run as
# Ctrl-C does (the lock released, where to resume said), exit status 143; other commands keep dying of it
_STOP = {"running": False, "signal": None}


def _on_sigterm(signum, frame):
    if not _STOP["running"]:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _STOP["signal"] = "SIGTERM"
    raise KeyboardInterrupt


def _exit_if_threads_are_stuck(status: int) -> None:
    """End the process now with ``status`` where a stopped Flower simulation left threads that never end
    (``launch.STUCK_THREADS``): Python's exit would wait for them forever after the run said it stopped."""
    launch = sys.modules.get("fedmoe.federation.flower.launch")
    if launch is not None and launch.STUCK_THREADS["now"]:
        sys.stdout.flush()
        sys.stderr.flush()
        launch.finish_stopping()  # the Ray processes the stopped simulation left running
        os._exit(status)


def _interrupted(path: Optional[Path], sweep: Optional[str], cause: str = "Ctrl-C",
                 sweep_root: Optional[Path] = None) -> str:
    """What Ctrl-C (or SIGTERM: ``cause``) left behind and how to go on; ``sweep``: the command line that continues
    the sweep; ``sweep_root``: its folder, where the signal came between its points' runs (or stopped several)."""
    from .federation.checkpoint import has_checkpoint
    from .rundir import resume_command

    if path is None and sweep is not None and sweep_root is not None:
        return (f"stopped ({cause}) the sweep in {sweep_root}: its finished points are kept, a point that was running "
                f"resumes from its checkpoint, the others start; continue it with `{sweep}`")
    if path is None:
        return f"stopped ({cause}) before the run started: nothing was written"
    if (Path(path) / "summary.json").is_file() and sweep is None:  # the run ended as the signal came (on Flower,
        # its ServerApp finished the last round before the stop reached it): nothing is lost, nothing to resume
        return f"{cause} came after the run finished: its results are in {path} (summary.json, report.md)"
    if sweep is not None:
        return (f"stopped ({cause}) in the sweep point {path}: continue the sweep with `{sweep}` (finished "
                "points are kept, this one " + ("resumes from its checkpoint)" if has_checkpoint(path) else "starts over)"))
    if has_checkpoint(path):
        return (f"stopped ({cause}): the last checkpoint is in {path / 'checkpoints'}; continue with "
                f"`{resume_command(path)}`")
    return (f"stopped ({cause}) before the first checkpoint: nothing to resume in {path}; run the same command again "
            "to start over")


def _sweep_command(config: Path, sets: list[str], federation: Optional[str]) -> str:
    """The command line that runs (and so continues) a sweep as it was started: its config and --set options."""
    from .rundir import shell_quote

    return " ".join(["fedmoe run", shell_quote(config), *(f"--set {shell_quote(s)}" for s in sets),
                     *([f"--federation {shell_quote(federation)}"] if federation else [])])


def _no_library_bars() -> None:
    """--quiet: no progress bar of the libraries either (transformers' "Loading weights" of a model folder, its
    "Writing model shards" of a merged export)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _has_sweep(path: Path) -> bool:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False  # load_config reports it (the line, or a file that is not text)
    return isinstance(tree, dict) and "sweep" in tree


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (default: the built-in default run)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.lr=1e-4")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="continue the run in this directory")] = None,
    runtime: Annotated[Optional[str], typer.Option(
        "--runtime", help="local (default: every client in this process), flower-sim (Flower's simulation engine) "
                          "or flower (a SuperLink and SuperNodes; with --federation)")] = None,
    federation: Annotated[Optional[str], typer.Option(
        "--federation", help="--runtime flower: the SuperLink's name in $FLWR_HOME/config.toml")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace the run in output_dir/name (default: a finished run there is kept and this run "
                            "goes to name-2, name-3, ...)")] = False,
    jobs: Annotated[int, typer.Option(
        "--jobs", help="a sweep: run this many points at once, each in its own process with an equal share of the "
                       "CPU threads")] = 1,
):
    """Run a federated fine-tuning experiment (or continue one with --resume)."""
    from rich.console import Console

    from .config import ConfigError, load_config
    from .federation.entry import continue_run, start_run
    from .report import format_results_table

    console = Console()
    _STOP["running"] = True
    if quiet:
        _no_library_bars()
    if runtime is not None:
        set_ = [*(set_ or []), f"federation.runtime={runtime}"]
    sweep = None
    try:
        if resume is not None:
            if config is not None or overwrite or runtime is not None:
                raise ConfigError("--resume continues a run with its own config.yaml (and runtime); do not pass a "
                                  "config, --runtime or --overwrite (--set only for what may change on resume, e.g. "
                                  "--set train.activation_checkpointing=true)")
            if jobs != 1:
                raise ConfigError(f"--jobs {jobs} runs the points of a sweep in parallel, and --resume continues one run: "
                                  "leave --jobs out (a sweep continues with `fedmoe run CONFIG --jobs N`, its config)")
            summary, rd = continue_run(resume, show_progress=not quiet, federation=federation, overrides=set_ or [])
        elif config is not None and _has_sweep(config):
            from .federation.sweep import run_sweep

            if overwrite:
                raise ConfigError("--overwrite replaces a single run; a sweep keeps its finished points and resumes the "
                                  "others (delete a point's directory to run it again)")
            sweep = _sweep_command(config, set_ or [], federation)
            results: list = []
            report = run_sweep(config, set_ or [], show_progress=not quiet and jobs == 1, log=console.print,
                               federation=federation, jobs=jobs, results=results)
            print(report.read_text())
            print(f"sweep report: {report}")
            from .federation.summary import EXIT_NONFINITE
            from .federation.sweep import nonfinite_points

            bad = nonfinite_points(results)
            if not bad:
                return
            # as one run that left such an update out (typer.Exit is a RuntimeError: raised after this try)
            _error(f"points {', '.join(bad)} left non-finite client updates out of their aggregation (each "
                   f"point's report: Failures): their results come from the other clients; exit status "
                   f"{EXIT_NONFINITE}", label="warning")
        else:
            if jobs != 1:
                raise ConfigError("--jobs runs the points of a sweep in parallel; this config has no sweep: section")
            cfg = load_config(config, set_ or [])
            from .config import refuse_unread

            refuse_unread(cfg, f"{config or 'the default config'}" + (" with --set" if set_ else ""))
            from .report.method import run_banner

            console.print(f"[bold]fedmoe run[/]: {run_banner(cfg)}")
            summary, rd = start_run(cfg, show_progress=not quiet, federation=federation, overwrite=overwrite)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say what is left and how to go on
        sigterm = _STOP["signal"] == "SIGTERM" or getattr(e, "signal", None) == "SIGTERM"
        _error(_interrupted(getattr(e, "path", None), sweep, "SIGTERM" if sigterm else "Ctrl-C",
                            getattr(e, "sweep_root", None)), label="interrupted")
        _exit_if_threads_are_stuck(143 if sigterm else 130)
        raise typer.Exit(143 if sigterm else 130)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RuntimeError, TimeoutError) as e:
        _error(e)
        raise typer.Exit(2)
    except OSError as e:
        _error(_os_error(e))
        raise typer.Exit(2)
    if sweep is not None:  # a sweep whose points left non-finite updates out (its table is printed)
        from .federation.summary import EXIT_NONFINITE

        raise typer.Exit(EXIT_NONFINITE)
    # plain print: the table and paths must not be re-wrapped by rich when piped
    print()
    from .report.report import flops_seq_len, privacy_line

    print(format_results_table(summary, flops_seq_len(rd)))

    line = privacy_line(summary)
    if line:
        print(line)
    print(f"\nreport: {rd.report_path}\nsummary: {rd.summary_path}")
    from .federation.summary import EXIT_NONFINITE, nonfinite_exit_message

    if (why := nonfinite_exit_message(summary)) is not None:
        console.print(f"[yellow]warning:[/] {why}")
        raise typer.Exit(EXIT_NONFINITE)


@app.command()
def plan(
    config: Annotated[Optional[Path], typer.Argument(help="a run config (default: the default run)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.batch_size=4")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="plan for a run on this device (cpu, cuda, "
                                                  "cuda:1; sets model.device: its precision and memory; default: "
                                                  "model.device)")] = None,
    memory: Annotated[Optional[float], typer.Option("--memory", min=1e-6, help="compare with this much memory, in "
                                                    "GiB, in place of the device's free memory (a card on another "
                                                    "machine: --device cuda --memory 24)")] = None,
):
    """Will it fit? The estimated peak memory of one client's training step per budget level (weights,
    adapters, gradients, optimizer state, activations), before anything is loaded, and whether the device
    has it (or --memory GiB). Exit status: 0 when it fits (or there is no memory to compare with: a GPU
    planned on a machine without one, and no --memory), 1 when it does NOT fit (for a sweep: any of its
    plans), 2 on an error."""
    from .config import ConfigError, load_config
    from .plan import client_memory, distinct_plans, fits, format_plan, memory_plan

    sets = [*(set_ or []), *([f"model.device={device}"] if device else [])]
    try:
        if config is not None and _has_sweep(config):
            from .federation.sweep import expand_sweep

            # a sweep: one plan per distinct memory-relevant setting, naming the points it covers
            todo = distinct_plans(expand_sweep(config, sets)[2])
        else:
            todo = [(load_config(config, sets), None)]
        done = [(cfg, points, memory_plan(cfg)) for cfg, points in todo]
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    too_big = False
    for i, (cfg, points, plans) in enumerate(done):
        # (a simulated client: its share of the GPU)
        what, available = client_memory(cfg, None if memory is None else (f"--memory {memory:g} GiB", int(memory * 2**30)))
        if points is not None:
            print(("\n" if i else "") + f"sweep points {', '.join(points)}:")
        print(format_plan(cfg, plans, what, available))
        too_big |= not fits(plans, available)
    if too_big:
        raise typer.Exit(1)


@app.command()
def worker(
    socket_path: Annotated[Path, typer.Option("--socket", help="the Unix socket the SuperNode's node config names "
                                              "(worker=PATH)")],
    node_config: Annotated[Optional[str], typer.Option(
        "--node-config", help="serve only the SuperNode with this node config's identity ('partition-id=0 "
                              "state-dir=\"...\" [data-path=...]'; default: the SuperNode that relays to it)")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="ranks that train each client together (torchrun; "
                                       "one GPU each on CUDA, gloo on CPU)")] = 1,
    idle_exit_s: Annotated[Optional[float], typer.Option(
        "--idle-exit-s", min=1, help="exit after this many seconds without a message (default: never; a worker "
                                     "the relay starts: 3600, node config worker-idle-s)")] = None,
):
    """A long-running client worker beside a SuperNode: loads the model and the client's data once and
    answers the messages the SuperNode's ClientApp relays to it (node config worker=PATH). The relay
    starts one itself when none runs; start it yourself to choose --nproc or to see its output."""
    from .federation.flower.launch import require_flower
    from .federation.flower.worker import WorkerBusy, main as worker_main

    try:
        require_flower()
        worker_main(str(socket_path), node_config, nproc, idle_exit_s)
    except (WorkerBusy, ValueError) as e:
        _error(f"{e}")
        raise typer.Exit(2)


@app.command("migrate-checkpoint")
def migrate_checkpoint(
    run_dir: Annotated[Path, typer.Argument(help="a run directory whose checkpoints an older fedmoe wrote")],
):
    """Rewrite a run's checkpoints written by fedmoe before 2026-12-05 in the current format, which loads
    without running code. It reads them the old way (pickle) once: only for runs you trust (your own)."""
    from .federation.checkpoint import migrate_checkpoints

    try:
        done = migrate_checkpoints(run_dir)
    except (OSError, ValueError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    print(f"{len(done)} checkpoint file(s) rewritten" if done else f"{run_dir}: nothing to rewrite (already current)")


@app.command("node-privacy")
def node_privacy(
    state_dir: Annotated[Path, typer.Argument(help="a SuperNode's state-dir (its node config state-dir)")],
    delta: Annotated[float, typer.Option(help="the δ of the node's budget (its node config dp-delta)")] = 1e-5,
    budget: Annotated[Optional[float], typer.Option(help="the node's dp-epsilon, to show what is left")] = None,
    start: Annotated[bool, typer.Option("--start", help="start an empty ledger where there is none (what the node "
                                        "released before it is not counted), creating the state-dir if it does "
                                        "not exist: never overwrites one; the trained stores already there are "
                                        "accepted as accounted for elsewhere")] = False,
    accept_stores: Annotated[bool, typer.Option("--accept-stores", help="accept the stores of rounds the ledger "
                                                "records no release for (an older ledger restored, rounds trained "
                                                "without the budget) as accounted for elsewhere, so the node trains "
                                                "again: their releases are not counted")] = False,
):
    """What a SuperNode's own privacy ledger holds (node config dp-epsilon): every update it released, by run,
    and the ε they make at δ, counted on the node itself. A STATE_DIR that does not exist or is a file is an
    error (exit 2), not an empty ledger."""
    from .federation.flower.budget import BudgetRefusal, PrivacyLedger, check_state_dir, ledger_report

    if not 0 < delta < 1:
        _error(f"--delta {delta:g}: give a number in (0, 1)")
        raise typer.Exit(2)
    try:
        if start:
            check_state_dir(state_dir, missing_ok=True)  # --start on a new folder: the operator's word to begin one
            ledger = PrivacyLedger(state_dir)
            print(f"{ledger.path}: started, empty" if ledger.start() else f"{ledger.path}: a ledger is there already, "
                  "kept as it is")
        if accept_stores:
            check_state_dir(state_dir)
            new = PrivacyLedger(state_dir).accept_stores()
            print(f"{len(new)} store(s) without a recorded release accepted as accounted for elsewhere (their "
                  "releases are not counted): " + ", ".join(str(p) for p in new) if new
                  else "every trained store has its release recorded or accepted: nothing to accept")
        print(ledger_report(state_dir, delta, budget))
    except (BudgetRefusal, OSError) as e:
        _error(f"{e}")
        raise typer.Exit(2)


@app.command()
def pretrain(
    config: Annotated[Optional[Path], typer.Argument(help="pretraining YAML (default: the built-in model's recipe)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.max_steps=100")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace what export_dir holds (the recipe's "
                                            "export_dir is the shipped model's folder)")] = False,
):
    """Pretrain the built-in tiny MoE (tokenizer + model) and export it with a model card. An export_dir that
    holds anything this run did not write (the shipped model included) is refused before training, unless
    --overwrite."""
    from .config import ConfigError
    from .data import DataError
    from .pretrain import load_pretrain_config, run_pretrain
    from .rundir import DamagedFileError

    cfg = None
    try:  # run_pretrain refuses an export_dir it would overwrite (and a bad precision) before any training
        cfg = load_pretrain_config(config, set_ or [])
        _STOP["running"] = True  # SIGTERM as Ctrl-C: what to do next is said
        stats = run_pretrain(cfg, overwrite=overwrite)
    except ConfigError as e:
        _error(f"{e}")
        raise typer.Exit(2)
    except (DataError, DamagedFileError) as e:  # the corpus, a checkpoint: each names its file
        _error(f"{e}")
        raise typer.Exit(1)
    except OSError as e:
        _error(_os_error(e))
        raise typer.Exit(1)
    except KeyboardInterrupt:
        cause = _STOP["signal"] or "Ctrl-C"
        ck = Path(cfg.work_dir) / "checkpoint.pt" if cfg is not None else None
        where = (f"its last checkpoint, {ck}, is kept: the same command continues from it" if ck is not None and
                 ck.is_file() else "it stopped before its first checkpoint: the same command starts it again")
        _error(f"interrupted ({cause}): {where}")
        raise typer.Exit(143 if cause == "SIGTERM" else 130)
    print(f"held-out loss {stats['heldout_loss']:.4f}, perplexity {stats['heldout_perplexity']:.2f}; "
          f"model card: {cfg.export_dir}/README.md")


@app.command(context_settings={"allow_extra_args": True})
def flops(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="config.json, a model folder, builtin:<name>, a (cached) hub id, or "
                                               "a fedmoe run config (.yaml)")],
    seq_len: Annotated[Optional[int], typer.Option("--seq-len", help="tokens per sequence (default 128; a run "
                                                   "config: its eval.flops_seq_len)")] = None,
    k: Annotated[Optional[list[int]], typer.Option("--k", help="activated experts: --k 8 4 2 1 "
                                                    "(default: the model's k halved down to 1)")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="LoRA rank r (0 = no LoRA; default 0, a "
                                                     "run config: its lora.rank)")] = None,
    expert_lora_rank: Annotated[Optional[int], typer.Option("--expert-lora-rank",
                                                            help="expert LoRA rank (default: --lora-rank)")] = None,
    no_attention_lora: Annotated[bool, typer.Option("--no-attention-lora", help="LoRA on the experts only")] = False,
    attention_targets: Annotated[Optional[str], typer.Option(
        "--attention-targets", help="attention projections with LoRA, comma-separated: q_proj,k_proj,v_proj,o_proj "
                                    "(default: the architecture's set, as lora.attention_targets: null)")] = None,
    no_expert_lora: Annotated[bool, typer.Option("--no-expert-lora", help="LoRA on attention only")] = False,
    expert_layout: Annotated[Optional[str], typer.Option(
        "--expert-layout", help="expert LoRA layout (lora.expert_layout): fused (one pair on gate_up_proj, the "
                                "default) or split (gate, up, down)")] = None,
    router_lora: Annotated[Optional[bool], typer.Option("--router-lora/--no-router-lora",
                                                        help="LoRA on every router too (lora.router)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="a JSON list, one object per k")] = False,
):
    """Forward FLOPs per sequence and (trainable) parameter counts per k (FLAME Table 1 columns: P_a, P,
    P̂_a = active trainable, P̂ = total trainable).

    MODEL: a config.json, a folder holding one, builtin:<name>, a hub id (cached, when offline), or a fedmoe
    run config (.yaml): its model.name with its LoRA settings and eval.flops_seq_len, the figures its run
    reports (options given override them: the adapters its method builds with those settings; --expert-lora-rank
    and --lora-rank 0, which a run config has no key for, describe LoRA by hand).
    Example: fedmoe flops OLMoE-config.json --seq-len 128 --k 8 4 2 1 --lora-rank 20 [--json]
    FLAME's Table 1 layout: ... --lora-rank 20 --expert-layout split --router-lora
    """
    import json

    from .eval.flops import count_flops, default_k_list, format_flops_table, load_model_config

    # `--k 8 4 2 1`: click takes the first value for --k; the rest arrive as extra arguments (or, when
    # --k comes before MODEL, one of them lands in MODEL). Integers are k values, the one other word the model.
    words = [model, *ctx.args]
    ints = [w for w in words if w.lstrip("-").isdigit()]
    others = [w for w in words if not w.lstrip("-").isdigit()]
    if len(others) != 1:
        _error(f"expected one MODEL_OR_CONFIG, got {others or 'none'} (give --k values as integers: --k 8 4 2 1)")
        raise typer.Exit(2)
    if ints and not k:
        _error(f"unexpected extra arguments {ints} (did you mean --k {' '.join(ints)}?)")
        raise typer.Exit(2)
    ks = list(k or []) + [int(w) for w in ints]
    targets = None if attention_targets is None else [t.strip() for t in attention_targets.split(",") if t.strip()]
    source = others[0]
    is_run = source.endswith((".yaml", ".yml"))
    by_hand = (lora_rank, expert_lora_rank, attention_targets, expert_layout, router_lora) != (None,) * 5 or \
        no_attention_lora or no_expert_lora

    def counted(run_cfg=None):
        """(rows, title) of the model given, or of a run config's model (``run_cfg``): its adapters as its method
        builds them, or as the options describe them (each option not given: the config's value)."""
        name, r, r_exp, tgts, layout = source, lora_rank, expert_lora_rank, targets, expert_layout
        no_exp, no_attn, router, seq, exp_targets = no_expert_lora, no_attention_lora, router_lora, seq_len, None
        sets = []
        if run_cfg is not None and by_hand and lora_rank != 0 and expert_lora_rank is None:
            # options a run's config has keys for: counted as that run's method builds its adapters with them (FLEx
            # grafts an expert whatever the LoRA options say), not as the options alone describe LoRA
            sets = [*([f"lora.rank={lora_rank}"] if lora_rank is not None else []),
                    *([f"lora.attention_targets=[{','.join(targets)}]"] if targets else []),
                    *(["lora.attention_targets=[]"] if no_attention_lora else []),
                    *(["lora.experts=false"] if no_expert_lora else []),
                    *([f"lora.expert_layout={expert_layout}"] if expert_layout else []),
                    *([f"lora.router={str(router_lora).lower()}"] if router_lora is not None else [])]
            from .config import apply_overrides, config_from_tree, config_to_dict, unread_settings

            run_cfg = config_from_tree(apply_overrides(config_to_dict(run_cfg), sets), "the options given")
            unread = [(k, why) for k, why in unread_settings(run_cfg) if k.startswith("lora.")]
            if unread:
                raise ValueError("; ".join(f"{k}: {why}" for k, why in unread) + " (an option that would change "
                                 "nothing is refused)")
        if run_cfg is not None and (not by_hand or sets):
            # a fedmoe run config as it is: counted from the adapters its method builds (its summary's figures)
            from .algorithms import METHODS
            from .algorithms.base import method_flops

            rows = method_flops(run_cfg, METHODS[run_cfg.algorithm.name], ks or None, seq)
            mc = load_model_config(run_cfg.model.name)
            lora = f"the adapters {run_cfg.algorithm.name} builds" + (f" with {', '.join(sets)}" if sets else "")
            return rows, f"{run_cfg.model.name} ({mc.model_type}), {rows[0]['seq_len']} tokens, {lora}"
        if run_cfg is not None:  # a run config with adapters described by hand: its model, the options win
            lc = run_cfg.lora
            name = run_cfg.model.name
            r = lc.rank if r is None else r
            no_exp = no_exp or not lc.experts
            tgts = lc.attention_targets if attention_targets is None else tgts
            layout = layout or lc.expert_layout
            router = lc.router if router is None else router
            seq = run_cfg.eval.flops_seq_len if seq is None else seq
            exp_targets = tuple(lc.expert_targets)
        no_attn = no_attn or tgts == []
        r, layout, seq, router = r or 0, layout or "fused", 128 if seq is None else seq, bool(router)
        r_exp = r if r_exp is None else r_exp
        # an option that describes adapters of rank 0 would change nothing: refused, not ignored
        if r == 0 and targets:
            raise ValueError(f"--attention-targets {attention_targets}: attention LoRA takes the rank --lora-rank, "
                             "which is 0 here (no attention LoRA): give --lora-rank R, or leave --attention-targets out")
        if r == 0 and router_lora:
            raise ValueError("--router-lora: router LoRA takes the rank --lora-rank, which is 0 here (no LoRA): give "
                             "--lora-rank R, or leave --router-lora out")
        if r_exp == 0 and expert_layout is not None and not no_expert_lora:
            raise ValueError(f"--expert-layout {expert_layout}: the expert LoRA rank is 0 here (no expert LoRA): give "
                             "--lora-rank R or --expert-lora-rank R, or leave --expert-layout out")
        mc = load_model_config(name)
        rows = [count_flops(mc, seq, k=kk, lora_rank=r, expert_lora_rank=expert_lora_rank, expert_lora=not no_exp,
                            expert_lora_layout=layout, router_lora=router,
                            **({"expert_lora_targets": exp_targets} if exp_targets else {}),
                            attention_lora_targets=[] if no_attn else tgts) for kk in (ks or default_k_list(mc))]
        where = [] if no_exp or r_exp == 0 else [f"experts ({layout})"]
        if r and not no_attn:
            where.append(f"attention ({','.join(tgts) if tgts else 'default targets'})")
        if r and router:
            where.append("router")
        lora = ("no LoRA" if not where else
                f"LoRA r={r}" + ("" if r_exp == r else f" (experts r={r_exp})") + " on " + ", ".join(where))
        return rows, f"{name} ({mc.model_type}), {seq} tokens, {lora}"

    try:
        if no_attention_lora and targets:
            raise ValueError("give --attention-targets or --no-attention-lora, not both")
        if no_expert_lora and (expert_lora_rank is not None or expert_layout is not None):
            raise ValueError(f"--{'expert-lora-rank' if expert_lora_rank is not None else 'expert-layout'} describes "
                             "the expert LoRA, which --no-expert-lora leaves out: give one or the other")
        if is_run and _has_sweep(Path(source)):
            # a sweep: one table per distinct count, naming the points it covers (as `fedmoe plan` does)
            from .federation.sweep import expand_sweep

            groups: dict[str, tuple[list[dict], str, list[str]]] = {}
            for point, run_cfg in expand_sweep(source)[2]:
                rows, title = counted(run_cfg)
                key = json.dumps([rows, title], sort_keys=True, default=str)
                groups.setdefault(key, (rows, title, []))[2].append(point)
            tables = list(groups.values())
        else:
            from .config import load_config

            tables = [(*counted(load_config(source) if is_run else None), None)]
    except (ValueError, FileNotFoundError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    keys = ("k", "flops_per_seq", "flops_by_part", "active_params", "total_params", "active_trainable",
            "total_trainable")
    if as_json:
        def fields(r):  # a run config's rows also name their LoRA rank and clients
            return {key: r[key] for key in (*keys, "rank", "clients") if key in r}

        if tables[0][2] is None:
            print(json.dumps([fields(r) for r in tables[0][0]], indent=2))
        else:  # a sweep: one object per distinct count
            print(json.dumps([{"points": points, "rows": [fields(r) for r in rows]} for rows, _, points in tables],
                             indent=2))
        return
    for i, (rows, title, points) in enumerate(tables):
        if points is not None:
            print(("\n" if i else "") + f"sweep points {', '.join(points)}:")
        name = title if not is_run else f"{source}: {title}"
        print(format_flops_table(rows, title=name))
    print("\nFLOPs = 2 x multiply-accumulates of the forward pass of one sequence; attention scores over the "
          "full T x T square. P̂ = trainable (LoRA) parameters; P̂_a = the non-expert ones + k/E of the expert ones.")


@app.command(context_settings={"allow_extra_args": True})
def mmlu(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="builtin:<name>, a hub id, a local model folder, a model fedmoe export "
                                              "wrote, or a run directory (runs/<name>: its global model, or --client "
                                              "N's)")],
    subjects: Annotated[Optional[list[str]], typer.Option("--subjects", help="subjects: --subjects anatomy "
                                                          "virology (or comma-separated)")] = None,
    subset: Annotated[Optional[str], typer.Option("--subset", help="a named selection: quick (10 subjects) "
                                                  "or all")] = None,
    max_per_subject: Annotated[Optional[int], typer.Option("--max-per-subject", help="first N test "
                                                           "questions of each subject")] = None,
    k_shot: Annotated[int, typer.Option("--k-shot", help="dev examples in the prompt (0..5)")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="prompt token limit (default: "
                                                      "the model's max_position_embeddings, else 2048)")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: float32; a "
                                                 "run directory or a fedmoe export folder: its run's model.dtype)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    client: Annotated[Optional[int], typer.Option("--client", help="a run directory: this client's own model "
                                                  "(default: the global model)")] = None,
    private: Annotated[Optional[Path], typer.Option("--private", help="a run directory of a Flower run: the "
                                                    "client's private store")] = None,
    round_: Annotated[Optional[int], typer.Option(
        "--round", help="a run directory: the model after this round (one of its two checkpoints; default: the "
                        "finished run's last)")] = None,
):
    """MMLU k-shot accuracy (bundled 57-subject test set): per-subject table, macro and micro average.

    MODEL may be a run directory: its global model (or --client N's), loaded as `fedmoe export` and `fedmoe
    generate` load it (the quantized base of a quantized run), with the run's prompt limit (4 x data.max_length)
    unless --max-length is given: the figure the run reports with eval.mmlu.
    Example: fedmoe mmlu builtin:tiny-olmoe --subset quick --max-per-subject 20 [--json]
    """
    import json

    if quiet:
        _no_library_bars()

    from rich.console import Console

    from rich.progress import Progress

    from .eval.mmlu import MMLU_SUBJECTS, evaluate_mmlu, format_mmlu_table, load_mmlu, resolve_subjects

    err = Console(stderr=True)
    # `--subjects a b c`: click takes `a` for --subjects; the rest arrive as extra arguments (or, when
    # --subjects comes before MODEL, one of them lands in MODEL). Subject names are subjects, the one
    # other word the model.
    words = [model, *ctx.args]
    extra = [w for w in words if w in MMLU_SUBJECTS]
    others = [w for w in words if w not in MMLU_SUBJECTS]
    if len(others) != 1:
        _error(f"expected one MODEL, got {others or 'none'}")
        raise typer.Exit(2)
    if extra and not subjects:
        _error(f"unexpected extra arguments {extra} (did you mean --subjects {' '.join(extra)}?)")
        raise typer.Exit(2)
    names = [n for s in (subjects or []) for n in s.split(",") if n] + extra
    try:
        if names and subset:
            raise ValueError("give --subjects or --subset, not both")
        selected = resolve_subjects(names or subset)
        if max_per_subject is not None and max_per_subject < 1:
            raise ValueError("--max-per-subject must be >= 1")
        if not 0 <= k_shot <= 5:
            raise ValueError("--k-shot must be in 0..5")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length must be at least 1 token, got {max_length}")
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {dtype}: use float32, bfloat16 or float16")
        from .moe.model import check_device

        check_device(device, "--device")
    except ValueError as e:
        _error(f"{e}")
        raise typer.Exit(2)

    from .export import load_model, load_run_model
    from .moe.arch import UnsupportedModelError
    from .moe.model import load_tokenizer
    from .rundir import RunDir, run_dir_problem, sweep_points_in

    source = others[0]
    # a run directory (its config.yaml; a model folder holds a config.json) or a sweep's folder of them
    is_run = (Path(source) / RunDir.CONFIG).is_file() and not (Path(source) / "config.json").is_file()
    if sweep_points_in(source) is not None:
        _error(run_dir_problem(source, "mmlu"))
        raise typer.Exit(2)
    if not is_run and (client, private, round_) != (None, None, None):
        _error(f"{source} is not a run directory: --client, --private and --round choose a model of a run directory "
               "(runs/<name>); leave them out")
        raise typer.Exit(2)
    try:
        if is_run:
            loaded = load_run_model(source, client, private, round_, verb="evaluate", dtype=dtype, device=device)
            lm, source = loaded.mm.model, loaded.source
            tokenizer = load_tokenizer(loaded.cfg.model.tokenizer or loaded.cfg.model.name)
            if max_length is None:  # the limit the run's own MMLU evaluation takes (federation.evaluation)
                from .eval.mmlu import run_prompt_limit

                max_length = run_prompt_limit(lm.config, loaded.cfg.data.max_length)
        else:
            lm = load_model(source, dtype=dtype, device=device).model  # an export: its run's dtype
            tokenizer = load_tokenizer(source)
    except (UnsupportedModelError, OSError, ValueError, KeyError) as e:
        _error(f"cannot load {others[0]}: {e}")
        raise typer.Exit(2)

    total = sum(len(qs[:max_per_subject]) for qs in load_mmlu("test", selected).values())
    with Progress(console=err, transient=True, disable=quiet) as bar:
        task = bar.add_task(f"MMLU {k_shot}-shot, {len(selected)} subjects", total=total)
        result = evaluate_mmlu(lm, tokenizer, subjects=selected, max_per_subject=max_per_subject, k_shot=k_shot,
                               batch_size=batch_size, max_length=max_length,
                               progress=lambda n: bar.advance(task, n))
    if as_json:
        out = {k: v for k, v in result.items() if k != "per_subject"}
        out["model"] = others[0]
        if is_run:
            out["source"] = source
        out["per_subject"] = {s: {"correct": c, "total": t, "accuracy": a}
                              for s, (c, t, a) in result["per_subject"].items()}
        print(json.dumps(out, indent=2))
        return
    print(f"MMLU {k_shot}-shot, {source}")
    print(format_mmlu_table(result))
    cut = [f"{n} {what}" for n, what in ((result["truncated"], "prompts lost shots"),
                                         (result["questions_cut"], "lost the start of the question itself"))
           if n]
    if cut:
        print(f"({'; '.join(cut)} to fit {result['max_length']} tokens)")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="run directories (runs/<name>), finished or not, or a sweep's "
                                                    "folder (its finished points)")],
    out: Annotated[Path, typer.Option("--out", help="folder for compare.md and compare.png")] = Path("compare"),
):
    """Several runs side by side: one table (method, rounds, global and client results, bytes, wall time)
    and their learning curves overlaid in one PNG. A sweep's folder (runs/<sweep name>) stands for its finished
    points; the same run given twice is refused."""
    from .report.compare import compare_runs

    try:
        table, png = compare_runs(runs, out, log=lambda m: print(f"note: {m}"))
    except (FileNotFoundError, ValueError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    except OSError as e:
        _error(_os_error(e))
        raise typer.Exit(2)
    print(table)
    print(f"\ntable: {out / 'compare.md'}" + (f"\ncurves: {png}" if png else "\n(no curves: no losses logged yet)"))


def _which(client: Optional[int], global_: bool) -> Optional[int]:
    if client is not None and global_:
        _error(f"--client {client} and --global name two models: give one of them (the global model is the default)")
        raise typer.Exit(2)
    return None if global_ else client


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (runs/<name>)")],
    out: Annotated[Path, typer.Argument(help="a new folder to write")],
    client: Annotated[Optional[int], typer.Option("--client", help="this client's own model")] = None,
    global_: Annotated[bool, typer.Option("--global", help="the global model (the default)")] = False,
    merged: Annotated[bool, typer.Option("--merged", help="a plain Hugging Face model with the LoRA folded in")] = False,
    format_: Annotated[Optional[str], typer.Option(
        "--format", help="peft (default), merged (= --merged), vllm (per-expert LoRA keys that serving "
                         "engines load) or fedmoe (the model as the run evaluated it, a quantized base included)")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="refuse (exit 2, nothing written) where the form asked for cannot express the model, rather "
                         "than write a fedmoe folder")] = False,
    private: Annotated[Optional[Path], typer.Option(
        "--private", help="Flower runs: the client's store: its SuperNode's state-dir (the run's folder in it is "
                          "found), that folder, or a private-r*.pt file")] = None,
    round_: Annotated[Optional[int], typer.Option(
        "--round", help="the model after this round (one of the run's two checkpoints), on purpose: needed for a run "
                        "that did not finish, or whose last checkpoint is damaged (default: the finished run's last)")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="load the model on auto, cpu, cuda, cuda:1, ... (default: the run's model.device)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars (transformers' loading and writing)")] = False,
):
    """Export a trained model: a PEFT adapter (default), a merged Hugging Face model (--merged), or,
    where neither can express the model, a fedmoe folder that fedmoe.export.load_model restores exactly.
    Ctrl-C or SIGTERM midway leaves nothing of the export behind."""
    from .config import ConfigError
    from .export import export_model

    if quiet:
        _no_library_bars()

    exported: dict = {}
    try:
        if device is not None:
            from .moe.model import check_device

            check_device(device, "--device")
        _STOP["running"] = True  # SIGTERM as Ctrl-C: the export's own clean-up runs (a half-written OUT loads)
        form, why = export_model(run_dir, out, client=_which(client, global_), merged=merged, private_path=private,
                                 form=format_, round_idx=round_, exported=exported, device=device, strict=strict)
    except KeyboardInterrupt:
        cause = _STOP["signal"] or "Ctrl-C"
        _error(f"stopped ({cause}): nothing of the export was left in {out}")
        raise typer.Exit(143 if cause == "SIGTERM" else 130)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    except OSError as e:
        _error(_os_error(e))
        raise typer.Exit(2)
    text = {"peft": "a PEFT adapter: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=..), OUT)",
            "merged": "a merged Hugging Face model: AutoModelForCausalLM.from_pretrained(OUT)",
            "vllm": "a LoRA adapter with per-expert keys (vLLM: LLM(base, enable_lora=True) + LoRARequest(.., OUT))",
            "fedmoe": "a fedmoe model folder: fedmoe.export.load_model(OUT)"}[form]
    print(f"{exported['source']} -> {out}: {text}")
    for note in exported.get("notes", []) if not why else []:
        print(f"note: {note}")
    if why:
        asked = format_ or ("merged" if merged else "peft")
        fit = exported.get("fits") or []
        print(f"not {asked}, because: " + "; ".join(why) + ". "
              + (f"It has a {' and a '.join(fit)} form (--format {fit[0]})" if fit else
                 "Only a fedmoe folder holds it") + " (--strict refuses instead of writing a fedmoe folder)")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (runs/<name>), or a model fedmoe export wrote "
                                                 "(a merged model or a fedmoe folder)")],
    prompt: Annotated[Optional[str], typer.Argument(help="an instruction (none: read instructions from stdin, "
                                                         "one per line, until an empty line or end of input)")] = None,
    client: Annotated[Optional[int], typer.Option("--client", help="this client's own model")] = None,
    global_: Annotated[bool, typer.Option("--global", help="the global model (the default)")] = False,
    context: Annotated[str, typer.Option("--input", help="the instruction's input (context), if any")] = "",
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", help="the most tokens an answer may have: at least 1 (0 is refused; default: the run's "
                                 "eval.max_new_tokens)")] = None,
    private: Annotated[Optional[Path], typer.Option("--private", help="Flower runs: the client's private store")] = None,
    round_: Annotated[Optional[int], typer.Option(
        "--round", help="the model after this round (one of the run's two checkpoints), on purpose: needed for a run "
                        "that did not finish, or whose last checkpoint is damaged (default: the finished run's last)")] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="load the model on auto, cpu, cuda, cuda:1, ... (default: the run's model.device)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar (transformers' loading of a model folder)")] = False,
):
    """Answer instructions with a client's (or the global) model of a run, or with an exported model, in
    the training prompt template, decoded as the run's evaluation decodes."""
    import sys

    if quiet:
        _no_library_bars()

    from rich.console import Console

    from .config import ConfigError
    from .export import answer, load_for_answers

    err = Console(stderr=True)
    if prompt is None and context:
        _error("--input is the context of the one instruction given as PROMPT; instructions read from stdin (no PROMPT) "
               "take none: give the instruction as an argument with --input, or leave --input out")
        raise typer.Exit(2)
    if max_new_tokens is not None and max_new_tokens < 1:
        _error(f"--max-new-tokens must be at least 1, got {max_new_tokens} (leave it out for the run's "
               "eval.max_new_tokens)")
        raise typer.Exit(2)
    for what, text in (("the instruction", prompt), ("--input", context)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:  # an argument of bytes that are not UTF-8 (Python keeps them as surrogates)
            _error(f"{what} is not UTF-8 text: give it in UTF-8 (convert with iconv -f <its encoding> -t UTF-8)")
            raise typer.Exit(2)
    try:
        if device is not None:
            from .moe.model import check_device

            check_device(device, "--device")
        loaded = load_for_answers(run_dir, _which(client, global_), private, round_, device)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        _error(f"{e}")
        raise typer.Exit(2)
    if prompt is not None:
        print(answer(loaded, prompt, context, max_new_tokens))
        return
    err.print(f"{loaded.source}; one instruction per line, an empty line ends")
    for lineno, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _error(f"stdin line {lineno} is not UTF-8 text (byte {e.start} is 0x{raw[e.start]:02x}): give the "
                   "instructions in UTF-8 (convert with iconv -f <their encoding> -t UTF-8)")
            raise typer.Exit(2)
        if not line.strip():
            break
        print(answer(loaded, line.strip(), "", max_new_tokens), flush=True)


def main():
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # noise a command's user cannot act on: bitsandbytes' import (through PEFT) warns that an optional CPU matmul
    # kernel fedmoe never calls is missing; PEFT asks transformers a question under its deprecated name
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    main()
