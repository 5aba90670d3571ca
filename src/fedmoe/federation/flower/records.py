"""fedmoe messages as Flower records, and back, exactly.

A :class:`~fedmoe.messages.Message` travels as a Flower ``RecordDict``: its tensors in an
``ArrayRecord`` (bfloat16, which Flower's arrays cannot hold, as its int16 bit pattern, the dtype
named beside it), its scalars in a ``MetricRecord``, its header in a ``ConfigRecord``. Anything else
a side reports (metrics with lists, the client's data description, generated examples) goes as one
JSON string.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ...messages import Message

BITCAST = {torch.bfloat16: torch.int16}  # dtypes numpy lacks: sent as their bits


def to_records(msg: Message | None, info: dict | None = None):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    rd = RecordDict()
    if msg is not None:
        arrays, dtypes = {}, {}
        for name, t in msg.tensors.items():
            t = t.detach().cpu().contiguous()
            if t.dtype in BITCAST:
                dtypes[name] = str(t.dtype).removeprefix("torch.")
                t = t.view(BITCAST[t.dtype])
            arrays[name] = Array(t.numpy())
        rd["tensors"] = ArrayRecord(array_dict=arrays)
        rd["scalars"] = MetricRecord(dict(msg.scalars))
        rd["header"] = ConfigRecord({"json": json.dumps(msg.header), "dtypes": json.dumps(dtypes)})
    if info is not None:
        rd["info"] = ConfigRecord({"json": json.dumps(info)})
    return rd


def from_records(rd) -> tuple[Message | None, dict]:
    """(the fedmoe message or None, the info dict) of a Flower RecordDict."""
    info = json.loads(rd["info"]["json"]) if "info" in rd else {}
    if "tensors" not in rd:
        return None, info
    dtypes = json.loads(rd["header"]["dtypes"])
    bitcast = {str(d).removeprefix("torch."): d for d in BITCAST}
    tensors = {}
    for name, arr in rd["tensors"].items():
        t = torch.from_numpy(np.array(arr.numpy(), copy=True))
        if name in dtypes:
            if dtypes[name] not in bitcast or t.dtype != BITCAST[bitcast[dtypes[name]]]:
                raise ValueError(f"tensor {name!r}: a dtype {str(dtypes[name])[:40]!r} over {t.dtype} bits is not one "
                                 f"that travels bit-cast ({sorted(bitcast)})")
            t = t.view(bitcast[dtypes[name]])
        tensors[name] = t
    return Message(tensors=tensors, scalars=dict(rd["scalars"]), header=json.loads(rd["header"]["json"])), info


def jsonable(x):
    """Tensors as nested lists, so a report can travel as JSON."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
