"""fedmoe export / generate: a PEFT adapter and a merged model that give the logits of fedmoe's own
model of that client, and a fedmoe folder (for what PEFT cannot express) that MoEModel.from_pretrained
restores exactly; the command says which form it wrote and why."""

import json
import subprocess
import sys

import pytest
import torch

from fedmoe.config import load_config
from fedmoe.export import ExportError, export_model, load_for_answers, load_model, load_run_model
from fedmoe.federation import run_federated
from fedmoe.moe import SUPPORTED_ARCHITECTURES, MoEModel
from fedmoe.moe.model import ModelLoadError
from helpers import cli
from helpers import once_per_session

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["report.figures=false",  # (no figure is checked here: ~0.5 s of drawing a run saved)
        "model.name=builtin:tiny-moe", "data.max_examples=120", "data.max_length=32", "data.partition.num_clients=2",
        "train.max_steps=2", "train.batch_size=2", "train.lr=0.02", "eval.rouge=false", "eval.zero_shot=false",
        "data.max_test_per_client=2", "lora.rank=4", "federation.rounds=1"]
IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 1200, 3], [8, 8, 15, 16, 23, 42, 99, 4]])


def _run(root, name, *sets):
    _, rd = run_federated(load_config(None, TINY + list(sets) + [f"output_dir={root}", f"name={name}"]))
    return rd.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return once_per_session(tmp_path_factory, "export-runs", _runs)  # one set for every worker


def _runs(root):
    return {"fedit": _run(root, "fedit", "algorithm.name=fedit"),
            "flame": _run(root, "flame", "algorithm.name=flame", "algorithm.budgets.top_k=[4,1]",
                          "lora.expert_layout=split", "lora.router=true"),
            "flex": _run(root, "flex", "algorithm.name=flex", "lora.experts=false", "algorithm.flex.calibration_size=4")}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _ours(run, client):
    loaded = load_run_model(run, client)
    return loaded, _logits(loaded.mm.model)


def test_peft_adapter_gives_the_clients_logits(runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    form, why = export_model(runs["fedit"], tmp_path / "a", client=1)
    assert (form, why) == ("peft", [])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32), tmp_path / "a")
    loaded, ours = _ours(runs["fedit"], 1)
    base = _logits(AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32))
    assert (ours - base).abs().max() > 1e-3  # the adapter does something: the comparison is not vacuous
    torch.testing.assert_close(_logits(peft), ours, rtol=0, atol=2e-4)


def test_merged_model_gives_the_logits_of_a_flame_client(runs, tmp_path):
    """FLAME's k_i = 1 client with its rescaler, split expert LoRA and router LoRA: PEFT cannot say it,
    a merged model can (k_i in the config, the rescaler folded into down_proj)."""
    from transformers import AutoModelForCausalLM

    form, why = export_model(runs["flame"], tmp_path / "p", client=1)
    assert form == "fedmoe" and any("rescaler" in w for w in why) and any("k = 1" in w for w in why)
    assert any("router" in w for w in why) and any("split" in w for w in why)
    form, why = export_model(runs["flame"], tmp_path / "m", client=1, merged=True)
    assert (form, why) == ("merged", [])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.config.num_experts_per_tok == 1
    loaded, ours = _ours(runs["flame"], 1)
    assert loaded.mm.top_k == 1
    torch.testing.assert_close(_logits(merged), ours, rtol=0, atol=2e-4)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    # and the fedmoe folder restores it exactly
    back = load_model(str(tmp_path / "p"))
    assert back.top_k == 1
    torch.testing.assert_close(_logits(back.model), ours, rtol=0, atol=0)


def test_flex_client_is_a_fedmoe_folder_restored_exactly(runs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "export", str(runs["flex"]), str(tmp_path / "x"),
                        "--client", "0", "--merged", "--quiet"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert "it/s]" not in r.stderr  # --quiet: no progress bar of transformers
    assert "fedmoe model folder" in r.stdout and "grafted experts" in r.stdout  # which form, and why
    back = load_model(str(tmp_path / "x"))
    with pytest.raises(ModelLoadError, match="fedmoe export folder.*fedmoe.export.load_model"):
        MoEModel.from_pretrained(str(tmp_path / "x"))  # the model class loads models, and says where exports go
    _, ours = _ours(runs["flex"], 0)
    torch.testing.assert_close(_logits(back.model), ours, rtol=0, atol=0)
    _, other = _ours(runs["flex"], 1)
    assert (other - ours).abs().max() > 1e-4  # client 0's own model, not any client's


def test_bad_requests_are_named(runs, tmp_path):
    with pytest.raises(ExportError, match="clients 0..1"):
        export_model(runs["fedit"], tmp_path / "z", client=5)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(runs["fedit"], tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_generate_answers_with_the_clients_model(runs):
    from fedmoe.export import answer

    loaded = load_run_model(runs["fedit"], 0)
    want = answer(loaded, "Name a colour.", max_new_tokens=8)
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "generate", str(runs["fedit"]), "Name a colour.",
                        "--client", "0", "--max-new-tokens", "8"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want and want
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "generate", str(runs["fedit"]), "--max-new-tokens", "8"],
                       input="Name a colour.\n\n", capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == answer(load_run_model(runs["fedit"]), "Name a colour.",
                                                           max_new_tokens=8)


def test_generate_answers_with_an_exported_model(runs, tmp_path):
    """`fedmoe generate OUT` on a merged export or a fedmoe folder: the answers of the run's own model, in
    the run's template and decoding (the export's fedmoe-source.json / fedmoe folder carry the run's
    config); an adapter is refused naming its run; --client on an export is refused."""
    from fedmoe.export import SOURCE_FILE, answer, load_for_answers

    assert export_model(runs["fedit"], tmp_path / "m", client=0, merged=True)[0] == "merged"
    meta = json.loads((tmp_path / "m" / SOURCE_FILE).read_text())
    assert meta["form"] == "merged" and meta["client"] == 0 and meta["source"].startswith("client 0 of ")
    assert meta["config"]["data"]["max_length"] == 32 and meta["config"]["algorithm"]["name"] == "fedit"
    want = answer(load_run_model(runs["fedit"], 0), "Name a colour.", max_new_tokens=8)
    merged = load_for_answers(tmp_path / "m")
    assert merged.cfg.data.max_length == 32 and merged.cfg.model.name == str(tmp_path / "m")
    assert answer(merged, "Name a colour.", max_new_tokens=8) == want and want
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "generate", str(tmp_path / "m"), "Name a colour.",
                        "--max-new-tokens", "8", "--quiet"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == want, r.stderr
    assert "it/s]" not in r.stderr  # --quiet: no "Loading weights" bar of the model folder
    assert export_model(runs["flex"], tmp_path / "x", client=0, merged=True)[0] == "fedmoe"
    assert (answer(load_for_answers(tmp_path / "x"), "Name a colour.", max_new_tokens=8)
            == answer(load_run_model(runs["flex"], 0), "Name a colour.", max_new_tokens=8))
    assert export_model(runs["fedit"], tmp_path / "a", client=0)[0] == "peft"
    assert json.loads((tmp_path / "a" / SOURCE_FILE).read_text())["form"] == "peft"
    with pytest.raises(ExportError, match=r"LoRA adapter of client 0 of .*--merged"):
        load_for_answers(tmp_path / "a")
    _assert_ordinary_permissions(tmp_path / "m", tmp_path / "x", tmp_path / "a")
    with pytest.raises(ExportError, match="export of one model"):
        load_for_answers(tmp_path / "m", client=1)
    for bad in ("[1, 2]", "{not json", '{"config": "x"}'):  # a damaged or foreign file: one clear line
        (tmp_path / "m" / SOURCE_FILE).write_text(bad)
        with pytest.raises(ExportError, match=r"fedmoe-source.json .*remove it"):
            load_for_answers(tmp_path / "m")


def _assert_ordinary_permissions(*folders):
    """Every file of an export has the umask's ordinary permissions (0644 under 022), weights included:
    safetensors writes 0600, which a server running as another user could not read."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for folder in folders:
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in files), folder
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _delta_from_files(folder, num_experts=8):
    """{(module name, expert or None, projection): ΔW} rebuilt from an exported adapter's files alone."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    t = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            stem = key[len("base_model.model."):-len(".lora_A.weight")]
            A, B = t[key], t[stem.join(("base_model.model.", ".lora_B.weight"))]
            if stem.endswith((".experts", ".experts.base_layer")):  # the fused 3-D form (gpt-oss): PEFT's keys
                # A (E·r, in), B (out, r·E), read per expert as vLLM reads them: A (E, r, in), B (E, out, r)
                module, proj = ((stem[: -len(".base_layer")], "gate_up_proj") if stem.endswith(".base_layer")
                                else (stem, "down_proj"))
                A3, B3 = A.reshape(num_experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)
                for e in range(num_experts):
                    out[f"{module}.{e}.{proj}"] = s * B3[e] @ A3[e]
            else:
                out[stem] = s * B @ A
    return cfg, out


def _expected_expert_deltas(mm, names=("gate_proj", "up_proj", "down_proj")):
    """Each expert's ΔW by projection, from fedmoe's own adapters. gpt-oss: its fused gate_up ΔW (2I, H), rows in
    its stored order (gate, up interleaved), and down's, as vLLM's fused 3-D form holds them."""
    from fedmoe.moe.lora import ExpertsWithLoRA

    want = {}
    for name, mod in mm.model.named_modules():
        if isinstance(mod, ExpertsWithLoRA) and mod.targets and mm.model_type == "gpt_oss":
            d = mod.delta_weights()
            for e in range(mod.num_experts):
                want[f"{name}.{e}.gate_up_proj"] = d["gate_up_proj"][e]
                want[f"{name}.{e}.down_proj"] = d["down_proj"][e]
        elif isinstance(mod, ExpertsWithLoRA) and mod.targets:
            d, inter = mod.delta_weights(), mod.intermediate_size
            for e in range(mod.num_experts):
                want[f"{name}.{e}.{names[0]}"] = d["gate_up_proj"][e][:inter]
                want[f"{name}.{e}.{names[1]}"] = d["gate_up_proj"][e][inter:]
                want[f"{name}.{e}.{names[2]}"] = d["down_proj"][e]
    return want


def test_vllm_export_rebuilds_every_experts_delta_from_its_files(runs, tmp_path):
    """--format vllm: per-expert 2-D LoRA keys; each expert's ΔW of gate, up and down (and each attention
    ΔW) rebuilt from the written files alone equals fedmoe's own ΔW to 1e-6."""
    from fedmoe.moe.lora import LoRALinear

    form, why = export_model(runs["fedit"], tmp_path / "v", client=1, form="vllm")
    assert (form, why) == ("vllm", [])
    cfg, got = _delta_from_files(tmp_path / "v")
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    loaded = load_run_model(runs["fedit"], 1)
    want = _expected_expert_deltas(loaded.mm)
    want.update({n: m.delta_weight() for n, m in loaded.mm.model.named_modules() if isinstance(m, LoRALinear)})
    assert set(got) == set(want) and len(want) == 4 * 16 * 3 + 4 * 4
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=0, atol=1e-6)
    assert any(float(w.abs().max()) > 1e-4 for w in want.values())  # trained: not all zero
    _assert_ordinary_permissions(tmp_path / "v")


def test_vllm_layout_of_the_split_experts_and_mixtral_names():
    """The split layout maps its own gate, up and down pairs; Mixtral's per-expert names are its original
    checkpoint's, block_sparse_moe.experts.{e}.w1 / w3 / w2 (transformers v5 calls the block mlp; vLLM's
    Mixtral does not, and would accept keys under mlp.experts and never apply them); LFM2-MoE's are its hub
    checkpoint's and vLLM's expert mapping's, feed_forward.experts.{e}.w1 / w3 / w2."""
    from helpers import tiny_hf

    from fedmoe.export import vllm_tensors

    for arch, names, block in (("olmoe", ("gate_proj", "up_proj", "down_proj"), "mlp"),
                               ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"), "mlp"),
                               ("mixtral", ("w1", "w3", "w2"), "block_sparse_moe"),
                               ("phimoe", ("w1", "w3", "w2"), "block_sparse_moe"),
                               ("lfm2_moe", ("w1", "w3", "w2"), "feed_forward")):
        # target_modules names the roles for every family (SGLang 0.5.23 refuses w1 / w2 / w3 there)
        mm = MoEModel(tiny_hf(arch))
        mm.add_expert_lora(4, 8.0, layout="split")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in mm.trainable_parameters().values():
                p.copy_(torch.randn(p.shape, generator=g))
        tensors, targets, rank, alpha = vllm_tensors(mm)
        assert targets == ["down_proj", "gate_proj", "up_proj"] and (rank, alpha) == (4, 8.0)
        assert all(f".{block}.experts." in k for k in tensors) and len(tensors) == 2 * 3 * 8 * len(mm.layers)
        want = {k.replace(".mlp.experts.", f".{block}.experts."): w for k, w in _expected_expert_deltas(mm, names).items()}
        for k, w in want.items():
            got = 2.0 * tensors[f"base_model.model.{k}.lora_B.weight"] @ tensors[f"base_model.model.{k}.lora_A.weight"]
            torch.testing.assert_close(got, w, rtol=0, atol=1e-5)


def test_vllm_export_gives_every_expert_all_three_projections():
    """LoRA on the down projection only (lora.expert_targets): every expert still carries a gate, an up and
    a down pair (vLLM packs the three together and refuses an expert without one); the gate's and the
    up's are zero (ΔW = 0), the down's is the trained one."""
    from helpers import tiny_hf

    from fedmoe.export import vllm_tensors

    mm = MoEModel(tiny_hf("olmoe"))
    mm.add_expert_lora(4, 8.0, targets=("down_proj",))
    with torch.no_grad():
        for p in mm.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tensors, targets, _, _ = vllm_tensors(mm)
    assert targets == ["down_proj", "gate_proj", "up_proj"]
    E, inter, hidden = 8, mm.layers[0].experts.down_proj.shape[2], mm.layers[0].experts.down_proj.shape[1]
    for layer in mm.layers:
        for e in range(E):
            key = f"base_model.model.model.layers.{layer.decoder_layer}.mlp.experts.{e}"
            for proj, fan_in, fan_out in (("gate_proj", hidden, inter), ("up_proj", hidden, inter)):
                A, B = tensors[f"{key}.{proj}.lora_A.weight"], tensors[f"{key}.{proj}.lora_B.weight"]
                assert A.shape == (4, fan_in) and B.shape == (fan_out, 4) and not A.any() and not B.any()
            d = mm.layers[layer.index].block.experts.delta_weights()["down_proj"][e]
            got = 2.0 * tensors[f"{key}.down_proj.lora_B.weight"] @ tensors[f"{key}.down_proj.lora_A.weight"]
            torch.testing.assert_close(got, d, rtol=0, atol=1e-5)
            assert d.abs().max() > 1e-3


def test_vllm_export_of_what_it_cannot_express_is_a_fedmoe_folder(runs, tmp_path):
    form, why = export_model(runs["flame"], tmp_path / "f", client=1, form="vllm")
    assert form == "fedmoe" and any("router LoRA" in w for w in why) and not any("split" in w for w in why)


def test_export_takes_the_finished_runs_last_round_or_exactly_the_round_asked(tmp_path):
    """An unfinished run is refused (its checkpoint may be its initial adapters), offering its rounds; a finished
    run exports its last round; when that checkpoint is damaged, export refuses rather than fall back to the
    older one, which --round takes on purpose. The model says which round it is."""
    from fedmoe.federation import resume_federated

    cfg = load_config(None, TINY + ["federation.rounds=2", f"output_dir={tmp_path}", "name=r2"])
    _, rd = run_federated(cfg, stop_after_round=1, log=lambda *a: None)
    with pytest.raises(ExportError, match=r"did not finish.*round 1 of 2.*--resume.*--round 1 \(state.pt\)"):
        load_run_model(rd.path)
    with pytest.raises(ExportError, match=r"or export a round it has on purpose with --round 1 \(state.pt\)$"):
        load_run_model(rd.path)
    # fedmoe generate says what it does with the round (it exports nothing)
    with pytest.raises(ExportError, match=r"or generate from a round it has on purpose with --round 1 \(state.pt\)$"):
        load_for_answers(rd.path)
    assert "after round 1" in load_run_model(rd.path, round_idx=1).source
    resume_federated(rd.path, log=lambda *a: None)
    assert "after round 2" in load_run_model(rd.path).source
    (rd.checkpoint_dir / "state.pt").write_bytes(b"torn")
    with pytest.raises(ExportError, match=r"finished 2 rounds, but its checkpoint of round 2 cannot be read.*state.pt "
                                          r"is unreadable.*--round 1 \(state.prev.pt\)"):
        load_run_model(rd.path)
    with pytest.raises(ExportError, match=r"is lost. Generate from an older round on purpose with --round 1"):
        load_for_answers(rd.path)
    with pytest.raises(ExportError, match="no checkpoint of round 2; it has: --round 1"):
        load_run_model(rd.path, round_idx=2)
    assert "after round 1" in load_run_model(rd.path, round_idx=1).source


def test_a_private_store_of_another_run_or_client_is_refused(tmp_path):
    """--private: a SuperNode's state-dir (the run's client folder is found in it), that folder, or a file; a
    store of another run or another client is refused naming both; the state of the exported round is taken."""
    from fedmoe.export import _private_from
    from fedmoe.federation.flower.client import PrivateStore

    for run_id, client in (("aaaa", 1), ("bbbb", 0)):
        store = PrivateStore(tmp_path / run_id / f"client-{client}")
        for r in (0, 1, 2):
            store.save(r, {"s": torch.tensor([float(r)])})
    assert float(_private_from(tmp_path, "aaaa", 1, 2)[0]["s"]) == 2.0
    assert float(_private_from(tmp_path / "aaaa" / "client-1", "aaaa", 1, 1)[0]["s"]) == 1.0
    with pytest.raises(ExportError, match="client 0 of run bbbb, not of client 1 of run aaaa"):
        _private_from(tmp_path / "bbbb" / "client-0", "aaaa", 1, 2)
    with pytest.raises(ExportError, match="no private store of client 3 of run aaaa"):
        _private_from(tmp_path, "aaaa", 3, 2)
    moved = tmp_path / "copy" / "aaaa" / "client-1"  # copied elsewhere: its identity.json still says whose it is
    moved.parent.mkdir(parents=True)
    (tmp_path / "bbbb" / "client-0").rename(moved)
    with pytest.raises(ExportError, match="client 0 of run bbbb"):
        _private_from(moved, "aaaa", 1, 2)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_every_architecture_trains_federated_and_exports(arch, tmp_path):
    """A tiny model of each supported family (saved as a Hugging Face folder, as a user's model is) through a
    federated FedIT round, then exported: the merged model reloaded by transformers gives the logits of
    fedmoe's own global model, and the vllm export's files rebuild every expert's and attention ΔW (Granite-MoE:
    refused, naming --merged: vLLM takes no LoRA for it). Phi-3.5-MoE's sparsemixer routes to two experts whatever
    the config says: its model routes to 2."""
    from helpers import hf_folder
    from transformers import AutoModelForCausalLM

    from fedmoe.moe.lora import LoRALinear

    # gpt-oss's expert biases, LFM2-MoE's routing bias, zero in transformers' init, drawn: the export must keep them
    hf_folder(tmp_path, arch, top_k=2 if arch == "phimoe" else 4)
    run = _run(tmp_path, "r", f"model.name={tmp_path / 'base'}", "algorithm.name=fedit")
    loaded = load_run_model(run, None)
    ours = _logits(loaded.mm.model)
    base = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    assert (ours - base).abs().max() > 1e-4  # trained: the comparisons below are not vacuous
    assert export_model(run, tmp_path / "m", merged=True) == ("merged", [])
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), ours, rtol=0, atol=2e-4)
    if arch in ("granitemoe", "llama4_text"):
        form, why = export_model(run, tmp_path / "v", form="vllm")
        assert form == "fedmoe" and "--merged" in why[-1] and "get_expert_mapping" in why[-1]
        # Llama-4's expert LoRA has no PEFT form either (PEFT reads its unmarked (E, in, out) stacks transposed)
        assert len(why) == (2 if arch == "llama4_text" else 1) and all("--merged" in w for w in why)
        return
    assert export_model(run, tmp_path / "v", form="vllm") == ("vllm", [])
    _, got = _delta_from_files(tmp_path / "v")
    names = ("w1", "w3", "w2") if arch in ("mixtral", "lfm2_moe", "phimoe") else ("gate_proj", "up_proj", "down_proj")
    want = _expected_expert_deltas(loaded.mm, names)
    if arch in ("mixtral", "phimoe"):
        want = {k.replace(".mlp.experts.", ".block_sparse_moe.experts."): w for k, w in want.items()}
    attention = {n: m.delta_weight() for n, m in loaded.mm.model.named_modules() if isinstance(m, LoRALinear)}
    want.update(attention)
    projections = 2 if arch == "gpt_oss" else 3  # gpt-oss: vLLM's fused 3-D form, gate_up and down per expert
    assert set(got) == set(want) and len(want) == 2 * 8 * projections + len(attention)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=0, atol=1e-6)


def test_export_notes_say_what_differs_from_the_run(tmp_path):
    """A quantized run's adapters on the full-precision base, the dtype to load a PEFT base in, and vLLM's
    latent attention that never applies kv_b_proj's LoRA: each said where it applies, and only there."""
    from helpers import tiny_hf

    from fedmoe.export import export_notes

    plain = load_config(None, ["model.dtype=bfloat16"])  # the built-in base is stored in bf16: nothing to say
    assert export_notes(plain, "merged") == [] and export_notes(plain, "peft") == []
    nf4 = load_config(None, ["model.quantization=nf4"])
    assert any("NF4 base" in n for n in export_notes(nf4, "merged"))
    assert not any("NF4" in n for n in export_notes(nf4, "fedmoe"))
    assert any("dtype=torch.float32" in n and "bfloat16" in n for n in export_notes(nf4, "peft"))
    mla = MoEModel(tiny_hf("deepseek_v3"))
    mla.add_attention_lora(4, 8.0)  # q_proj, kv_b_proj, o_proj
    assert any("kv_b_proj" in n for n in export_notes(plain, "vllm", mla))
    assert not any("kv_b_proj" in n for n in export_notes(plain, "merged", mla))
    mla = MoEModel(tiny_hf("deepseek_v3"))
    mla.add_attention_lora(4, 8.0, ["q_proj", "o_proj"])
    assert export_notes(plain, "vllm", mla) == []
    # SGLang: a hybrid model's linear-attention LoRA (refused at start-up), FlexOlmo's q/k/v (dropped)
    for arch, targets, said in (("qwen3_5_moe_text", None, "linear-attention"), ("flex_olmo", None, "FlexOlmo")):
        mm = MoEModel(tiny_hf(arch))
        mm.add_attention_lora(4, 8.0, targets)
        assert any(said in n for n in export_notes(plain, "vllm", mm)) and export_notes(plain, "merged", mm) == []
    for arch, targets in (("qwen3_5_moe_text", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("flex_olmo", ["o_proj"])):
        mm = MoEModel(tiny_hf(arch))
        mm.add_attention_lora(4, 8.0, targets)
        assert export_notes(plain, "vllm", mm) == []
    # a Qwen3.5 vision-language base: fedmoe trained its language model; vLLM serves the adapter on the
    # vision-language class with --enable-mixed-moe-lora-format (README), which PEFT's form does not apply to
    import transformers

    vl = tmp_path / "qwen35-vl"
    vl.mkdir()
    (vl / "config.json").write_text(json.dumps(transformers.Qwen3_5MoeConfig(
        text_config=tiny_hf("qwen3_5_moe_text").config.to_dict()).to_dict()))
    base = load_config(None, [f"model.name={vl}"])
    said = {form: " ".join(n for n in export_notes(base, form, mm) if "vision-language checkpoint" in n)
            for form in ("vllm", "peft", "merged")}
    assert "--enable-mixed-moe-lora-format" in said["vllm"] and "not to the checkpoint's" not in said["vllm"]
    assert "not to the checkpoint's vision-language class" in said["peft"] and "not images" in said["merged"]


def test_two_exports_into_one_folder_never_mix_and_a_failed_one_leaves_nothing(runs, tmp_path, monkeypatch):
    """An export holds its OUT from the start (IN_PROGRESS, created exclusively): a second export into the same
    folder, past the emptiness check before either wrote, is refused instead of writing its files over the first's
    (both succeeded, the folder holding one run's weights under the other's label). An export that fails midway
    leaves no folder it made, and an empty folder it was given empty."""
    import fedmoe.export as ex

    out = tmp_path / "race"
    seen = {}

    def second_export_meanwhile(*a, **kw):  # while the first export loads its model, another one starts
        with pytest.raises(ExportError, match="is being written by another export"):
            ex._claim(out)
        seen["refused"] = True
        return real(*a, **kw)

    real = ex.load_run_model
    monkeypatch.setattr(ex, "load_run_model", second_export_meanwhile)
    assert export_model(runs["fedit"], out, client=0)[0] == "peft"
    assert seen == {"refused": True} and not (out / ex.IN_PROGRESS).exists()
    with pytest.raises(ExportError, match="not empty"):
        export_model(runs["fedit"], out, client=1)
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / ex.IN_PROGRESS).touch()  # an export killed midway
    with pytest.raises(ExportError, match="holds an unfinished export"):
        export_model(runs["fedit"], tmp_path / "stale", client=1)

    def fails(*a, **kw):
        (a[1] / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "load_run_model", real)
    monkeypatch.setattr(ex, "write_peft", fails)
    with pytest.raises(OSError, match="disk full"):
        export_model(runs["fedit"], tmp_path / "new" / "deep", client=0)
    assert not (tmp_path / "new" / "deep").exists()
    (tmp_path / "given").mkdir()
    with pytest.raises(OSError, match="disk full"):
        export_model(runs["fedit"], tmp_path / "given", client=0)
    assert (tmp_path / "given").is_dir() and not any((tmp_path / "given").iterdir())


def test_private_is_refused_for_a_run_whose_checkpoint_holds_the_stores(runs, tmp_path):
    """An in-process run's checkpoint holds every client's private state: a --private store (which it has no
    identity to check against) would silently replace it — FLAME's client 0 exported with client 1's rescaler."""
    from fedmoe.federation.flower.client import PrivateStore

    store = PrivateStore(tmp_path / "priv")
    store.save(1, {"s": torch.tensor([1.0])})
    with pytest.raises(ExportError, match="ran in-process, and its checkpoint holds client 0's private state"):
        export_model(runs["flame"], tmp_path / "p0", client=0, private_path=tmp_path / "priv")
    assert not (tmp_path / "p0").exists()


def test_a_run_on_a_device_this_machine_lacks_exports_with_device(runs, tmp_path):
    """A run trained on a GPU and exported where there is none: an error naming --device (was a traceback from
    torch), and with --device cpu the same model (where it loads changes no trained tensor)."""
    import shutil

    from fedmoe.export import load_for_answers

    run = tmp_path / "gpu-run"
    shutil.copytree(runs["fedit"], run)
    cfg = (run / "config.yaml").read_text()
    assert "device: auto" in cfg
    (run / "config.yaml").write_text(cfg.replace("device: auto", "device: cuda:99"))  # an execution key
    with pytest.raises(ExportError, match=r"model.device = cuda:99, but this machine has .*pass --device cpu"):
        export_model(run, tmp_path / "x", client=0)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="pass --device cpu"):
        load_for_answers(run)
    assert export_model(run, tmp_path / "y", client=0, device="cpu")[0] == "peft"
    ours = _logits(load_for_answers(run, 0, device="cpu").mm.model)
    assert torch.equal(ours, _ours(runs["fedit"], 0)[1])


def test_a_checkpoint_with_a_flipped_bit_is_refused_not_exported(runs, tmp_path):
    """torch.load does not check the CRC-32 each record of its zip carries: a flipped bit in a tensor's bytes was
    exported as 'after round 1' with a LoRA value changed. Every .pt fedmoe reads is checked against them first; the
    run then reads as one whose last checkpoint is damaged (a resume falls back to the previous round, export
    refuses), and a flipped bit anywhere in a file is caught. (The fall-back to state.prev.pt is
    tests/test_federation.py's, for any unreadable latest checkpoint.)"""
    import random
    import shutil

    from fedmoe.federation.checkpoint import RunDirError, load_checkpoint
    from fedmoe.rundir import DamagedFileError, load_tensor_file

    run = tmp_path / "flipped"
    shutil.copytree(runs["fedit"], run)
    state = run / "checkpoints" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"state.pt: this checkpoint is damaged: its record .* does not match"):
        load_tensor_file(state, "checkpoint")
    # a one-round run without a zero-shot checkpoint has no previous one to fall back to: no readable checkpoint
    with pytest.raises(RunDirError, match=r"no readable checkpoint .*state.pt: this checkpoint is damaged"):
        load_checkpoint(run, log=lambda *a: None)
    with pytest.raises(RunDirError, match="this checkpoint is damaged"):
        export_model(run, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    original = (runs["fedit"] / "checkpoints" / "state.pt").read_bytes()
    clean = load_tensor_file(runs["fedit"] / "checkpoints" / "state.pt")

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    rng = random.Random(0)
    caught = 0
    for _ in range(50):  # any single flipped bit: refused, or (zip padding, an unused header field) changes nothing
        b = bytearray(original)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        state.write_bytes(bytes(b))
        try:
            loaded = load_tensor_file(state)
        except DamagedFileError:
            caught += 1
            continue
        except Exception:  # noqa: BLE001 - refused otherwise (a torn zip directory): not loaded either
            caught += 1
            continue
        assert same(loaded, clean)  # never a changed number
    assert caught >= 40


# ------------------------------------------------------------------ what a user hands export, found wanting
def _as_flower_run(run, tmp_path):
    """A copy of an in-process run made to look like a Flower deployment's (its clients' private states not in its
    checkpoint, but in a SuperNode's store): (the copy, the store's client-0 folder, client 0's true private state)."""
    import shutil

    copy = tmp_path / "flw"
    shutil.copytree(run, copy)
    ck_path = copy / "checkpoints" / "state.pt"
    ck = torch.load(ck_path, weights_only=False)
    private = ck["transport"]["private"][0]
    ck["transport"] = {"run_id": "RUNX"}
    torch.save(ck, ck_path)
    (copy / "checkpoints" / "state.prev.pt").unlink(missing_ok=True)
    store = tmp_path / "store" / "RUNX" / "client-0"
    store.mkdir(parents=True)
    (store / "identity.json").write_text(json.dumps({"run_id": "RUNX", "client": 0}))
    return copy, store, private


def test_a_private_file_older_than_one_beside_it_is_refused(runs, tmp_path):
    """--private FILE took that file even where a newer store of the round exported lay beside it: a personalised
    model of an older round's private state (FLAME's rescaler of round 0), exported under the newer round's name."""
    copy, store, private = _as_flower_run(runs["flame"], tmp_path)
    stale = {k: (v * 0 + 1 if k.endswith("rescaler") else v) for k, v in private.items()}
    torch.save(stale, store / "private-r00000.pt")
    torch.save(private, store / "private-r00001.pt")
    with pytest.raises(ExportError, match=r"private-r00000.pt is client 0's private state after round 0, but .* holds a "
                                          r"newer one of round 1"):
        export_model(copy, tmp_path / "o", client=0, private_path=store / "private-r00000.pt")
    assert not (tmp_path / "o").exists()
    exported = {}
    export_model(copy, tmp_path / "ok", client=0, private_path=store, exported=exported)
    assert exported["source"].endswith(f"(after round 1, with its private state from {store}, of round 1)")
    loaded = load_run_model(copy, 0, private_path=store / "private-r00001.pt")
    torch.testing.assert_close(_logits(loaded.mm.model), _ours(runs["flame"], 0)[1], rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["empty", "text", "truncated", "compressed", "identity", "keys"])
def test_a_damaged_private_store_is_one_line_naming_the_file(runs, tmp_path, damage):
    import zipfile

    copy, store, private = _as_flower_run(runs["flame"], tmp_path)
    f = store / "private-r00001.pt"
    torch.save(private, f)
    data = f.read_bytes()
    if damage == "empty":
        f.write_bytes(b"")
    elif damage == "text":
        f.write_text("hello\n")
    elif damage == "truncated":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "compressed":  # a few hundred KB that could inflate to GB: torch.save never compresses
        with zipfile.ZipFile(f) as z:
            records = [(i.filename, z.read(i.filename)) for i in z.infolist()]
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, blob in records:
                z.writestr(name, blob)
    elif damage == "identity":
        (store / "identity.json").write_text("[1]")
    else:
        torch.save({"something": torch.zeros(2)}, f)
    r = cli("export", copy, tmp_path / "o", "--client", "0", "--private", store, "--quiet")  # in this process
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    named = store / "identity.json" if damage == "identity" else store if damage == "keys" else f
    assert str(named) in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("craft", ["no server state", "global state a list", "missing client", "nan"])
def test_a_crafted_checkpoint_is_one_line_naming_it(runs, tmp_path, craft):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(runs["fedit"], copy)
    ck_path = copy / "checkpoints" / "state.pt"
    ck = torch.load(ck_path, weights_only=False)
    if craft == "no server state":
        del ck["server_state"]
    elif craft == "global state a list":
        ck["global_state"] = [1, 2]
    elif craft == "missing client":
        del ck["transport"]["private"][1]
    else:
        name = sorted(ck["global_state"])[0]
        ck["global_state"][name] = ck["global_state"][name] * float("nan")
    torch.save(ck, ck_path)
    with pytest.raises(ExportError) as told:
        export_model(copy, tmp_path / "o", client=1)
    text = str(told.value)
    assert str(copy / "checkpoints") in text and ("altered" in text or "non-finite" in text), text
    assert not (tmp_path / "o").exists()


def test_sigterm_midway_leaves_no_half_written_export(runs, tmp_path):
    """SIGTERM (a scheduler, `kill`) during an export left OUT with a partial model.safetensors that
    from_pretrained would load. It is now stopped as Ctrl-C is: the export's clean-up runs, exit 143, no OUT."""
    import signal
    import time

    out, started = tmp_path / "o", tmp_path / "started"
    script = (
        "import sys, time, pathlib\n"
        "import fedmoe.export as ex, fedmoe.cli as cli\n"
        "real = ex.write_merged\n"
        "def slow(loaded, out):\n"
        "    real(loaded, out)\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(120)\n"
        "ex.write_merged = slow\n"
        f"sys.argv = ['fedmoe', 'export', {str(runs['fedit'])!r}, {str(out)!r}, '--merged', '--quiet']\n"
        "cli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists() and (out / "model.safetensors").exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"stopped (SIGTERM): nothing of the export was left in {out}" in err
    assert not out.exists()


def test_flex_global_model_exports_in_every_form(runs, tmp_path):
    """FLEx's global model has no grafts (switched off in it): its tensors were counted as the method's own, and
    every form fell back to a fedmoe folder. It is the attention LoRA on the base."""
    from transformers import AutoModelForCausalLM

    assert export_model(runs["flex"], tmp_path / "m", merged=True) == ("merged", [])
    _, ours = _ours(runs["flex"], None)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), ours, rtol=0, atol=2e-4)
    assert export_model(runs["flex"], tmp_path / "p")[0] == "peft"


def test_the_fedmoe_form_on_purpose_and_strict(runs, tmp_path):
    """--format fedmoe writes the model exactly as the run evaluated it (the form a quantized run's notes point to);
    --strict refuses a form that cannot express the model instead of writing a fedmoe folder, naming the forms that
    can; the command's fallback line names them too."""
    assert export_model(runs["fedit"], tmp_path / "f", client=1, form="fedmoe") == ("fedmoe", [])
    _, ours = _ours(runs["fedit"], 1)
    torch.testing.assert_close(_logits(load_model(tmp_path / "f").model), ours, rtol=0, atol=0)
    with pytest.raises(ExportError, match=r"--strict: client 1 of .* has no peft form \(.*rescaler.*\); it has a merged "
                                          r"form\. Nothing was written"):
        export_model(runs["flame"], tmp_path / "s", client=1, strict=True)
    assert not (tmp_path / "s").exists()
    r = subprocess.run([sys.executable, "-m", "fedmoe.cli", "export", str(runs["flame"]), str(tmp_path / "v"),
                        "--client", "1", "--format", "vllm", "--quiet"], capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and "It has a merged form (--format merged)" in r.stdout, r.stdout + r.stderr


def test_what_reads_an_export_refuses_an_unfinished_or_altered_one(runs, tmp_path):
    from fedmoe.export import EXPORT_FILE, IN_PROGRESS

    export_model(runs["flex"], tmp_path / "x", client=0, merged=True)
    (tmp_path / "x" / IN_PROGRESS).touch()
    for read in (lambda: load_model(tmp_path / "x"), lambda: load_for_answers(tmp_path / "x")):
        with pytest.raises(ExportError, match="holds an unfinished export"):
            read()
    (tmp_path / "x" / IN_PROGRESS).unlink()
    meta = json.loads((tmp_path / "x" / EXPORT_FILE).read_text())
    (tmp_path / "x" / EXPORT_FILE).write_text(json.dumps({**meta, "client": 99}))
    with pytest.raises(ValueError, match="client '99' is not one of its run's clients 0..1"):
        load_model(tmp_path / "x")
    # a failed export leaves none of the folders it made, OUT's parents included
    with pytest.raises(ExportError):
        export_model(runs["fedit"], tmp_path / "p1" / "p2" / "out", client=9)
    assert not (tmp_path / "p1").exists()


def test_export_errors_speak_of_exporting_not_resuming(runs, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(runs["fedit"], copy)
    for f in (copy / "checkpoints").glob("state*.pt"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="has no readable checkpoint .*, so there is no model to export") as told:
        export_model(copy, tmp_path / "o")
    assert "--overwrite" not in str(told.value) and "resumed" not in str(told.value)


@pytest.mark.parametrize("method", ["hetlora", "flexlora"])
def test_a_lower_rank_clients_adapter_is_written_at_its_own_rank(tmp_path, method):
    """A rank-r_i client's adapters were written at r_max with zero components (HetLoRA's truncation, FlexLoRA's
    padding): exact, but a serving engine reserved r_max for it. They are written at r_i, lora_alpha = its scaling
    times r_i, the same model: PEFT's logits and every ΔW of the vllm form match fedmoe's own."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = _run(tmp_path, method, f"algorithm.name={method}", "algorithm.budgets.ranks=[4,2]", "lora.rank=4")
    loaded, ours = _ours(run, 1)
    assert export_model(run, tmp_path / "p", client=1) == ("peft", [])
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    scaling = next(m.scaling for m in loaded.mm.model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling"))
    assert cfg["r"] == 2 and cfg["lora_alpha"] == pytest.approx(scaling * 2)
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, tmp_path / "p")), ours, rtol=0, atol=2e-4)
    assert export_model(run, tmp_path / "v", client=1, form="vllm") == ("vllm", [])
    vcfg = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "v" / "adapter_model.safetensors"))
    assert vcfg["r"] == 2 and all(t.shape[0] == 2 for k, t in tensors.items() if k.endswith("lora_A.weight"))
    q = next(n for n, m in loaded.mm.model.named_modules() if n.endswith("self_attn.q_proj") and hasattr(m, "lora_A"))
    mod = dict(loaded.mm.model.named_modules())[q]
    delta = vcfg["lora_alpha"] / vcfg["r"] * tensors[f"base_model.model.{q}.lora_B.weight"] @ \
        tensors[f"base_model.model.{q}.lora_A.weight"]
    torch.testing.assert_close(delta, mod.delta_weight().float(), rtol=0, atol=1e-6)
    # the client at the full rank keeps it
    export_model(run, tmp_path / "p0", client=0)
    assert json.loads((tmp_path / "p0" / "adapter_config.json").read_text())["r"] == 4


def test_a_failed_export_leaves_a_finished_one_beside_it(tmp_path):
    """Two exports into sibling folders under a parent neither found: the first made the parent, and its failure
    removed the parent with the second's finished export in it. It removes its own folder, then the parents it
    made only while they are empty."""
    from fedmoe.export import _claim, _release

    first, second = tmp_path / "new" / "deeper" / "c0", tmp_path / "new" / "deeper" / "c1"
    made_first = _claim(first)
    assert made_first == tmp_path / "new"
    made_second = _claim(second)
    assert made_second == second
    (second / "model.safetensors").write_bytes(b"x")
    _release(second, made_second, written=True)
    _release(first, made_first, written=False)
    assert not first.exists() and (second / "model.safetensors").is_file()
    _release(second, tmp_path / "new", written=False)  # alone now: its parents go with it
    assert not (tmp_path / "new").exists()
