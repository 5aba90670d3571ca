"""FLEx: personalisation by grafting one pretrained expert per layer (SPEC.md §3).

Setup: shared LoRA on the attention projections; every pretrained expert, router and shared expert
frozen. Before round 1 each client grafts, per MoE layer, the expert that best reproduces the
layer's routed output on its own calibration data, behind a sigmoid gate initialised from that
expert's router row. Private (never sent): the grafted experts' LoRA (or full weights), the gates,
the chosen expert ids. Payload: the shared attention LoRA and n_i; aggregation: FedAvg by n_i (or a
server optimizer); downlink: the averaged attention LoRA.
"""

from __future__ import annotations

import torch

from ..data.tokenize import collate_sft
from ..moe import MoEModel
from ..moe.graft import attach_grafts, score_experts
from .base import Algorithm, Payload, State, weighted_average
from .server_opt import server_update

GRAFT_INDEX = "__graft_index__"


class FLEx(Algorithm):
    name = "flex"
    personalized = True

    def setup(self, mm: MoEModel) -> None:
        lc, fc = self.cfg.lora, self.cfg.algorithm.flex
        if lc.attention_targets is None or lc.attention_targets:
            mm.add_attention_lora(lc.rank, lc.alpha, lc.attention_targets, lc.dropout)
        self.grafts = attach_grafts(mm, fc.num_grafts, rank=fc.graft_rank or lc.rank, alpha=lc.alpha,
                                    train_full=fc.train_full, gate=fc.gate)
        names = mm.trainable_names()
        self.private_names = [n for n in names if ".mlp.grafted." in n]
        self.shared_names = [n for n in names if n not in self.private_names]
        if not self.shared_names:
            raise ValueError("FLEx shares the attention LoRA: set lora.attention_targets (null = q, k, v, o)")
        self.mm = mm
        self.placeholder = {n: torch.zeros_like(t) for n, t in mm.get_state(self.private_names).items()}
        self.graft_scores: dict[int, list[list[float]]] = {}

    # grafting: one-shot, before round 1 --------------------------------------------------
    def _calibration_batches(self, calibration: list[dict]) -> list[dict]:
        fc = self.cfg.algorithm.flex
        if fc.calibration == "general":
            calibration = general_calibration(self.cfg.model.tokenizer or self.cfg.model.name,
                                              self.cfg.data.max_length, fc.calibration_size)
        examples = calibration[: fc.calibration_size]
        if not examples:
            raise ValueError("FLEx grafting needs calibration examples: this client has no training data")
        pad = self.cfg_pad_id()
        return [collate_sft(examples[i : i + 8], pad) for i in range(0, len(examples), 8)]

    def cfg_pad_id(self) -> int:
        return int(getattr(self.mm.config, "pad_token_id", None) or 0)

    def init_private(self, client_id: int, mm: MoEModel, calibration: list[dict] | None = None) -> State:
        for g in self.grafts:
            g.enabled = False  # score the pretrained model alone
        stats: dict = {}
        chosen, scores = score_experts(mm, self._calibration_batches(calibration or []),
                                       self.cfg.algorithm.flex.num_grafts, stats=stats)
        self.setup_stats[client_id] = stats
        for g, experts in zip(self.grafts, chosen):
            g.init_from(experts)  # gates from router rows; LoRA A random (seeded by the runtime), B zero
        self.graft_scores[client_id] = scores.tolist()
        private = mm.get_state(self.private_names)
        private[GRAFT_INDEX] = torch.tensor(chosen, dtype=torch.long)
        return private

    def prepare_client(self, mm: MoEModel, client_id: int | None, private: State | None = None) -> None:
        if client_id is None or not private:
            for g in self.grafts:  # the global model: no personal experts
                g.enabled = False
            return
        for g, experts in zip(self.grafts, private[GRAFT_INDEX].tolist()):
            g.enabled = True
            g.source.copy_(torch.tensor(experts, dtype=torch.long))

    def client_model_state(self, global_state: State, private: State, client_id: int | None) -> State:
        tensors = {n: t for n, t in private.items() if n != GRAFT_INDEX} if client_id is not None else self.placeholder
        return {**self.downlink(global_state, client_id), **tensors}

    # the four decisions ------------------------------------------------------------------
    def downlink(self, global_state: State, client_id: int | None) -> State:
        return {n: global_state[n] for n in self.shared_names}

    def payload(self, client_id, trained, n_train, activation_counts=None, tokens_per_layer=None) -> Payload:
        return Payload(client_id, {n: trained[n] for n in self.shared_names}, n_train)

    def private_after_training(self, client_id: int, trained: State, private: State, **context) -> State:
        return {**{n: trained[n].clone() for n in self.private_names}, GRAFT_INDEX: private[GRAFT_INDEX]}

    def aggregate(self, global_state: State, payloads: list[Payload], server_state: dict):
        shared = {n: global_state[n] for n in self.shared_names}
        averaged = weighted_average([p.tensors for p in payloads], [p.n_train for p in payloads])
        new_shared, server_state = server_update(self.cfg.algorithm.server_optimizer, shared, averaged, server_state)
        return {**global_state, **new_shared}, server_state


def general_calibration(tokenizer_name: str, max_length: int, n: int) -> list[dict]:
    """The non-personalised ablation: the same general text for every client (the held-out split of
    the built-in model's pretraining corpus, not Dolly), tokenised with the run's tokenizer."""
    from ..moe import load_tokenizer
    from ..pretrain import PretrainConfig, load_corpus

    _, held = load_corpus(PretrainConfig())
    tok = load_tokenizer(tokenizer_name)
    out = []
    for text in held[:n]:
        ids = tok(text, add_special_tokens=False)["input_ids"][:max_length]
        out.append({"input_ids": ids, "labels": ids})
    return out
