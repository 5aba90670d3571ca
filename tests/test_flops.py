"""Analytic FLOPs / parameter accounting (fedmoe.eval.flops) against torch's FlopCounterMode, meta-device
models, and the trainables of MoEModel's adapters; the `fedmoe flops` CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from fedmoe.eval.flops import FLOP_PARTS, count_flops, default_k_list, load_model_config
from fedmoe.moe import SUPPORTED_ARCHITECTURES, ExpertsWithLoRA, MoEModel, UnsupportedModelError
from fedmoe.moe.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls

ARCHS = list(SUPPORTED_ARCHITECTURES)
CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "configs"  # ../shared beside the repo
OLMOE = CONFIGS / "allenai--OLMoE-1B-7B-0924.json"
QWEN15 = CONFIGS / "Qwen--Qwen1.5-MoE-A2.7B.json"
DEEPSEEK_V1 = CONFIGS / "deepseek-ai--deepseek-moe-16b-base.json"
RANK = 4
needs_configs = pytest.mark.skipif(not OLMOE.is_file(), reason="shared model configs not available")


def _adapted(arch, attn_implementation="eager"):
    torch.manual_seed(0)
    cfg = tiny_config(arch)
    mm = MoEModel(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation))
    mm.add_expert_lora(RANK, 8.0)
    mm.add_attention_lora(RANK, 8.0)
    return cfg, mm


def _meta_params(cfg) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ FLOPs vs FlopCounterMode
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_flops_match_flop_counter(arch):
    """Eager attention: QKᵀ and A·V are bmm's over the full T×T square, which is what we count. Expert
    LoRA runs on routed tokens only, so the measured count falls with k like the analytic one."""
    T = 24
    cfg, mm = _adapted(arch)
    # FlopCounterMode has no formula for grouped_mm, so count on the per-expert path (plain matmuls);
    # the two paths are numerically equal (tests/test_moe.py::test_grouped_and_per_expert_paths_agree)
    for layer in mm.layers:
        mm.experts_module(layer.index).grouped = False
    ids = torch.randint(2, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    measured = {}
    for k in (2, 1):
        mm.set_top_k(k)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            mm.model(input_ids=ids)
        measured[k] = counter.get_total_flops()
        analytic = count_flops(cfg, T, k=k, lora_rank=RANK)
        assert measured[k] == pytest.approx(analytic["flops_per_seq"], rel=0.01), (k, analytic["flops_by_part"])
        assert analytic["flops_by_part"]["lora"] > 0 and analytic["flops_by_part"]["attention_scores"] > 0
    assert measured[1] < measured[2]


# ------------------------------------------------------------------------ parameters vs meta models
@pytest.mark.parametrize("arch", ARCHS)
def test_total_params_match_meta_model_tiny(arch):
    cfg = tiny_config(arch)
    assert count_flops(cfg, 8)["total_params"] == _meta_params(cfg)


@needs_configs
@pytest.mark.parametrize("path", [OLMOE, QWEN15], ids=["olmoe-1b-7b", "qwen1.5-moe-a2.7b"])
def test_total_params_match_meta_model_real(path):
    cfg = load_model_config(str(path))
    r = count_flops(cfg, 128)
    assert r["total_params"] == _meta_params(cfg)
    # active: everything but the routed experts, plus k of them per MoE layer
    assert r["active_params"] < r["total_params"]


@needs_configs
def test_published_sizes_and_deepseek_v1():
    olmoe = count_flops(load_model_config(str(OLMOE)), 128)
    assert round(olmoe["total_params"] / 1e9, 1) == 6.9 and round(olmoe["active_params"] / 1e9, 1) == 1.3
    qwen = count_flops(load_model_config(str(QWEN15)), 128)
    assert round(qwen["total_params"] / 1e9, 1) == 14.3 and round(qwen["active_params"] / 1e9, 1) == 2.7
    # DeepSeekMoE v1 (model_type "deepseek", not in transformers): MHA + shared experts + first dense layer
    ds_cfg = load_model_config(str(DEEPSEEK_V1))
    assert ds_cfg.model_type == "deepseek"
    ds = count_flops(ds_cfg, 128)
    assert round(ds["total_params"] / 1e9, 1) == 16.4 and round(ds["active_params"] / 1e9, 1) == 2.8
    assert ds["flops_by_part"]["shared_experts"] > 0 and ds["flops_by_part"]["dense_mlp"] > 0
    assert default_k_list(ds_cfg) == [6, 3, 1]


# ------------------------------------------------------------------------ trainables vs MoEModel
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trainable_counts_match_moemodel(arch):
    cfg, mm = _adapted(arch)
    params = mm.trainable_parameters()
    expert = sum(p.numel() for n, p in params.items() if ".experts." in n)
    attention = sum(p.numel() for n, p in params.items() if ".self_attn." in n)
    assert expert + attention == sum(p.numel() for p in params.values())
    E = mm.num_experts
    for k in (2, 1):
        r = count_flops(cfg, 8, k=k, lora_rank=RANK)
        assert r["total_trainable"] == expert + attention
        assert r["active_trainable"] * E == attention * E + expert * k
    # only expert LoRA / only attention LoRA
    assert count_flops(cfg, 8, lora_rank=RANK, attention_lora_targets=[])["total_trainable"] == expert
    assert count_flops(cfg, 8, lora_rank=RANK, expert_lora=False)["total_trainable"] == attention
    assert all(isinstance(layer.block.experts, ExpertsWithLoRA) for layer in mm.layers)


def test_options_and_errors():
    cfg = tiny_config("olmoe")
    base = count_flops(cfg, 16, k=2)
    assert base["flops_by_part"]["lora"] == 0 and base["total_trainable"] == 0
    assert set(base) == {"k", "seq_len", "flops_per_seq", "flops_by_part", "active_params", "total_params",
                         "active_trainable", "total_trainable"}
    assert tuple(base["flops_by_part"]) == FLOP_PARTS
    assert base["flops_per_seq"] == sum(base["flops_by_part"].values())
    # LoRA FLOPs: 2·T·r·(in+out) per adapted linear; experts × k routed assignments
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    only_q = count_flops(cfg, 16, k=2, lora_rank=3, expert_lora=False, attention_lora_targets=["q_proj"])
    assert only_q["flops_by_part"]["lora"] == 2 * 16 * 3 * (H + H) * L
    experts_only = count_flops(cfg, 16, k=2, lora_rank=0, expert_lora_rank=3, attention_lora_targets=[])
    assert experts_only["flops_by_part"]["lora"] == 2 * 16 * 2 * 3 * ((H + 2 * I) + (I + H)) * L
    with pytest.raises(UnsupportedModelError, match="not projections"):
        count_flops(cfg, 16, lora_rank=2, attention_lora_targets=["kv_b_proj"])
    with pytest.raises(ValueError, match="out of range"):
        count_flops(cfg, 16, k=0)
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError, match="not supported"):
        count_flops(LlamaConfig(), 16)


def test_load_model_config_sources(tmp_path):
    assert load_model_config("builtin:tiny-olmoe").model_type == "olmoe"
    cfg = tiny_config("mixtral")
    cfg.save_pretrained(tmp_path)
    for src in (tmp_path, tmp_path / "config.json"):
        assert count_flops(load_model_config(str(src)), 8) == count_flops(cfg, 8)
    with pytest.raises(FileNotFoundError, match="hub id"):
        load_model_config(str(tmp_path / "missing"))
    (tmp_path / "x.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(UnsupportedModelError, match="unknown to transformers"):
        load_model_config(str(tmp_path / "x.json"))


# ------------------------------------------------------------------------ CLI
@needs_configs
def test_cli_json_schema(tmp_path):
    cmd = [sys.executable, "-m", "fedmoe.cli", "flops", str(OLMOE), "--seq-len", "128", "--k", "8", "4", "2", "1",
           "--lora-rank", "20", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["k"] for row in rows] == [8, 4, 2, 1]
    for row in rows:
        assert set(row) == {"k", "flops_per_seq", "flops_by_part", "active_params", "total_params",
                            "active_trainable", "total_trainable"}
        assert set(row["flops_by_part"]) == set(FLOP_PARTS)
        assert row["flops_per_seq"] == sum(row["flops_by_part"].values())
        assert all(isinstance(v, int) for v in row["flops_by_part"].values())
    flops = [row["flops_per_seq"] for row in rows]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
    assert len({row["total_params"] for row in rows}) == 1 and len({row["total_trainable"] for row in rows}) == 1
    active = [row["active_params"] for row in rows]
    assert active == sorted(active, reverse=True)
    # the library gives the same numbers
    cfg = load_model_config(str(OLMOE))
    assert rows[0]["flops_per_seq"] == count_flops(cfg, 128, k=8, lora_rank=20)["flops_per_seq"]
