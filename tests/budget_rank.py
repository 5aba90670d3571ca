"""One rank of tests/test_node_budget.py's check that ranks training a client together (``fedmoe worker --nproc``)
follow rank 0's reading of the node's privacy ledger. ``late``: the other ranks' own reading of the ledger would
refuse (another process of the node recorded a release just after rank 0 read it); ``early``: it would admit
(rank 0 read a ledger with no share left). Writes what this rank did to ``rank-<r>.json``."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fedmoe.federation.flower.budget import BudgetRefusal, PrivacyLedger
from fedmoe.federation.flower.client import ClientCache
from fedmoe.federation.flower.records import to_records
from fedmoe.train import Parallel

if __name__ == "__main__":
    work, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if rank:
        def other_reading(*args, **kwargs):
            if mode == "late":
                raise BudgetRefusal("this rank's reading: no share left")
            return 0.0

        PrivacyLedger.check = other_reading
    msg = torch.load(work / "train.pt", weights_only=False)
    options = {"fedmoe-config": (work / "config.yaml").read_text()}
    cache = ClientCache(Parallel(rank, dist.get_world_size()))
    try:
        cache.reply("train", to_records(msg.with_header(run_id="run-a"), None), options,
                    json.loads((work / "node.json").read_text()))
        did = "trained"
    except BudgetRefusal as e:
        did = f"refused: {e}"
    (work / f"rank-{rank}.json").write_text(json.dumps(did))
    dist.barrier()  # neither rank tears the group down while the other may still be reading its last message
    dist.destroy_process_group()
