"""The built-in pretrained model: its tokenizer, the recipe's determinism and resume, and the
shipped weights reproducing the held-out loss recorded in the model card."""

import json


import pytest
import torch

from fedmoe.data.sources import Example
from fedmoe.data.template import format_prompt
from fedmoe.moe.model import builtin_model_path
from fedmoe.pretrain import (TEMPLATE_MARKERS, copy_test, fixed_batch, heldout_loss, load_corpus, load_pretrain_config, pack,
                             repeat_spans, run_pretrain)

SHIPPED = builtin_model_path("builtin:tiny-moe")
needs_shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(),
                                   reason="the built-in model has not been pretrained into the package yet")

@pytest.fixture(scope="module")
def shipped():
    """The shipped model (fp32, eval mode), its recorded stats and the held-out blocks, loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("the built-in model has not been pretrained into the package yet")
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    cfg = load_pretrain_config(None)
    _, held = load_corpus(cfg)
    stats = json.loads((SHIPPED / "pretrain_stats.json").read_text())
    return {"model": model, "stats": stats, "cfg": cfg, "held": pack(tok, held, cfg.train.seq_len)}


TEMPLATES = [
    format_prompt(Example("Summarize the text.", "MoE models route tokens to experts.", "", "", "t")) + "They route tokens.",
    format_prompt(Example("Name a colour.", "", "", "", "t")) + "Blue.\n\nÜmlauts, emoji 🙂 and  double  spaces.",
]


def test_corpus_excludes_dolly_and_is_deterministic():
    cfg = load_pretrain_config(None)
    assert not any("dolly" in c for c in cfg.corpus)
    a_train, a_held = load_corpus(cfg)
    b_train, b_held = load_corpus(cfg)
    assert a_held == b_held and a_train[:50] == b_train[:50]
    assert len(set(a_train) & set(a_held)) == 0
    assert len(a_train) + len(a_held) == len(set(a_train) | set(a_held))  # exact duplicates removed


def _tiny_recipe(tmp_path, name, steps):
    return load_pretrain_config(None, [
        "corpus=[alpaca_gpt4_en_demo_1k.json.gz]", "tokenizer.vocab_size=600", "model.hidden_size=32",
        "model.num_layers=1", "model.num_heads=2", "model.num_experts=4", "model.top_k=2",
        "model.intermediate_size=16", "train.seq_len=32", "train.batch_size=4", f"train.max_steps={steps}",
        "train.warmup_steps=2", "train.repeat_fraction=0.5", "train.eval_every=1000", "train.checkpoint_every=2", "train.eval_blocks=4",
        f"work_dir={tmp_path}/{name}", f"export_dir={tmp_path}/{name}/export",
    ])


def test_pretrain_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    full = run_pretrain(_tiny_recipe(tmp_path, "full", 4), show_progress=False, log=lambda *_: None)
    run_pretrain(_tiny_recipe(tmp_path, "cut", 2), show_progress=False, log=lambda *_: None)
    resumed = run_pretrain(_tiny_recipe(tmp_path, "cut", 4), show_progress=False, log=lambda *_: None)  # continues
    assert resumed["steps"] == full["steps"] == 4
    a = load_file(str(tmp_path / "full/export/model.safetensors"))
    b = load_file(str(tmp_path / "cut/export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout_loss"] == full["heldout_loss"]
    card = (tmp_path / "full/export/README.md").read_text()
    assert "fedmoe pretrain" in card and f"{full['heldout_loss']:.4f}" in card


@needs_shipped
def test_shipped_tokenizer_round_trips_the_alpaca_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SHIPPED))
    assert 7000 <= len(tok) <= 9000
    for text in TEMPLATES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    for marker in TEMPLATE_MARKERS:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|padding|>"


@needs_shipped
def test_shipped_model_loads_offline_and_reproduces_recorded_loss(shipped):
    model, stats = shipped["model"], shipped["stats"]
    assert model.config.model_type == "olmoe" and model.config.norm_topk_prob is False
    assert 10e6 <= sum(p.numel() for p in model.parameters()) <= 20e6
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 30e6
    loss = heldout_loss(model, fixed_batch(shipped["held"]))
    assert loss == pytest.approx(stats["fixed_batch_loss"], abs=1e-3)


def test_repeat_spans_repeats_the_first_half_of_the_leading_rows():
    batch = torch.arange(4 * 7).view(4, 7)
    out = repeat_spans(batch, 0.5)
    assert torch.equal(batch, torch.arange(4 * 7).view(4, 7))  # the input is not modified
    # rows 0 and 1 (round(0.5 * 4)): positions 3..5 repeat positions 0..2; an odd length keeps its last token
    assert out[0].tolist() == [0, 1, 2, 0, 1, 2, 6] and out[1].tolist() == [7, 8, 9, 7, 8, 9, 13]
    assert torch.equal(out[2:], batch[2:])
    assert repeat_spans(batch, 0.0) is batch and torch.equal(repeat_spans(batch, 0.3)[1:], batch[1:])


@needs_shipped
def test_shipped_model_copies_from_its_context(shipped):
    """The copy curriculum's purpose: the shipped model predicts a repeated span of held-out text almost
    perfectly (the second recipe's model, trained without it, scored 3.00 on the span and 3.05 on its repetition)."""
    now = copy_test(shipped["model"], shipped["held"])
    assert now == pytest.approx(shipped["stats"]["copy_test"], abs=1e-3)
    assert now["second"] < now["first"] / 5


@needs_shipped
def test_shipped_model_uses_every_expert(shipped):
    from fedmoe.pretrain import activation_table

    stats, cfg = shipped["stats"], shipped["cfg"]
    fractions = torch.tensor(stats["expert_token_fraction"], dtype=torch.float64)
    assert fractions.shape == (cfg.model.num_layers, cfg.model.num_experts)
    assert torch.allclose(fractions.sum(dim=1), torch.full((cfg.model.num_layers,), float(cfg.model.top_k),
                                                          dtype=torch.float64))
    # the recorded table is what the shipped weights route on the held-out split (recomputed here)
    now = torch.tensor(activation_table(shipped["model"], shipped["held"]), dtype=torch.float64)
    torch.testing.assert_close(now, fractions, rtol=0, atol=2e-3)
    # experts are used and specialised: in every layer each expert receives 1%..50% of held-out tokens
    assert fractions.min() >= 0.01 and fractions.max() <= 0.5


def test_resuming_with_a_different_recipe_is_refused(tmp_path):
    run_pretrain(_tiny_recipe(tmp_path, "r", 2), show_progress=False, log=lambda *_: None)
    other = _tiny_recipe(tmp_path, "r", 2).model_copy(deep=True)
    other.model.num_experts = 8
    with pytest.raises(ValueError, match=r"different recipe \(model.num_experts: checkpoint 4, config 8\)"):
        run_pretrain(other, show_progress=False, log=lambda *_: None)


def test_device_and_precision_are_not_part_of_the_recipe(tmp_path):
    from fedmoe.config import ConfigError
    from fedmoe.pretrain import _recipe

    cfg = _tiny_recipe(tmp_path, "d", 2)
    moved = cfg.model_copy(deep=True)
    moved.train.device, moved.train.precision = "cuda", "bf16"
    assert _recipe(moved) == _recipe(cfg)  # a checkpoint resumes on another device
    bad = cfg.model_copy(deep=True)
    bad.train.precision = "bf16"
    with pytest.raises(ConfigError, match=r"train.precision: bf16 autocast is for cuda.*'cpu'"):
        run_pretrain(bad, show_progress=False, log=lambda *_: None)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_per_layer_balance_loss_matches_hugging_face_on_one_layer_and_averages():
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    from fedmoe.pretrain import per_layer_balance_loss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g) * 3
    for layer in (a, b):  # one layer: HF's pooled loss is the per-layer loss
        torch.testing.assert_close(per_layer_balance_loss((layer,), 2), load_balancing_loss_func((layer,), 8, 2))
    both = per_layer_balance_loss((a, b), 2)
    torch.testing.assert_close(both, (per_layer_balance_loss((a,), 2) + per_layer_balance_loss((b,), 2)) / 2)
    # a layer that sends every token to experts 0 and 1 is penalised even when another layer
    # uses only experts 6 and 7 (pooled, the two layers look balanced over those 4 experts)
    skew0 = torch.full((40, 8), -10.0)
    skew0[:, :2] = 10
    skew1 = torch.full((40, 8), -10.0)
    skew1[:, 6:] = 10
    assert per_layer_balance_loss((skew0, skew1), 2) > load_balancing_loss_func((skew0, skew1), 8, 2) * 1.5


def test_an_export_dir_holding_another_model_is_refused_before_training(tmp_path):
    """The recipe's export_dir is the shipped model's folder: pretraining into it (or into any folder holding
    what this work_dir's run did not write) is refused before anything is trained or written, by the library
    and by `fedmoe pretrain` (one error line, exit 2); --overwrite replaces it; a resumed run replaces its own
    export (test_pretrain_resumes_to_the_same_weights)."""
    from typer.testing import CliRunner

    from fedmoe.cli import app
    from fedmoe.config import ConfigError
    from fedmoe.moe.model import builtin_model_path

    shipped = builtin_model_path("builtin:tiny-moe")
    before = {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()}
    cfg = _tiny_recipe(tmp_path, "w", 2).model_copy(update={"export_dir": str(shipped)})
    with pytest.raises(ConfigError, match="holds the shipped model builtin:tiny-moe: pretraining would replace"):
        run_pretrain(cfg, show_progress=False, log=lambda *_: None)
    res = CliRunner().invoke(app, ["pretrain", "--set", f"work_dir={tmp_path / 'w'}", "--set", f"export_dir={shipped}"])
    assert res.exit_code == 2 and "error: export_dir" in res.stderr and "--overwrite" in res.stderr, res.stderr
    assert not (tmp_path / "w").exists() and {p.name: p.stat().st_mtime_ns for p in shipped.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cfg = _tiny_recipe(tmp_path, "o", 2).model_copy(update={"export_dir": str(other)})
    with pytest.raises(ConfigError, match="holds files this run did not write"):
        run_pretrain(cfg, show_progress=False, log=lambda *_: None)
    stats = run_pretrain(cfg, show_progress=False, log=lambda *_: None, overwrite=True)
    assert stats["steps"] == 2 and (other / "model.safetensors").is_file()
    # another work_dir's run (one that has exported before: it has a token of its own) does not take this export
    # for its own
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "export_token").write_text("0" * 32)
    with pytest.raises(ConfigError, match="holds files this run did not write"):
        run_pretrain(_tiny_recipe(tmp_path, "p", 2).model_copy(update={"export_dir": str(other)}),
                     show_progress=False, log=lambda *_: None)


def test_a_tokenizer_trained_for_other_settings_is_not_reused(tmp_path):
    """A run stopped before its first checkpoint leaves its tokenizer in work_dir; started again with another
    tokenizer.vocab_size it trained on the old tokenizer while its model card named the new size. The tokenizer
    names the settings it was trained with, and one of other settings is trained again."""
    logged = []
    run_pretrain(_tiny_recipe(tmp_path, "t", 1), show_progress=False, log=lambda *_: None)
    (tmp_path / "t" / "checkpoint.pt").unlink()  # as if it had stopped before its first checkpoint
    bigger = _tiny_recipe(tmp_path, "t", 1).model_copy(deep=True)
    bigger.tokenizer.vocab_size = 700
    run_pretrain(bigger, show_progress=False, log=logged.append)
    assert any("trained with other settings" in str(line) for line in logged)
    vocab = json.loads((tmp_path / "t" / "export" / "config.json").read_text())["vocab_size"]
    assert vocab == 700 and "vocabulary 700" in (tmp_path / "t" / "export" / "README.md").read_text()


@pytest.mark.parametrize(("sets", "says"), [
    (["train.eval_every=0"], "train.eval_every"), (["train.checkpoint_every=0"], "train.checkpoint_every"),
    (["train.warmup_steps=-5"], "train.warmup_steps"), (["train.lr=-1"], "train.lr"),
    (["model.top_k=8", "model.num_experts=4"], "model.top_k = 8 routes each token to more experts"),
    (["model.hidden_size=32", "model.num_heads=3"], "model.hidden_size = 32 does not split into model.num_heads = 3"),
    (["train.device=cuda:x"], "'cuda:x' is not a device"),
])
def test_a_recipe_that_cannot_train_is_refused_naming_the_key(sets, says):
    """Before any work (they divided by zero after the first step, or trained with a negative warm-up)."""
    from fedmoe.config import ConfigError

    with pytest.raises(ConfigError, match=r"\+ --set " + sets[0].replace(".", r"\.")) as e:
        load_pretrain_config(None, sets)
    assert says in str(e.value)


def test_a_config_file_that_is_not_yaml_and_a_batch_larger_than_the_corpus_are_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from fedmoe.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\n")
    res = CliRunner().invoke(app, ["pretrain", str(bad)])
    assert res.exit_code == 2 and f"error: {bad}: line 2, column 1 is not valid YAML" in res.stderr, res.stderr
    res = CliRunner().invoke(app, ["pretrain", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder, not a config file" in res.stderr
    res = CliRunner().invoke(app, ["pretrain", str(tmp_path / "none.yaml")])
    assert res.exit_code == 2 and "give the path of a pretraining YAML config" in res.stderr
    cfg = _tiny_recipe(tmp_path, "b", 1).model_copy(deep=True)
    cfg.train.batch_size = 100000
    from fedmoe.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.batch_size = 100000 is more than the \d+ blocks"):
        run_pretrain(cfg, show_progress=False, log=lambda *_: None)


def test_an_interrupted_pretraining_says_how_to_continue(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import fedmoe.pretrain
    from fedmoe.cli import app

    def stopped(cfg, **kw):
        (tmp_path / "w").mkdir(exist_ok=True)
        (tmp_path / "w" / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(fedmoe.pretrain, "run_pretrain", stopped)
    res = CliRunner().invoke(app, ["pretrain", "--set", f"work_dir={tmp_path / 'w'}"])
    assert res.exit_code == 130, res.output
    assert f"interrupted (Ctrl-C): its last checkpoint, {tmp_path / 'w' / 'checkpoint.pt'}, is kept: the same command " \
           "continues from it" in res.stderr
