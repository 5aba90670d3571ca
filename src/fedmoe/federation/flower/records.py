"""fedmoe messages as Flower records, and back, exactly.

A :class:`~fedmoe.messages.Message` travels as a Flower ``RecordDict``: its tensors in an
``ArrayRecord`` (bfloat16, which Flower's arrays cannot hold, as its int16 bit pattern, the dtype
named beside it), its scalars in a ``MetricRecord``, its header in a ``ConfigRecord``. Anything else
a side reports (metrics with lists, the client's data description, generated examples) goes as one
JSON string. A second message may ride along (``also``: an evaluation's global model beside the
client's own), under ``also.``-prefixed records; a tensor it shares with the first, name and value,
travels once.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ...messages import Message

BITCAST = {torch.bfloat16: torch.int16}  # dtypes numpy lacks: sent as their bits


ALSO = "also."  # the records of a second message in the same RecordDict


def to_records(msg: Message | None, info: dict | None = None, also: Message | None = None):
    """``also``: a second message (needs ``msg``); its tensors equal to ``msg``'s of the same name are not sent
    again (:func:`also_from_records` takes them from ``msg``)."""
    from flwr.app import RecordDict

    rd = RecordDict()
    if msg is not None:
        _put(rd, "", msg)
    if also is not None:
        if msg is None:
            raise ValueError("a second message rides only beside a first")
        shared = sorted(n for n, t in also.tensors.items() if n in msg.tensors and _same(t, msg.tensors[n]))
        _put(rd, ALSO, Message(tensors={n: t for n, t in also.tensors.items() if n not in shared},
                               scalars=also.scalars, header=also.header), shared)
    if info is not None:
        from flwr.app import ConfigRecord

        rd["info"] = ConfigRecord({"json": json.dumps(info)})
    return rd


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor to the bit (torch.equal alone takes -0.0 for 0.0). A method's downlinks often hold the global
    tensors themselves: those are the same without reading them."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu(), b.detach().cpu()
    return bool(torch.equal(a, b)) and (not a.is_floating_point() or bool(torch.equal(a.signbit(), b.signbit())))


def _put(rd, prefix: str, msg: Message, shared: list[str] | None = None) -> None:
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    arrays, dtypes = {}, {}
    for name, t in msg.tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype in BITCAST:
            dtypes[name] = str(t.dtype).removeprefix("torch.")
            t = t.view(BITCAST[t.dtype])
        arrays[name] = Array(t.numpy())
    rd[prefix + "tensors"] = ArrayRecord(array_dict=arrays)
    rd[prefix + "scalars"] = MetricRecord(dict(msg.scalars))
    header = {"json": json.dumps(msg.header), "dtypes": json.dumps(dtypes)}
    if shared is not None:
        header["shared"] = json.dumps(shared)
    rd[prefix + "header"] = ConfigRecord(header)


def from_records(rd, expect: dict[str, tuple[int, ...] | None] | None = None) -> tuple[Message | None, dict]:
    """(the fedmoe message or None, the info dict) of a Flower RecordDict. ``expect``: the tensors the message may
    hold, name -> shape (None: any); one outside it, or of another shape, is refused (a ValueError) from the
    array's header, before its bytes are decoded (a hostile reply's 256 MiB extra tensor would cost twice that
    again decoded and copied, only to be refused by the reply's check)."""
    info = json.loads(rd["info"]["json"]) if "info" in rd else {}
    if "tensors" not in rd:
        return None, info
    return _get(rd, "", expect), info


def also_from_records(rd, msg: Message) -> Message | None:
    """The second message of a RecordDict (:func:`to_records`' ``also``), or None; ``msg``: its first, which
    holds the tensors the two share."""
    if ALSO + "tensors" not in rd:
        return None
    try:
        also = _get(rd, ALSO)
        shared = json.loads(rd[ALSO + "header"].get("shared", "[]"))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the second message's records are malformed ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(shared, list) or any(not isinstance(n, str) or n not in msg.tensors for n in shared):
        raise ValueError(f"the second message names shared tensors the first does not hold: {str(shared)[:200]}")
    if set(shared) & set(also.tensors):
        raise ValueError(f"the second message holds tensors it also names as shared: {sorted(set(shared) & set(also.tensors))[:5]}")
    return Message(tensors={**{n: msg.tensors[n].clone() for n in shared}, **also.tensors}, scalars=also.scalars,
                   header=also.header)


def _get(rd, prefix: str, expect: dict[str, tuple[int, ...] | None] | None = None) -> Message:
    dtypes = json.loads(rd[prefix + "header"]["dtypes"])
    bitcast = {str(d).removeprefix("torch."): d for d in BITCAST}
    arrays = rd[prefix + "tensors"]
    if expect is not None:
        for name, arr in arrays.items():
            if name not in expect:
                raise ValueError(f"a tensor {str(name)[:100]!r} the method does not expect ({len(arr.data)} bytes, "
                                 "refused unread)")
            if expect[name] is not None and tuple(arr.shape) != tuple(expect[name]):
                raise ValueError(f"{str(name)[:100]} is {tuple(arr.shape)[:8]}, the method expects "
                                 f"{tuple(expect[name])} (refused unread)")
    tensors = {}
    for name, arr in arrays.items():
        t = torch.from_numpy(np.array(arr.numpy(), copy=True))
        if name in dtypes:
            if dtypes[name] not in bitcast or t.dtype != BITCAST[bitcast[dtypes[name]]]:
                raise ValueError(f"tensor {name!r}: a dtype {str(dtypes[name])[:40]!r} over {t.dtype} bits is not one "
                                 f"that travels bit-cast ({sorted(bitcast)})")
            t = t.view(bitcast[dtypes[name]])
        tensors[name] = t
    return Message(tensors=tensors, scalars=dict(rd[prefix + "scalars"]),
                   header=json.loads(rd[prefix + "header"]["json"]))


def jsonable(x):
    """Tensors as nested lists, so a report can travel as JSON."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x
