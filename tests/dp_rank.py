"""One rank of tests/test_worker.py's data-parallel check: trains the tiny OLMoE with
``train_local(parallel=...)`` (gloo, ranks started by the test) and, on rank 0, saves the result."""

import sys

import torch
import torch.distributed as dist

from fedmoe.algorithms.base import Objective
from fedmoe.config import TrainConfig
from fedmoe.moe import MoEModel
from fedmoe.moe.tiny import tiny_config
from fedmoe.train import Parallel, train_local

EXAMPLES = [{"input_ids": list(range(2 + i, 12 + 2 * i)), "labels": [-100] * 3 + list(range(5 + i, 12 + 2 * i))}
            for i in range(10)]
CFG = TrainConfig(max_steps=3, batch_size=3, grad_accum=2, lr=1e-2, grad_clip=0.5)


def model():
    mm = MoEModel.from_config(tiny_config("olmoe"))
    torch.manual_seed(0)
    mm.add_expert_lora(4, 8)
    mm.add_attention_lora(4, 8)
    return mm


def objective(mm):
    """A loss term on every trainable (FedProx-like), counted once however many ranks train."""
    anchor = {n: p.detach().clone() + 0.01 for n, p in mm.trainable_parameters().items()}
    return Objective(loss_terms=[lambda ps: 5.0 * sum(((ps[n] - anchor[n]) ** 2).sum() for n in ps)],
                     mean_gradient=True)


def run(parallel):
    torch.set_num_threads(1)
    mm = model()
    initial = {n: t.clone() for n, t in mm.get_state().items()}
    res = train_local(mm, EXAMPLES, CFG, pad_id=0, lr=1e-2, seed=7, objective=objective(mm), parallel=parallel)
    return {"draws_seed": torch.initial_seed(), "loss": res.loss, "tokens": res.tokens, "counts": res.activation_counts, "per_layer": res.tokens_per_layer,
            "update": {n: t - initial[n] for n, t in mm.get_state().items()}, "mean_gradient": res.mean_gradient}


if __name__ == "__main__":
    out = sys.argv[1]
    if out.endswith("single.pt"):
        torch.save(run(None), out)
    else:
        dist.init_process_group("gloo")
        res = run(Parallel(dist.get_rank(), dist.get_world_size()))
        torch.save(res, out.replace(".pt", f"-{dist.get_rank()}.pt"))
        dist.barrier()  # neither rank tears the group down while the other may still be reading its last message
        dist.destroy_process_group()
