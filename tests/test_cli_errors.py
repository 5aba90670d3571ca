"""What a user sees when something expected goes wrong: one line on stderr with the cause and what to
do, exit status 2 (130 after Ctrl-C), never a traceback. Each case runs the real CLI: most in this process
(typer's runner: the command's exit status and its stderr, without an interpreter start per command), and
in a subprocess where the process itself is under test (`python -m fedmoe.cli`, Ctrl-C) — at least once per
kind of command, so the module entry point's exit status and stderr are checked as a shell sees them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.eval import count_flops, load_model_config
from fedmoe.federation import run_federated
from fedmoe.moe.model import builtin_model_path
from helpers import cli, interruptible

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.name=builtin:tiny-olmoe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2",
        "train.max_steps=1", "train.batch_size=2", "eval.rouge=false", "eval.batch_size=4", "data.max_test_per_client=3",
        "lora.rank=4", "federation.rounds=1"]


def _sets(sets):
    return [x for a in sets for x in ("--set", a)]


def fedmoe_process(*args, cwd, env=None):
    """``python -m fedmoe.cli ARGS`` in a subprocess started in ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fedmoe.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def fedmoe(*args, cwd):
    """``fedmoe ARGS`` in this process (:func:`cli`), run from ``cwd``."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return cli(*args)
    finally:
        os.chdir(here)


def error_line(r, code=2) -> str:
    """The one ``error:`` line of a failed command (and no traceback)."""
    out = r.stdout + r.stderr
    assert r.returncode == code, out[-3000:]
    assert "Traceback" not in out and "╭" not in out, out[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    return line


def test_hub_id_while_offline(tmp_path):
    r = fedmoe_process("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'runs'}", "model.name=someone/not-a-model"]),
               cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    line = error_line(r)
    assert "model.name" in line and "'someone/not-a-model'" in line
    assert "HF_HUB_OFFLINE" in line and "local model folder" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_corrupt_or_truncated_safetensors(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(builtin_model_path("builtin:tiny-moe"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    r = fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'runs'}", f"model.name={model}"]), cwd=tmp_path)
    line = error_line(r)
    assert f"corrupt or truncated weights file {weights}" in line and "download or export the model again" in line
    weights.write_bytes(b"\x00" * 64)  # not safetensors at all
    r = fedmoe("mmlu", model, "--subjects", "anatomy", "--max-per-subject", "1", cwd=tmp_path)
    line = error_line(r)
    assert f"cannot load {model}" in line and f"corrupt or truncated weights file {weights}" in line


def test_corrupt_or_empty_checkpoint(tmp_path):
    cfg = load_config(None, TINY + ["federation.rounds=2", f"output_dir={tmp_path}", "name=ck"])
    _, rd = run_federated(cfg, stop_after_round=1, log=lambda *a: None)
    folder = rd.path / "checkpoints"
    latest, prev = folder / "state.pt", folder / "state.prev.pt"
    assert torch.load(prev, weights_only=False)["round"] == 0  # the zero-shot round's
    saved = latest.read_bytes(), prev.read_bytes()
    # both unreadable: no way to resume, and the message says how to start over
    latest.write_bytes(b"")
    prev.write_bytes(b"not a checkpoint")
    r = fedmoe("run", "--quiet", "--resume", rd.path, cwd=tmp_path)
    line = error_line(r)
    assert f"{rd.path} has no readable checkpoint" in line and f"{latest} is unreadable" in line
    assert f"fedmoe run {rd.path / 'config.yaml'} --overwrite" in line
    # ... which works
    r = fedmoe("run", "--quiet", rd.path / "config.yaml", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rd.summary_path.is_file() and not (tmp_path / "ck-2").exists()
    # an empty latest checkpoint: resumed from the previous one, with a warning that says so
    rd.summary_path.unlink()
    latest.write_bytes(b"")
    prev.write_bytes(saved[1])
    r = fedmoe("run", "--quiet", "--resume", rd.path, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: {latest} is unreadable" in r.stdout and f"falling back to the previous checkpoint {prev} (round 0)" in r.stdout
    assert rd.summary_path.is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={ro}"]), cwd=tmp_path)
    finally:
        ro.chmod(0o755)
    line = error_line(r)
    assert f"cannot write the run directory {ro / 'fedit'}" in line and "Permission denied" in line
    assert "--set output_dir=" in line


def test_output_directory_that_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'afile'}"]), cwd=tmp_path)
    line = error_line(r)
    assert f"cannot write the run directory {tmp_path / 'afile' / 'fedit'}" in line and "Not a directory" in line
    assert "--set output_dir=" in line
    # and a run name that is a file
    r = fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path}", "name=afile"]), cwd=tmp_path)
    line = error_line(r)
    assert f"{tmp_path / 'afile'} exists and is not a directory" in line and "--set name=" in line


def test_mmlu_batch_size_zero(tmp_path):
    r = fedmoe_process("mmlu", "builtin:tiny-olmoe", "--subjects", "anatomy", "--batch-size", "0", cwd=tmp_path)
    assert "--batch-size must be at least 1, got 0" in error_line(r)


@pytest.mark.processes
@pytest.mark.parametrize("sig, code, cause", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_sigint_during_a_run_says_where_the_checkpoint_is(tmp_path, sig, code, cause):
    """Ctrl-C, or the SIGTERM a batch scheduler or `kill` sends, stops a run with its lock released and one line
    saying where its checkpoint is and how to resume (exit 130, 143); SIGTERM had killed it silently, the lock left."""
    sets = TINY + ["federation.rounds=200", f"output_dir={tmp_path}", "name=int"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # a test runner started in the background ignores SIGINT, and so would the child (once seen in a full-suite run)
    proc = subprocess.Popen([sys.executable, "-m", "fedmoe.cli", "run", "--quiet", *_sets(sets)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    run = tmp_path / "int"
    deadline = time.time() + 300
    while not (run / "checkpoints" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err
    [line] = [x for x in err.splitlines() if x.startswith("interrupted:")]
    assert f"stopped ({cause}): the last checkpoint is in {run / 'checkpoints'}" in line
    assert f"`fedmoe run --resume {run}`" in line
    assert not (run / "run.lock").exists() and not (run / "summary.json").exists()


def test_binary_config_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(range(256)) * 4)
    r = fedmoe_process("run", path, cwd=tmp_path)
    line = error_line(r)
    assert f"{path} is not a text (UTF-8) file" in line and "YAML config" in line


def test_max_length_above_the_models_context(tmp_path):
    r = fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'runs'}", "data.max_length=2048"]),
               cwd=tmp_path)
    line = error_line(r)
    assert "data.max_length = 2048" in line and "max_position_embeddings = 1024" in line
    assert "at most 1024" in line and not (tmp_path / "runs").exists()


def test_flops_of_a_run_config_as_the_readme_shows(tmp_path):
    assert "fedmoe flops configs/" in (ROOT / "README.md").read_text()
    default = ROOT / "configs" / "default.yaml"
    r = fedmoe_process("flops", default, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    cfg = load_config(default)
    mc, lc = load_model_config(cfg.model.name), cfg.lora
    assert [row["k"] for row in rows] == [4, 2, 1]
    for row in rows:
        want = count_flops(mc, cfg.eval.flops_seq_len, k=row["k"], lora_rank=lc.rank, expert_lora=lc.experts,
                           attention_lora_targets=lc.attention_targets, expert_lora_layout=lc.expert_layout,
                           router_lora=lc.router)
        assert row["flops_per_seq"] == want["flops_per_seq"] and row["total_trainable"] == want["total_trainable"]
    # FLEx at its defaults: its attention LoRA and grafts (the hand count of tests/test_inventory.py), not the
    # expert LoRA a config-only count would assume
    flex = tmp_path / "flex.yaml"
    flex.write_text("model: {name: 'builtin:tiny-olmoe'}\nalgorithm: {name: flex}\n")
    r = fedmoe("flops", flex, "--json", "--k", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [(row["k"], row["total_trainable"], row["active_trainable"]) for row in json.loads(r.stdout)] == [(2, 57_856, 57_856)]
    # each k one of the run's clients runs at is a row naming its clients (FLAME's k = 3 was missing: rows were the
    # model's k halved)
    flame = tmp_path / "flame.yaml"
    flame.write_text("model: {name: 'builtin:tiny-moe'}\nalgorithm: {name: flame, budgets: {top_k: [4, 3, 2, 1]}}\n")
    r = fedmoe("flops", flame, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [(row["k"], row["rank"], row["clients"]) for row in json.loads(r.stdout)] == [
        (4, 8, [0]), (3, 8, [1]), (2, 8, [2]), (1, 8, [3])]
    # an option given overrides the config's value; the table names the config's model
    r = fedmoe("flops", default, "--lora-rank", "0", "--k", "4", cwd=tmp_path)
    assert r.returncode == 0 and f"{default}: builtin:tiny-moe (olmoe)" in r.stdout and "no LoRA" in r.stdout
    # options the config has keys for count the adapters the run's method builds with them: FLEx's grafted experts
    # (their FFN and gate) were left out, the options describing LoRA alone
    from fedmoe.algorithms import METHODS
    from fedmoe.algorithms.base import method_flops

    flex = tmp_path / "flex.yaml"
    flex.write_text("model: {name: 'builtin:tiny-moe'}\nalgorithm: {name: flex}\nlora: {experts: false}\n")
    r = fedmoe("flops", flex, "--lora-rank", "4", "--k", "4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = method_flops(load_config(flex, ["lora.rank=4"]), METHODS["flex"], [4])
    assert [(row["total_trainable"], row["flops_per_seq"]) for row in json.loads(r.stdout)] == \
        [(row["total_trainable"], row["flops_per_seq"]) for row in want]
    r = fedmoe("flops", flex, "--lora-rank", "4", "--k", "4", cwd=tmp_path)
    assert "the adapters flex builds with lora.rank=4" in r.stdout
    r = fedmoe("flops", tmp_path / "missing.yaml", cwd=tmp_path)
    assert "config file not found" in error_line(r)


# ------------------------------------------------- export, generate, compare and DP settings (issue 26)
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One finished one-round run, shared by the tests below (which only read it or copy its files)."""
    cfg = load_config(None, TINY + [f"output_dir={tmp_path_factory.mktemp('runs')}", "name=tiny"])
    _, rd = run_federated(cfg, log=lambda *a: None)
    return rd.path


def test_export_into_a_file(tiny_run, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = error_line(fedmoe_process("export", tiny_run, afile, cwd=tmp_path))  # one real command line
    assert f"{afile} exists and is a file, not a folder" in line and "give a new folder to export into" in line
    line = error_line(cli("export", tiny_run, afile / "sub"))
    assert f"cannot create the folder {afile / 'sub'}: {afile} is a file, not a folder" in line
    assert afile.read_text() == "x"


def test_export_into_a_read_only_folder(tiny_run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user writes into read-only directories (root)")
        r = cli("export", tiny_run, ro)
    finally:
        ro.chmod(0o755)
    line = error_line(r)
    assert f"cannot write into {ro} (Permission denied)" in line and "choose a folder you may write" in line
    assert f"chmod u+w {ro}" in line and not any(ro.iterdir())


def test_generate_bad_input(tiny_run, tmp_path):
    import typer

    from fedmoe.cli import app

    for n in (-5, 0):  # refused before the model loads; 0 is not "the default"
        line = error_line(cli("generate", tiny_run, "hi", "--max-new-tokens", n))
        assert f"--max-new-tokens must be at least 1, got {n}" in line
        assert "leave it out for the run's eval.max_new_tokens" in line
    [option] = [p for p in typer.main.get_command(app).commands["generate"].params if p.name == "max_new_tokens"]
    assert "at least 1 (0 is refused" in option.help
    r = cli("generate", tiny_run, "--max-new-tokens", "1", stdin=b"Say hello.\nsay \xff\xfe hello\n")
    line = error_line(r)
    assert "stdin line 2 is not UTF-8 text (byte 4 is 0xff)" in line and "give the instructions in UTF-8" in line
    assert len(r.stdout.splitlines()) == 1  # line 1 was answered


def test_compare_damaged_runs(tiny_run, tmp_path):
    def damaged(name, file, content: bytes, drop_summary=False):
        run = tmp_path / name
        run.mkdir()
        for f in ("config.yaml", "metrics.jsonl", "summary.json"):
            if not (drop_summary and f == "summary.json"):
                shutil.copy(tiny_run / f, run / f)
        (run / file).write_bytes(content)
        return run

    def compare(run, out=tmp_path / "out"):
        return error_line(cli("compare", tiny_run, run, "--out", out))

    metrics = (tiny_run / "metrics.jsonl").read_bytes()
    n = len(metrics.splitlines())
    summary = (tiny_run / "summary.json").read_bytes()
    leave_out = "restore it or leave this run out of the comparison"
    run = damaged("badyaml", "config.yaml", b"model: {name: [1, 2\n")
    line = compare(run)
    assert f"{run / 'config.yaml'}: line 2, column 1 is not valid YAML" in line and leave_out in line
    run = damaged("listyaml", "config.yaml", b"- model\n- data\n")
    line = compare(run)
    assert f"{run / 'config.yaml'}: the top level is list, not the mapping of sections" in line and leave_out in line
    run = damaged("noround", "metrics.jsonl", metrics + b'{"kind": "round"}\n', drop_summary=True)
    line = compare(run)
    assert f'{run / "metrics.jsonl"}: line {n + 1} has no "round"' in line and "repair or delete that line" in line
    run = damaged("xround", "metrics.jsonl", metrics + b'{"kind": "round", "round": "x"}\n')
    line = compare(run)
    assert f'{run / "metrics.jsonl"}: line {n + 1} has "round": "x", not a whole number' in line
    assert "repair or delete that line" in line
    run = damaged("truncated", "summary.json", summary[:len(summary) // 2])
    line = compare(run)
    assert f"{run / 'summary.json'} is not valid JSON" in line and "truncated or damaged" in line
    assert "move it away to compare the run as unfinished" in line
    run = damaged("xloss", "metrics.jsonl", metrics + b'{"kind": "test", "round": 1, "loss": "x"}\n')
    line = compare(run)
    assert f'{run / "metrics.jsonl"}: line {n + 1} has "loss": "x", not a number or null' in line
    # a summary edited by hand: each reader's number checked (a string made a traceback; a client's entry without
    # its loss left the mean to the other client, unsaid)
    move = "move it away to compare the run as unfinished"
    for name, edit, says in (
            ("strloss", lambda t: t["clients"][0].update(loss="abc"), 'has client 0\'s "loss": "abc", not a number'),
            ("nowall", lambda t: t.pop("wall_s"), 'has "wall_s": null, not a number'),
            ("bare", lambda t: t["clients"].__setitem__(0, {"id": 0}), 'has client 0 without "loss"'),
            ("noclient", lambda t: t["clients"].pop(0), "has clients with ids [1], not 0, 1, ... in order"),
            ("strrouge", lambda t: t["global"].update(rouge_l="high"), 'has the global "rouge_l": "high"')):
        edited = json.loads(summary)
        edit(edited)
        run = damaged(name, "summary.json", json.dumps(edited).encode())
        line = compare(run)
        assert f"{run / 'summary.json'} {says}" in line and "edited or damaged" in line and move in line, line
    run = damaged("binary", "metrics.jsonl", metrics + b'{"kind": "\xff"}\n')
    line = compare(run)
    assert f"{run / 'metrics.jsonl'} is not UTF-8 text (byte {len(metrics) + 10} is 0xff)" in line and leave_out in line
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = error_line(fedmoe_process("compare", tiny_run, "--out", afile, cwd=tmp_path))  # one real command line
    assert f"--out {afile} is a file, not a folder" in line and afile.read_text() == "x"
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_dp_settings_out_of_range(tmp_path):
    from fedmoe.federation.dp import epsilon

    def run(*sets):
        return cli("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'runs'}", *sets]))

    r = run("federation.dp.clip_norm=.inf", "federation.dp.noise_multiplier=1")
    error_line(r)
    assert "federation.dp.clip_norm: the L2 norm every client update is clipped to: give a finite number in " \
           "(0, 1e6]" in r.stderr
    r = run("federation.dp.clip_norm=1", "federation.dp.noise_multiplier=1e300")
    error_line(r)
    assert "federation.dp.noise_multiplier: σ, the noise std in units of clip_norm: give a finite number in " \
           "[0, 1e6]" in r.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    assert load_config(None, ["federation.dp.clip_norm=1e6", "federation.dp.noise_multiplier=1e6"]).federation.dp
    # the accountant overflows past σ ≈ 1e154: ε from the closed-form (zCDP) bound instead, never an exception
    assert 0 <= epsilon(1e155, 10, 1e-5) < 1e-150 and epsilon(1e300, 10, 1e-5) == 0


def test_resume_with_a_set_that_would_make_another_run(tiny_run, tmp_path):
    """`fedmoe run --resume DIR --set KEY=V` takes only what may change on resume; another key is one
    error line naming it (nothing written), as are --runtime and a config."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "config.yaml").read_text()
    line = error_line(cli("run", "--resume", run, "--set", "lora.rank=8"))
    assert "--resume --set lora.rank: a resumed run continues the run it checkpointed" in line
    assert "train.activation_checkpointing" in line and "start a new run" in line
    line = error_line(cli("run", "--resume", run, "--runtime", "flower-sim"))
    assert "do not pass a config, --runtime or --overwrite" in line and "--set only for" in line
    assert (run / "config.yaml").read_text() == before


def test_a_dense_model_or_a_missing_device_is_refused_before_anything_is_written(tmp_path):
    """A model that is not an MoE (run and plan), a device string that is none, a CUDA device this machine
    lacks (run, mmlu), a run directory that does not exist (migrate-checkpoint): one line each, exit 2, and a
    run leaves no directory behind."""
    from transformers import LlamaConfig

    dense = tmp_path / "dense"
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(dense)
    runs = tmp_path / "runs"
    for args in (("run", "--quiet", *_sets(TINY + [f"output_dir={runs}", f"model.name={dense}"])),
                 ("plan", *_sets([f"model.name={dense}"]))):
        line = error_line(fedmoe(*args, cwd=tmp_path))
        assert "'llama' is not a supported MoE architecture" in line and "olmoe" in line
    assert "model.device: 'cuda:x' is not a device: use auto, cpu, cuda or cuda:N" in fedmoe_process(
        "plan", "--device", "cuda:x", cwd=tmp_path).stderr
    if not torch.cuda.is_available():
        line = error_line(fedmoe("run", "--quiet", *_sets(TINY + [f"output_dir={runs}", "model.device=cuda"]),
                                 cwd=tmp_path))
        assert "model.device = cuda, but this machine has no CUDA device" in line and "auto or cpu" in line
        line = error_line(fedmoe("mmlu", "builtin:tiny-moe", "--device", "cuda", "--subset", "quick", cwd=tmp_path))
        assert "--device = cuda, but this machine has no CUDA device" in line
    # train.aux_loss on a family that ships no load-balancing loss (DeepSeek-V2): refused by run and plan alike
    # before anything is loaded or written, not after the zero-shot evaluation and the first checkpoint
    from transformers import DeepseekV2Config

    ds = tmp_path / "ds"
    DeepseekV2Config(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=0,
                     kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4
                     ).save_pretrained(ds)
    aux = [f"model.name={ds}", "model.tokenizer=builtin:tiny-moe", "train.aux_loss=true"]
    for args in (("run", "--quiet", *_sets(TINY + [f"output_dir={runs}", *aux])), ("plan", *_sets(aux))):
        line = error_line(fedmoe(*args, cwd=tmp_path))
        assert "train.aux_loss: true, but deepseek_v2 has no load-balancing loss" in line, line
        assert "set train.aux_loss: false" in line
    assert not runs.exists()
    line = error_line(fedmoe_process("migrate-checkpoint", tmp_path / "nope", cwd=tmp_path))
    assert f"{tmp_path / 'nope'} does not exist: give the directory of a run" in line


def test_plan_of_a_sweep_plans_each_distinct_setting(tmp_path):
    """flame-table2's 8 points (4 methods x 2 Dirichlet alphas) are 4 plans: alpha changes no memory."""
    r = fedmoe("plan", ROOT / "configs" / "flame-table2.yaml", *_sets(["data.max_length=16", "train.batch_size=2"]),
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    heads = [x for x in r.stdout.splitlines() if x.startswith("sweep points ")]
    assert len(heads) == 4 and all("alpha=5.0" in h and "alpha=0.5" in h for h in heads)
    assert sum(x.startswith("memory plan of one training step") for x in r.stdout.splitlines()) == 4
    assert "| 1 | 3 |" in r.stdout  # FLAME's k = 1 level, client 3


def test_plan_of_a_sweep_keeps_apart_points_whose_seed_draws_other_levels(tmp_path):
    """With budgets assigned by a distribution, the seed decides which k levels the clients run at (and the
    peak): points of different seeds share a plan only where they draw the same levels for the same clients."""
    from fedmoe.algorithms import get_method
    from fedmoe.federation.sweep import expand_sweep
    from fedmoe.plan import _levels, distinct_plans

    p = tmp_path / "s.yaml"
    p.write_text("model: {name: builtin:tiny-moe}\ndata: {partition: {scheme: iid, num_clients: 2}}\n"
                 "algorithm: {name: flame, budgets: {assign: distribution, probs: [0.5, 0.5, 0.0, 0.0]}}\n"
                 "sweep: {seed: [0, 1, 2, 3, 4, 5]}\n")
    points = expand_sweep(p)[2]
    groups = distinct_plans(points)
    levels = {point: _levels(cfg, get_method("flame"), 4) for point, cfg in points}
    assert len({str(v) for v in levels.values()}) > 1  # the seed matters here: the test is not vacuous
    assert sorted(q for _, ps in groups for q in ps) == sorted(levels)
    for cfg, ps in groups:
        assert len({str(levels[q]) for q in ps}) == 1  # one plan only for points with the same levels
    assert len(groups) == len({str(v) for v in levels.values()})


# ------------------------------------------------- the CLI's new-user review: flags, sweeps, quoting, circles
def _unfinished_copy(tiny_run, dest: Path) -> Path:
    """``tiny_run`` copied to ``dest`` without its summary.json: a run with a checkpoint that did not finish."""
    shutil.copytree(tiny_run, dest)
    (dest / "summary.json").unlink()
    return dest


def test_flag_combinations_that_would_be_ignored_are_refused(tiny_run, tmp_path):
    """A flag that would change nothing in this combination is refused, naming the combination meant, before
    anything is loaded or written: --federation without --runtime flower (a new run, a resume, a sweep), --jobs with
    --resume, --merged with another --format, --private for the global model, --client with --global, --input
    without an instruction, flops options that describe adapters of rank 0, mmlu's run options on a model."""
    runs = tmp_path / "runs"
    line = error_line(cli("run", "--quiet", "--federation", "lab", *_sets(TINY + [f"output_dir={runs}"])))
    assert "--federation lab names the SuperLink of a Flower deployment (--runtime flower)" in line
    assert "federation.runtime is local" in line and "add --runtime flower" in line
    line = error_line(cli("run", "--quiet", "--runtime", "flower-sim", "--federation", "lab",
                          *_sets(TINY + [f"output_dir={runs}"])))
    assert "federation.runtime is flower-sim" in line
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"output_dir: {runs}\nsweep: {{seed: [0, 1]}}\n")
    line = error_line(cli("run", "--quiet", sweep, "--federation", "lab", *_sets(TINY)))
    assert "--federation lab names the SuperLink" in line
    assert not runs.exists()  # none of them started
    unfinished = _unfinished_copy(tiny_run, tmp_path / "unfinished")
    line = error_line(cli("run", "--quiet", "--resume", unfinished, "--federation", "lab"))
    assert "this run ran on federation.runtime local, which a resume keeps: leave --federation out" in line
    line = error_line(cli("run", "--quiet", "--resume", unfinished, "--jobs", "2"))
    assert "--jobs 2 runs the points of a sweep in parallel, and --resume continues one run" in line
    assert not (unfinished / "summary.json").exists()

    out = tmp_path / "out"
    for fmt in ("vllm", "peft"):
        line = error_line(cli("export", tiny_run, out, "--merged", "--format", fmt))
        assert f"--merged and --format {fmt} ask for two forms: --merged is --format merged" in line
    line = error_line(cli("export", tiny_run, out, "--private", tmp_path))
    assert f"--private {tmp_path} is a client's private store, and the global model has none: add --client N" in line
    line = error_line(cli("export", tiny_run, out, "--client", "0", "--global"))
    assert "--client 0 and --global name two models: give one of them" in line
    assert not out.exists()
    line = error_line(cli("generate", tiny_run, "--input", "some context", stdin=b"Say hello.\n"))
    assert "--input is the context of the one instruction given as PROMPT" in line
    line = error_line(cli("generate", tiny_run, "hi", "--private", tmp_path))
    assert "the global model has none" in line

    for args, want in ((["--router-lora"], "--router-lora: router LoRA takes the rank --lora-rank, which is 0 here"),
                       (["--attention-targets", "q_proj"], "--attention-targets q_proj: attention LoRA takes the rank "
                                                           "--lora-rank, which is 0 here"),
                       (["--expert-layout", "split"], "--expert-layout split: the expert LoRA rank is 0 here"),
                       (["--lora-rank", "4", "--no-expert-lora", "--expert-lora-rank", "8"],
                        "--expert-lora-rank describes the expert LoRA, which --no-expert-lora leaves out")):
        assert want in error_line(cli("flops", "builtin:tiny-moe", *args))
    r = cli("flops", "builtin:tiny-moe", "--expert-lora-rank", "4", "--expert-layout", "split", "--k", "4")
    assert r.returncode == 0 and "LoRA r=0 (experts r=4) on experts (split)" in r.stdout  # rank 0 on attention only
    line = error_line(cli("mmlu", "builtin:tiny-moe", "--client", "0", "--subjects", "anatomy"))
    assert "builtin:tiny-moe is not a run directory: --client, --private and --round choose a model of a run" in line


def _sweep_folder(tiny_run, root: Path, report: bool = True) -> Path:
    """A sweep's folder as `fedmoe run` leaves it: two finished points (copies of ``tiny_run``), one unfinished,
    and (``report``) the sweep_report.md naming the config and listing the finished points in the sweep's order."""
    root.mkdir()
    for point in ("rank=8", "rank=4"):
        shutil.copytree(tiny_run, root / point)
    _unfinished_copy(tiny_run, root / "rank=2")
    if report:
        (root / "sweep_report.md").write_text("# Sweep: my configs/s.yaml\n\n2 runs.\n\nRuns: [rank=8](rank=8/report.md), "
                                              "[rank=4](rank=4/report.md)\n")
    return root


def test_a_sweep_folder_is_named_as_one(tiny_run, tmp_path):
    """A sweep's folder given where one run is wanted: --resume says that a sweep resumes by running its config (named
    from its report, quoted), export, generate and mmlu name its points, compare takes its finished points in the
    sweep's order (and says which it left out), and `fedmoe run FOLDER` says it is no config."""
    sw = _sweep_folder(tiny_run, tmp_path / "sw")
    line = error_line(cli("run", "--resume", sw))
    assert f"{sw} is a sweep's folder (points: rank=8, rank=4, rank=2), not one run" in line
    assert "a sweep resumes by running it again, `fedmoe run 'my configs/s.yaml'`" in line
    assert "its finished points are kept and the others continue from their checkpoints" in line
    assert f"one point alone resumes with `fedmoe run --resume {sw / 'rank=8'}`" in line
    for args, example in ((("export", sw, tmp_path / "out"), f"fedmoe export {sw / 'rank=8'} OUT"),
                          (("generate", sw, "hi"), f"fedmoe generate {sw / 'rank=8'}"),
                          (("mmlu", sw, "--subjects", "anatomy"), f"fedmoe mmlu {sw / 'rank=8'}")):
        line = error_line(cli(*args))
        assert f"{sw} is a sweep's folder, not one run: give one of its points, e.g. `{example}`; its points: rank=8, " \
               "rank=4, rank=2" in line
    assert not (tmp_path / "out").exists()
    line = error_line(cli("run", sw))
    assert f"{sw} is a sweep's folder, not a config file" in line and "sweep: section" in line

    r = cli("compare", sw, "--out", tmp_path / "cmp")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == (f"note: {sw} is a sweep's folder: comparing its 2 finished points; not finished "
                                        "(give a point's folder to compare it as it is so far): rank=2")
    assert r.stdout.splitlines()[1] == "|  | rank=8 | rank=4 |"  # the sweep's order, not the folders' sorted order
    # what it left out is in compare.md too (it was said on the terminal alone); a finished point the sweep's report
    # does not list (an earlier or wider run of the sweep) is compared and said to be one
    assert "Note: " + r.stdout.splitlines()[0][len("note: "):] in " ".join((tmp_path / "cmp" / "compare.md").read_text().split())
    shutil.copytree(tiny_run, sw / "rank=16")
    r = cli("compare", sw, "--out", tmp_path / "cmp16")
    said = " ".join(r.stdout.split())
    assert f"{sw} is a sweep's folder whose sweep_report.md does not list the points rank=16: they were run by an " \
           "earlier or wider run of the sweep" in said
    assert "rank=16" in (tmp_path / "cmp16" / "compare.md").read_text().split("Note: ")[-1]
    shutil.rmtree(sw / "rank=16")
    line = error_line(cli("compare", sw, sw / "rank=4", "--out", tmp_path / "cmp"))
    assert f"{sw / 'rank=4'} (a point of the sweep {sw}) and {sw / 'rank=4'} are the same run" in line

    # a sweep stopped before its report: still known by its points' names, its config not
    (sw / "sweep_report.md").unlink()
    line = error_line(cli("run", "--resume", sw))
    assert "a sweep resumes by running it again, `fedmoe run CONFIG` with the sweep's config" in line
    for point in ("rank=8", "rank=4"):
        (sw / point / "summary.json").unlink()
    line = error_line(cli("compare", sw, "--out", tmp_path / "cmp"))
    assert f"{sw} is a sweep's folder with no finished point (points: rank=2, rank=4, rank=8)" in line
    # an output_dir of ordinary runs is no sweep
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_run, tmp_path / "runs" / "fedit")
    assert f"{tmp_path / 'runs'} is not a fedmoe run directory (no config.yaml)" in error_line(
        cli("run", "--resume", tmp_path / "runs"))


def test_compare_refuses_the_same_run_twice(tiny_run, tmp_path):
    """The same run directory however written (as given twice, with a trailing / or .., through a symbolic link)
    would be two identical columns: refused, naming it."""
    line = error_line(cli("compare", tiny_run, tiny_run, "--out", tmp_path / "o"))
    assert f"{tiny_run} is given twice: a run is compared once" in line
    other = f"{tiny_run.parent}/../{tiny_run.parent.name}/{tiny_run.name}/"
    line = error_line(cli("compare", tiny_run, other, "--out", tmp_path / "o"))
    assert f"{tiny_run} and {Path(other)} are the same run ({tiny_run.resolve()})" in line
    (tmp_path / "link").symlink_to(tiny_run)
    assert "are the same run" in error_line(cli("compare", tmp_path / "link", tiny_run, "--out", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _pasted(line: str) -> list[list[str]]:
    """Every command a message suggests (between backquotes), as a POSIX shell splits it when pasted."""
    import re
    import shlex

    return [shlex.split(c) for c in re.findall(r"`([^`]+)`", line)]


def test_suggested_commands_paste_into_a_shell(tiny_run, tmp_path):
    """With output_dir "my runs" and name "c d", every command a message suggests still names the run's directory
    when pasted into a shell (quoted), where a plain path stays as it is."""
    from fedmoe.cli import _interrupted, _sweep_command
    from fedmoe.federation.directories import out_of_memory_advice

    run = _unfinished_copy(tiny_run, tmp_path / "my runs" / "c d")
    resume = ["fedmoe", "run", "--resume", str(run)]
    line = error_line(cli("run", "--quiet", *_sets(TINY + [f"output_dir={tmp_path / 'my runs'}", "name=c d"])))
    assert "holds an unfinished run" in line and _pasted(line)[0] == resume
    line = error_line(cli("export", run, tmp_path / "out"))
    assert _pasted(line) == [resume]
    assert _pasted(_interrupted(run, None)) == [resume]
    # Ctrl-C as the run ended (its summary written): nothing to resume, and said so
    assert _interrupted(tiny_run, None) == (f"Ctrl-C came after the run finished: its results are in {tiny_run} "
                                            "(summary.json, report.md)")
    assert _pasted(out_of_memory_advice(run, MemoryError())) == [
        [*resume, "--set", "train.activation_checkpointing=true"],
        ["fedmoe", "plan", str(run / "config.yaml"), "--set", "train.activation_checkpointing=true"]]
    assert _pasted(_interrupted(run, _sweep_command(Path("my sweep.yaml"), ["name=c d", "seed=1"], "my lab"))) == [
        ["fedmoe", "run", "my sweep.yaml", "--set", "name=c d", "--set", "seed=1", "--federation", "my lab"]]
    line = error_line(cli("run", run))
    assert _pasted(line) == [resume, ["fedmoe", "run", str(run / "config.yaml"), "--overwrite"]]
    shutil.rmtree(run / "checkpoints")
    line = error_line(cli("run", "--resume", run))
    assert _pasted(line) == [["fedmoe", "run", str(run / "config.yaml"), "--overwrite"]]
    # a plain path is written as it is
    plain = _unfinished_copy(tiny_run, tmp_path / "plain")
    assert f"`fedmoe run --resume {plain}`" in _interrupted(plain, None)


def test_errors_that_went_in_circles(tiny_run, tmp_path):
    """A config path that is not there names the default run and where the shipped configs are (and the one meant);
    a run directory given as the config says what to do with it; --resume of a path that is not there says so."""
    from fedmoe.config import shipped_configs

    line = error_line(fedmoe("run", "configs/default.yaml", cwd=tmp_path))
    assert f"config file not found: configs/default.yaml (looked for from {tmp_path})" in line
    assert "`fedmoe run` with no config runs the default run" in line
    shipped = shipped_configs()  # this checkout's configs/ (the source tree fedmoe is imported from)
    assert shipped is not None and (shipped / "flame-table2.yaml").is_file()
    assert f"the shipped configs are in {shipped}; did you mean {shipped / 'default.yaml'}?" in line
    line = error_line(cli("run", tiny_run))
    assert f"{tiny_run} is the directory of a finished run, not a config file" in line
    assert f"`fedmoe export {tiny_run} OUT`" in line and f"give its config, {tiny_run / 'config.yaml'}" in line
    unfinished = _unfinished_copy(tiny_run, tmp_path / "unfinished")
    line = error_line(cli("run", unfinished))
    assert f"{unfinished} is a run directory, not a config file: continue that run with `fedmoe run --resume " \
           f"{unfinished}`" in line
    line = error_line(cli("run", "--resume", tmp_path / "nope"))
    assert f"{tmp_path / 'nope'} does not exist: give the directory of a run" in line
    line = error_line(cli("run", "--resume", ROOT / "configs" / "default.yaml"))
    assert f"is a config file, not a run directory: start a run from it with `fedmoe run {ROOT / 'configs' / 'default.yaml'}`" in line


def test_mmlu_of_a_run_directory_evaluates_its_global_model(tiny_run, monkeypatch):
    """`fedmoe mmlu RUN` evaluates the run's global model — the trained tensors of its last checkpoint on the base,
    as export and generate load it — with the run's own prompt limit (4 x data.max_length), not a transformers
    error about a folder without config.json; --client N evaluates that client's."""
    import fedmoe.eval.mmlu as mmlu

    from fedmoe.rundir import load_tensor_file

    seen = {}
    real = mmlu.evaluate_mmlu

    def spy(model, tokenizer, **kw):
        seen.update(model=model, tokenizer=tokenizer, **kw)
        return real(model, tokenizer, **kw)

    monkeypatch.setattr(mmlu, "evaluate_mmlu", spy)
    r = cli("mmlu", tiny_run, "--subjects", "anatomy", "--max-per-subject", "2", "--k-shot", "0", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["model"] == str(tiny_run) and out["source"] == f"the global model of {tiny_run} (after round 1)"
    assert seen["max_length"] == 4 * 32 and out["max_length"] == 128
    params = dict(seen["model"].named_parameters())
    trained = load_tensor_file(tiny_run / "checkpoints" / "state.pt")["global_state"]
    assert any(n.endswith("lora_B") or "lora_B" in n for n in trained)
    assert any(t.abs().sum() > 0 for n, t in trained.items() if "lora_B" in n)  # trained, not the initial zeros
    for name, t in trained.items():
        assert torch.equal(params[name].detach(), t), name
    r = cli("mmlu", tiny_run, "--client", "1", "--subjects", "anatomy", "--max-per-subject", "1", "--k-shot", "0",
            "--max-length", "64")
    assert r.returncode == 0 and f"MMLU 0-shot, client 1 of {tiny_run} (after round 1)" in r.stdout
    assert seen["max_length"] == 64


def test_flops_of_a_sweep_counts_each_distinct_point(tmp_path):
    """`fedmoe flops SWEEP.yaml` takes a sweep config as `fedmoe plan` does: one table per distinct count, naming
    the points it covers (the seed changes no count here, the rank does), each the count of its points' own config."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text("model: {name: 'builtin:tiny-moe'}\nsweep: {lora.rank: [4, 8], seed: [0, 1]}\n")
    r = cli("flops", sweep, "--json", "--k", "4", "2")
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)
    assert [g["points"] for g in groups] == [["rank=4,seed=0", "rank=4,seed=1"], ["rank=8,seed=0", "rank=8,seed=1"]]
    for g, rank in zip(groups, (4, 8)):
        one = tmp_path / f"r{rank}.yaml"
        one.write_text(f"model: {{name: 'builtin:tiny-moe'}}\nlora: {{rank: {rank}}}\n")
        alone = cli("flops", one, "--json", "--k", "4", "2")
        assert g["rows"] == json.loads(alone.stdout)
    assert groups[0]["rows"][0]["total_trainable"] < groups[1]["rows"][0]["total_trainable"]
    r = cli("flops", sweep, "--k", "4")
    heads = [x for x in r.stdout.splitlines() if x.startswith("sweep points ")]
    assert heads == ["sweep points rank=4,seed=0, rank=4,seed=1:", "sweep points rank=8,seed=0, rank=8,seed=1:"]
    assert f"**{sweep}: builtin:tiny-moe (olmoe), 128 tokens, the adapters fedit builds**" in r.stdout
