"""Settings a run would not read (fedmoe.config.unread_settings): each rule is checked against the code that would
read the value — a value is called unread exactly when changing it leaves the computation as it was — and a new
single run refuses them, a sweep refuses those no point reads and names the points that ignore the others."""

import subprocess
import sys

import pytest
import torch
import yaml
from helpers import built, reply

from fedmoe.algorithms import METHODS, get_method, model_spec
from fedmoe.algorithms.flame import COUNTS, TOKENS
from fedmoe.algorithms.server_opt import ServerOptimizerConfig, server_update
from fedmoe.algorithms.server_opt import unread as optimizer_unread
from fedmoe.config import ConfigError, load_config, unread_settings
from fedmoe.messages import Message, Reply
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config


def _keys(cfg) -> set[str]:
    return {k for k, _ in unread_settings(cfg)}


# ------------------------------------------------------------------- each rule against what reads the value
PERTURBED = {"momentum": 0.5, "beta1": 0.5, "beta2": 0.5, "tau": 0.3, "convention": "flower"}


def _two_rounds(cfg: ServerOptimizerConfig) -> dict:
    gen = torch.Generator().manual_seed(0)
    g = {"w": torch.randn(6, generator=gen, dtype=torch.float64)}
    state: dict = {}
    for rnd in (1, 2):
        avg = {"w": g["w"] + 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)}
        g, state = server_update(cfg, g, avg, state, round_idx=rnd)
    return g


@pytest.mark.parametrize("name", ["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("convention", ["reddi", "flower"])
def test_a_server_optimizer_setting_is_unread_exactly_when_its_update_ignores_it(name, convention):
    """Every key of every optimizer under both conventions: perturbed, the two rounds' result changes iff the key is
    not listed. Catches a rule that lists FedAdagrad's β1 under reddi (read there), or leaves FedAvgM's β2 out."""
    base = ServerOptimizerConfig(name=name, convention=convention)
    ref = _two_rounds(base)
    for key, value in PERTURBED.items():
        if key == "convention" and convention == "flower":
            continue
        cfg = base.model_copy(update={key: value})
        changed = not torch.equal(_two_rounds(cfg)["w"], ref["w"])
        listed = f"algorithm.server_optimizer.{key}" in {k for k, _ in optimizer_unread(cfg)}
        assert listed == (not changed), (name, convention, key, changed)


ROBUST = ["model.name=builtin:tiny-olmoe", "lora.rank=2", "data.partition.num_clients=5", "lora.experts=false"]


def _robust(*sets):
    cfg = load_config(None, ROBUST + list(sets))
    method = get_method(cfg.algorithm.name)
    server = method.server(cfg, model_spec(cfg, method))
    g = server.initial_global()
    gen = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in g.items()}
    # along one direction at 0, 1, 2, 10, 10.5: Krum picks the second with f = 1 and the third with f = 0, a trimmed
    # mean cutting one from each end differs from one cutting two
    replies = [Reply(i, Message({k: v + 0.01 * c * direction[k] for k, v in g.items()}, {"n_train": 10 * (i + 1)}))
               for i, c in enumerate((0.0, 1.0, 2.0, 10.0, 10.5))]
    from fedmoe.federation.robust import robust_aggregate

    new, _, _ = robust_aggregate(server, cfg, g, server.initial_server_state(g), replies, 1)
    return cfg, new


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "krum"])
def test_a_robust_setting_is_unread_exactly_when_its_rule_ignores_it(rule):
    _, ref = _robust(f"federation.robust.rule={rule}")
    for key, value in (("trim", 0.4), ("krum_malicious", 0), ("krum_keep", 3)):
        cfg, new = _robust(f"federation.robust.rule={rule}", f"federation.robust.{key}={value}")
        changed = any(not torch.equal(new[n], ref[n]) for n in ref)
        assert (f"federation.robust.{key}" in _keys(cfg)) == (not changed), (rule, key, changed)


BUDGET_CASES = [
    ["algorithm.budgets.top_k=[1]"],
    ["algorithm.budgets.ranks=[3, 2]"],
    ["algorithm.budgets.assign=map", "algorithm.budgets.map=[1, 1, 0, 0]"],
    ["algorithm.budgets.map=[1, 1, 0, 0]"],  # under assign: uniform
    ["algorithm.budgets.assign=distribution", "algorithm.budgets.probs=[0, 0, 0, 1]"],
]


@pytest.fixture(scope="module")
def tiny_model():
    return MoEModel.from_config(tiny_config("olmoe"))


def _profile(cfg, mm) -> list[tuple[int, int]]:
    half = METHODS[cfg.algorithm.name].client(cfg)
    return [(half.top_k(c, mm), half.rank(c, {})) for c in range(cfg.data.partition.num_clients)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_budget_key_is_unread_exactly_when_no_clients_k_or_rank_changes(method, tiny_model):
    """Each method's clients' (k_i, r_i) with and without each budget change: a key is listed iff they stay the
    same. Catches FLAME listed as not reading top_k, the smallest-rank baseline as reading the assignment."""
    base = [f"algorithm.name={method}", "model.name=builtin:tiny-olmoe", "lora.rank=8", "data.partition.num_clients=4"]
    if method == "flex":
        base.append("lora.router=false")
    ref = _profile(load_config(None, base), tiny_model)
    for sets in BUDGET_CASES:
        cfg = load_config(None, base + sets)
        changed = _profile(cfg, tiny_model) != ref
        keys = {s.split("=")[0] for s in sets}
        listed = keys & _keys(cfg)
        assert listed == (set() if changed else keys), (method, sets, changed, listed)


def _fcmoe(*sets):
    cfg = load_config(None, ["algorithm.name=fcmoe", "lora.rank=2", "data.partition.num_clients=3", *sets])
    mm = MoEModel.from_config(tiny_config("olmoe"))
    server, _, _ = built(METHODS["fcmoe"], cfg, mm)
    g = server.initial_global()
    gen = torch.Generator().manual_seed(0)
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in g.items()} for _ in range(3)]
    states[2] = {k: v - sum(s[k] - v for s in states[:2]) for k, v in g.items()}  # a conflicting update
    replies = [reply(c, {**t, COUNTS: torch.randint(1, 50, (2, 8), generator=gen), TOKENS: torch.tensor([60, 60])}, n)
               for c, (t, n) in enumerate(zip(states, (3, 5, 2)))]
    new, _, _ = server.aggregate(g, server.initial_server_state(g), replies, round_idx=1)
    return cfg, new


@pytest.mark.parametrize("switches", [["algorithm.fcmoe.importance=n"], ["algorithm.fcmoe.importance=n_f_t"],
                                      ["algorithm.fcmoe.projection=false"], []])
def test_an_fcmoe_setting_is_unread_exactly_when_the_aggregation_ignores_it(switches):
    _, ref = _fcmoe(*switches)
    for key, value in (("temperature", 3.0), ("threshold", 0.5), ("space", "dense")):
        cfg, new = _fcmoe(*switches, f"algorithm.fcmoe.{key}={value}")
        changed = any(not torch.allclose(new[n], ref[n], rtol=0, atol=1e-12) for n in ref)
        assert (f"algorithm.fcmoe.{key}" in _keys(cfg)) == (not changed), (switches, key, changed)


# --------------------------------------------------------------------------------- the rules read from code
@pytest.mark.parametrize("unread,read,key", [
    (["train.aux_loss_coef=0.1"], ["train.aux_loss=true", "train.aux_loss_coef=0.1"], "train.aux_loss_coef"),
    (["algorithm.name=flame", "algorithm.flame.rescaler=static", "algorithm.flame.rescaler_lr=0.1"],
     ["algorithm.name=flame", "algorithm.flame.rescaler_lr=0.1"], "algorithm.flame.rescaler_lr"),
    (["algorithm.name=flame", "algorithm.flame.rescaler=none", "algorithm.flame.rescaler_init=ratio"],
     ["algorithm.name=flame", "algorithm.flame.rescaler_init=ratio"], "algorithm.flame.rescaler_init"),
    (["algorithm.name=hetlora", "algorithm.hetlora.prune_gamma=0.5"],
     ["algorithm.name=hetlora", "algorithm.hetlora.prune_gamma=0.5", "algorithm.hetlora.prune_lambda=0.1"],
     "algorithm.hetlora.prune_gamma"),
    (["algorithm.name=flex", "lora.router=false", "lora.experts_per_layer=1"],
     ["algorithm.name=scaffold", "lora.experts_per_layer=1"], "lora.experts_per_layer"),
    (["algorithm.name=flex", "lora.router=false", "algorithm.flex.train_full=true", "algorithm.flex.graft_rank=4"],
     ["algorithm.name=flex", "lora.router=false", "algorithm.flex.graft_rank=4"], "algorithm.flex.graft_rank"),
    (["algorithm.name=flex", "lora.router=false", "algorithm.flex.train_full=true", "lora.expert_layout=split"],
     ["algorithm.name=flex", "lora.router=false", "lora.expert_layout=split"], "lora.expert_layout"),
    (["lora.experts=false", "lora.expert_layout=split"], ["lora.expert_layout=split"], "lora.expert_layout"),
    (["federation.round_timeout_s=60"], ["federation.runtime=flower-sim", "federation.round_timeout_s=60"],
     "federation.round_timeout_s"),
    (["federation.max_inflight=2"], ["federation.runtime=flower", "federation.max_inflight=2"],
     "federation.max_inflight"),
    (["federation.runtime=flower", "federation.simulation.client_cpus=2"],
     ["federation.runtime=flower-sim", "federation.simulation.client_cpus=2"], "federation.simulation.client_cpus"),
    (["eval.share_examples=true"], ["federation.runtime=flower-sim", "eval.share_examples=true"],
     "eval.share_examples"),
    (["eval.choice_normalize=sum"], ["eval.task=choice", "data.field_map={label: category}", "eval.choice_normalize=sum"],
     "eval.choice_normalize"),
    (["eval.task=choice", "data.field_map={label: category}", "eval.rouge_tokenizer=unicode"],
     ["eval.rouge_tokenizer=unicode"], "eval.rouge_tokenizer"),
    (["eval.rouge=false", "eval.rouge_tokenizer=unicode"], ["eval.rouge_tokenizer=unicode"], "eval.rouge_tokenizer"),
    (["eval.mmlu_max_per_subject=2"], ["eval.mmlu=quick", "eval.mmlu_max_per_subject=2"], "eval.mmlu_max_per_subject"),
    (["data.max_val_per_client=10"], ["eval.val_loss=true", "data.max_val_per_client=10"], "data.max_val_per_client"),
])
def test_each_rule_names_the_key_only_where_nothing_reads_it(unread, read, key):
    assert key in _keys(load_config(None, unread))
    assert key not in _keys(load_config(None, read))


def test_the_default_config_and_every_shipped_single_run_config_read_all_they_set():
    from fedmoe.config import shipped_configs

    assert unread_settings(load_config(None)) == []
    for path in sorted(shipped_configs().glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if "sweep" not in tree and "model" in tree and "pretrain" not in path.name:
            assert unread_settings(load_config(path)) == [], path


# ----------------------------------------------------------------------------------- where it is refused
def test_a_single_run_is_refused_before_anything_is_written(tmp_path):
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", "--set", f"output_dir={tmp_path}",
           "--set", "algorithm.server_optimizer.name=fedavgm", "--set", "algorithm.server_optimizer.beta2=0.5",
           "--set", "federation.robust={rule: median, trim: 0.3}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    msg = " ".join((out.stdout + out.stderr).split())
    assert "algorithm.server_optimizer.beta2 = 0.5 (algorithm.server_optimizer.name 'fedavgm' has no beta2)" in msg
    assert "federation.robust.trim = 0.3 (federation.robust.rule is 'median', not trimmed_mean)" in msg
    assert list(tmp_path.iterdir()) == []  # no run directory
    from fedmoe.federation.entry import start_run

    cfg = load_config(None, [f"output_dir={tmp_path}", "train.aux_loss_coef=0.5"])
    with pytest.raises(ConfigError, match=r"train\.aux_loss_coef = 0\.5 \(train\.aux_loss is false"):
        start_run(cfg)  # the library's entry too
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_refuses_what_no_point_reads_and_names_the_points_that_ignore_the_rest(tmp_path):
    from fedmoe.federation.sweep import check_unread, expand_sweep

    def sweep(base):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({"model": {"name": "builtin:tiny-olmoe"}, **base,
                                        "sweep": {"algorithm.name": ["fedit", "flame"]}}))
        return path, expand_sweep(path)[2]

    path, configs = sweep({"algorithm": {"budgets": {"ranks": [8, 4]}}})  # neither fedit nor FLAME reads ranks
    with pytest.raises(ConfigError, match=r"no point of this sweep would read algorithm\.budgets\.ranks"):
        check_unread(path, configs)
    path, configs = sweep({"algorithm": {"budgets": {"top_k": [2, 1]}}})  # FLAME reads it, fedit does not
    # the same sweep narrowed from the command line to its fedit point: the key is for the points left out
    assert check_unread(path, configs[:1], narrowed=True) == [
        "note: algorithm.budgets.top_k changes nothing in 1 of the 1 sweep points (name=fedit): "
        "algorithm.name fedit takes no client's k (activated experts) from the budgets"]
    assert check_unread(path, configs) == ["note: algorithm.budgets.top_k changes nothing in 1 of the 2 sweep points (name=fedit): "
                     "algorithm.name fedit takes no client's k (activated experts) from the budgets"]
