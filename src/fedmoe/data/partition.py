"""Splitting a data set across federated clients, and each client's data into train/val/test.

All randomness comes from ``numpy.random.default_rng`` generators built from the run seed (never
from a global RNG), so the same seed always gives the same partition. Partitions are lists of
indices into the example list; each client's index list is sorted ascending.

Schemes (docs/methods.md, "Data"):

``iid``
    A seeded shuffle cut into ``num_clients`` near-equal parts (sizes differ by at most one).

``dirichlet``
    Label skew over ``Example.category``. Two formulations are in common use; ``partition``
    implements both and uses the first by default:

    * ``dirichlet_mode="client"`` (default: the per-client mixture of FLAME and FLEx). Every
      client i draws a category mixture ``p_i ~ Dir(α·1_C)`` over the C categories present, and
      gets a near-equal share of the examples (sizes as in ``iid``). The examples are dealt out
      one slot at a time, the slots of all clients interleaved in a seeded random order: the slot's
      client draws a category from its ``p_i`` restricted to the categories that still have
      unassigned examples (renormalised; if its whole mass lies on exhausted categories it draws in
      proportion to the remaining counts) and takes the next example of that category from a
      seeded shuffle. Every example is assigned exactly once, clients have near-equal sizes, and
      every client has at least one example whenever ``num_clients <= len(examples)``. Because
      category pools run out, a client's realised mixture is ``p_i`` pulled towards the global
      one; with a large α every client ends up close to the global mixture, with a small α each
      client is dominated by one or two categories.
    * Both modes refuse data with a single category (``Dir(α)`` over one category is ``[1.0]``
      for every client, so the split would silently be an even random one): map a category field
      (``data.field_map``) or use ``iid``.
    * ``dirichlet_mode="category"`` (Yurochkin et al. 2019's per-category split; FedML / Shepherd style; Hsu et al.
      2019 draw a per-client mixture, as the client mode does, from Dir(α·p) with p the global mixture). For each category
      (in sorted order) ``q_c ~ Dir(α·1_N)`` over the clients and the category's shuffled examples
      are cut at ``floor(cumsum(q_c) * n_c)``. Client sizes vary too. If a client ends up empty the
      whole draw is repeated (same generator, so still deterministic) up to 100 times; after that
      each empty client gets the last example of the currently largest client (lowest id on ties).

``pathological``
    One category per client: ``categories`` (one name per client) or else the ``num_clients``
    most frequent categories ordered by count (descending), then name. Client i gets *all*
    examples of category i; examples of other categories are left out of the partition.

``shards``
    The pathological non-IID split of McMahan et al. (2017): the examples, in a seeded random order,
    sorted by category (stably), are cut into ``num_clients * shards_per_client`` near-equal shards,
    and each client gets ``shards_per_client`` of them at random. With 2 shards per client a client
    holds one or two categories (more only where a shard straddles a category boundary). Every
    example is assigned exactly once.

``source``
    One source per client: the distinct ``Example.source`` values in sorted order; client i gets
    every example of source i. The number of sources must equal ``num_clients``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ..rundir import md_cell
from ..seeds import NumpyStream, numpy_rng
from .sources import DataError, Example

__all__ = [
    "SCHEMES",
    "category_histogram",
    "format_histogram_table",
    "partition",
    "split_client",
    "split_sizes",
]

SCHEMES = ("iid", "dirichlet", "pathological", "shards", "source")

_MAX_REDRAWS = 100


# ----------------------------------------------------------------------------------------------
# partitions


def _near_equal_sizes(n: int, k: int) -> np.ndarray:
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    return sizes


def _partition_iid(n: int, k: int, rng: np.random.Generator) -> list[list[int]]:
    perm = rng.permutation(n)
    return [sorted(int(i) for i in part) for part in np.array_split(perm, k)]


def _category_pools(examples: Sequence[Example], rng: np.random.Generator) -> tuple[list[str], list[np.ndarray]]:
    by_cat: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_cat.setdefault(ex.category, []).append(i)
    cats = sorted(by_cat)
    pools = [rng.permutation(np.asarray(by_cat[c], dtype=np.int64)) for c in cats]
    return cats, pools


def _dirichlet_client(examples: Sequence[Example], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    n = len(examples)
    cats, pools = _category_pools(examples, rng)
    c = len(cats)
    mix = rng.dirichlet(np.full(c, alpha), size=k)  # (k, c): p_i per client
    owners = np.repeat(np.arange(k), _near_equal_sizes(n, k))
    rng.shuffle(owners)
    draws = rng.random(n)

    remaining = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(c, dtype=np.int64)

    def cumulative() -> np.ndarray:
        return np.cumsum(mix * (remaining > 0), axis=1)

    cums = cumulative()
    parts: list[list[int]] = [[] for _ in range(k)]
    for slot in range(n):
        owner = owners[slot]
        row = cums[owner]
        total = row[-1]
        if not (total > 0 and math.isfinite(total)):
            row = np.cumsum(remaining.astype(np.float64))
            total = row[-1]
        cat = int(np.searchsorted(row, draws[slot] * total, side="right"))
        if cat >= c or remaining[cat] == 0:  # floating-point edge: take the last available category
            cat = int(np.flatnonzero(remaining > 0)[-1])
        parts[owner].append(int(pools[cat][taken[cat]]))
        taken[cat] += 1
        remaining[cat] -= 1
        if remaining[cat] == 0:
            cums = cumulative()
    return [sorted(p) for p in parts]


def _dirichlet_category(examples: Sequence[Example], k: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = []
    for _ in range(_MAX_REDRAWS):
        _, pools = _category_pools(examples, rng)
        parts = [[] for _ in range(k)]
        for pool in pools:
            q = rng.dirichlet(np.full(k, alpha))
            cuts = (np.cumsum(q) * len(pool)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(pool, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if all(parts):
            break
    for client in range(k):  # fix-up after too many redraws
        if not parts[client]:
            donor = max(range(k), key=lambda j: (len(parts[j]), -j))
            parts[client].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def _pathological(examples: Sequence[Example], k: int, categories: Sequence[str] | None) -> list[list[int]]:
    counts = Counter(ex.category for ex in examples)
    known = sorted(counts)
    if categories is None:
        if k > len(counts):
            raise DataError(
                f"pathological partition needs one category per client: {k} clients but only "
                f"{len(counts)} categories ({', '.join(known)}); lower data.partition.num_clients"
            )
        chosen = [cat for cat, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
    else:
        chosen = list(categories)
        unknown = [cat for cat in chosen if cat not in counts]
        if unknown:
            raise DataError(
                f"data.partition.categories names unknown categories {unknown}; known categories: {', '.join(known)}"
            )
        if len(chosen) != k:
            raise DataError(
                f"data.partition.categories has {len(chosen)} entries but num_clients is {k}; give one category per client"
            )
        dup = sorted({cat for cat in chosen if chosen.count(cat) > 1})
        if dup:
            raise DataError(f"data.partition.categories lists {dup} more than once; give each client its own category")
    slot = {cat: i for i, cat in enumerate(chosen)}
    parts: list[list[int]] = [[] for _ in range(k)]
    for i, ex in enumerate(examples):
        j = slot.get(ex.category)
        if j is not None:
            parts[j].append(i)
    return parts


def _shards(examples: Sequence[Example], k: int, per_client: int, rng: np.random.Generator) -> list[list[int]]:
    n = len(examples)
    if per_client < 1:
        raise DataError(f"shards_per_client must be >= 1, got {per_client}")
    count = k * per_client
    if count > n:
        raise DataError(f"the shards partition cuts {n} examples into {k} x {per_client} = {count} shards: too "
                        "few examples (lower data.partition.num_clients or shards_per_client)")
    perm = rng.permutation(n)
    order = sorted((int(i) for i in perm), key=lambda i: examples[i].category)
    shards = np.array_split(np.asarray(order, dtype=np.int64), count)
    owner = rng.permutation(count)
    return [sorted(int(i) for j in owner[c * per_client : (c + 1) * per_client] for i in shards[j]) for c in range(k)]


def _by_source(examples: Sequence[Example], k: int) -> list[list[int]]:
    sources = sorted({ex.source for ex in examples})
    if len(sources) != k:
        raise DataError(
            f"the 'source' partition gives one source per client: {len(sources)} sources "
            f"({', '.join(sources)}) but num_clients is {k}; set data.partition.num_clients: {len(sources)} "
            "or list one data.source per client"
        )
    slot = {s: i for i, s in enumerate(sources)}
    parts: list[list[int]] = [[] for _ in range(k)]
    for i, ex in enumerate(examples):
        parts[slot[ex.source]].append(i)
    return parts


def partition(
    examples: Sequence[Example],
    scheme: Literal["iid", "dirichlet", "pathological", "shards", "source"],
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    categories: Sequence[str] | None = None,
    dirichlet_mode: Literal["client", "category"] = "client",
    shards_per_client: int = 2,
) -> list[list[int]]:
    """Assign example indices to ``num_clients`` clients (see the module docstring).

    Returns one sorted index list per client. Every index appears at most once; for ``iid``,
    ``dirichlet``, ``shards`` and ``source`` every index appears exactly once, for ``pathological`` exactly the
    examples of the chosen categories are assigned.
    """
    if scheme not in SCHEMES:
        raise DataError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    n = len(examples)
    if n == 0:
        raise DataError("cannot partition an empty data set (check data.source and data.categories)")
    if scheme == "pathological":
        return _pathological(examples, num_clients, categories)
    if scheme == "source":
        return _by_source(examples, num_clients)
    if num_clients > n:
        raise DataError(
            f"cannot give {num_clients} clients at least one example each: only {n} examples "
            "(lower data.partition.num_clients or raise data.max_examples)"
        )
    rng = numpy_rng(seed)  # the partition itself: no stream
    if scheme == "iid":
        return _partition_iid(n, num_clients, rng)
    if scheme == "shards":
        return _shards(examples, num_clients, shards_per_client, rng)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DataError(f"the Dirichlet concentration alpha must be a positive number, got {alpha}")
    cats = sorted({ex.category for ex in examples})
    if len(cats) == 1:  # Dir(alpha) over one category is [1.0] for every client: an even random split
        raise DataError(
            f"data.partition.scheme: dirichlet skews categories across clients, but the data has one category "
            f"({cats[0]!r}): the split would be an even random one. Map a category field in the data with "
            "data.field_map (e.g. {category: task}), or set data.partition.scheme: iid"
        )
    if dirichlet_mode == "client":
        return _dirichlet_client(examples, num_clients, alpha, rng)
    if dirichlet_mode == "category":
        return _dirichlet_category(examples, num_clients, alpha, rng)
    raise DataError(f"unknown dirichlet_mode {dirichlet_mode!r}; choose 'client' or 'category'")


# ----------------------------------------------------------------------------------------------
# per-client train / val / test


def split_sizes(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> tuple[int, int, int]:
    """Sizes of train/val/test for ``n`` items.

    Largest-remainder rounding: each part first gets ``floor(n * f)``, the left-over items go to
    the parts with the largest fractional remainders (ties: train, then val, then test). Then, if
    ``n >= 1`` and train came out empty, one item moves to train from the larger of val and test
    (from val on a tie). Examples with 0.8/0.1/0.1: 100 -> 80/10/10, 9 -> 7/1/1, 5 -> 4/1/0,
    2 -> 2/0/0, 1 -> 1/0/0.
    """
    if len(fractions) != 3:
        raise DataError(f"split needs three fractions (train, val, test), got {list(fractions)}")
    fr = [float(f) for f in fractions]
    if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be >= 0 and sum to 1, got {fr}")
    exact = [n * f for f in fr]
    base = [int(math.floor(x + 1e-9)) for x in exact]
    left = n - sum(base)
    order = sorted(range(3), key=lambda i: (-(exact[i] - base[i]), i))
    for i in order[: max(left, 0)]:
        base[i] += 1
    train, val, test = base
    if n >= 1 and train == 0:
        if val >= test:
            val -= 1
        else:
            test -= 1
        train = 1
    return train, val, test


def split_client(
    indices: Sequence[int],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    client: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle one client's indices and cut them into (train, val, test).

    The shuffle uses a generator derived from ``(seed, client)``, so clients are shuffled
    independently and reproducibly. The parts keep the shuffled order (taking the first N of a
    part is a seeded random subsample). Sizes follow :func:`split_sizes`.
    """
    n_train, n_val, _ = split_sizes(len(indices), fractions)
    rng = numpy_rng(seed, NumpyStream.DATA_SPLIT, client)
    items = list(indices)
    shuffled = [items[int(i)] for i in rng.permutation(len(items))]
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


# ----------------------------------------------------------------------------------------------
# reporting


def category_histogram(examples: Sequence[Example], parts: Sequence[Sequence[int]]) -> dict[int, dict[str, int]]:
    """client -> category -> count; every client lists every category seen in any part (0 if none)."""
    counts = [Counter(examples[i].category for i in part) for part in parts]
    cats = sorted(set().union(*counts)) if counts else []
    return {client: {cat: c.get(cat, 0) for cat in cats} for client, c in enumerate(counts)}


def format_histogram_table(hist: dict[int, dict[str, int]]) -> str:
    """Markdown table: one row per client, one column per category, a total column and a total row."""
    cats = sorted({cat for row in hist.values() for cat in row})
    header = ["client", *[md_cell(cat) if cat else "(none)" for cat in cats], "total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    col_totals = dict.fromkeys(cats, 0)
    for client in sorted(hist):
        row = hist[client]
        vals = [row.get(cat, 0) for cat in cats]
        for cat, v in zip(cats, vals):
            col_totals[cat] += v
        lines.append("| " + " | ".join([str(client), *map(str, vals), str(sum(vals))]) + " |")
    totals = [col_totals[cat] for cat in cats]
    lines.append("| " + " | ".join(["total", *map(str, totals), str(sum(totals))]) + " |")
    return "\n".join(lines)
