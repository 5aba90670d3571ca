"""From a :class:`fedmoe.config.DataConfig` and the run seed to every client's train/val/test data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from ..seeds import NumpyStream, numpy_rng
from .partition import category_histogram, format_histogram_table, partition, split_client
from .sources import DataError, Example, load_examples, source_name

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["ClientData", "FederatedData", "prepare_client_data", "prepare_federated_data"]


@dataclass
class ClientData:
    """One client's data. ``category_counts`` counts the categories of ``train`` (after the cap)."""

    id: int
    train: list[Example]
    val: list[Example]
    test: list[Example]
    category_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class FederatedData:
    """Everything the federation runtime needs from the data side.

    ``histogram_markdown`` tabulates the categories of the clients' training sets (after the caps). ``skipped`` counts
    the bad rows dropped while loading (``data.on_bad_row: skip``); ``unassigned`` counts the
    examples the partition gave to no client (only the ``pathological`` scheme leaves some out).
    """

    clients: list[ClientData]
    histogram_markdown: str
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    num_examples: int = 0  # after category filter and subsampling, before partitioning
    unassigned: int = 0
    sources: list[str] = field(default_factory=list)


def _load_all(cfg: DataConfig, sources=None) -> tuple[list[Example], int, dict[str, int], list[str]]:
    if sources is None:
        sources = [cfg.source] if isinstance(cfg.source, str) else list(cfg.source)
    if not sources:
        raise DataError("data.source is an empty list; name at least one source")
    names = [source_name(s) for s in sources]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(
            f"data.source lists several sources named {dup} (a source is named after its file); "
            "give each source a distinct file name"
        )
    examples: list[Example] = []
    skipped = 0
    reasons: Counter[str] = Counter()
    for src in sources:
        res = load_examples(src, field_map=cfg.field_map or None, on_bad_row=cfg.on_bad_row)
        if not res.examples:
            raise DataError(f"data source {src!r} gave no usable examples ({res.skipped} bad rows skipped)")
        examples.extend(res.examples)
        skipped += res.skipped
        reasons.update(res.skipped_reasons)
    return examples, skipped, dict(reasons), names


def _filter_and_subsample(cfg: DataConfig, examples: list[Example], seed: int) -> list[Example]:
    """Keep ``cfg.categories`` (unknown names raise :class:`DataError`), then subsample ``max_examples``."""

    if cfg.categories is not None:
        known = sorted({ex.category for ex in examples})
        unknown = [c for c in cfg.categories if c not in known]
        if unknown:
            raise DataError(f"data.categories names unknown categories {unknown}; known categories: {', '.join(known)}")
        keep = set(cfg.categories)
        examples = [ex for ex in examples if ex.category in keep]
        if not examples:
            raise DataError("data.categories keeps no examples")

    if cfg.max_examples is not None and cfg.max_examples < len(examples):
        rng = numpy_rng(seed, NumpyStream.DATA_SUBSAMPLE)
        chosen = sorted(int(i) for i in rng.choice(len(examples), size=cfg.max_examples, replace=False))
        examples = [examples[i] for i in chosen]

    return examples


def _client(cfg: DataConfig, examples: list[Example], part, seed: int, cid: int) -> ClientData:
    """Client ``cid``'s train/val/test from its examples (``part``: their indices), with the caps."""
    tr, va, te = split_client(part, cfg.split, seed=seed, client=cid)
    if cfg.max_train_per_client is not None:
        tr = tr[: cfg.max_train_per_client]
    if cfg.max_test_per_client is not None:
        te = te[: cfg.max_test_per_client]
    train = [examples[i] for i in tr]
    return ClientData(id=cid, train=train, val=[examples[i] for i in va], test=[examples[i] for i in te],
                      category_counts=dict(sorted(Counter(ex.category for ex in train).items())))


def prepare_client_data(cfg: DataConfig, seed: int, client: int, path: str) -> tuple[ClientData, int]:
    """One client's data from its own file (a client of a real deployment, whose data never leaves
    it): the whole file is this client's, filtered and subsampled as ``cfg`` says and split into
    train/val/test seeded by ``(seed, client)``. Returns (its data, bad rows skipped while loading)."""
    examples, skipped, _, _ = _load_all(cfg, [path])
    examples = _filter_and_subsample(cfg, examples, seed)
    return _client(cfg, examples, range(len(examples)), seed, client), skipped


def prepare_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Load, filter, subsample, partition and split the data of a run.

    1. load every ``cfg.source`` (a list is concatenated in the given order);
    2. keep only ``cfg.categories`` when set (unknown names raise :class:`DataError`);
    3. subsample ``cfg.max_examples`` examples (seeded, original order kept);
    4. partition across ``cfg.partition.num_clients`` clients (seeded by ``seed``);
    5. split each client into train/val/test by ``cfg.split`` (seeded by ``(seed, client)``);
    6. keep the first ``cfg.max_train_per_client`` / ``cfg.max_test_per_client`` of the seeded
       train / test parts.
    """
    examples, skipped, reasons, names = _load_all(cfg)
    examples = _filter_and_subsample(cfg, examples, seed)
    pc = cfg.partition
    parts = partition(examples, pc.scheme, pc.num_clients, seed, alpha=pc.alpha, categories=pc.categories)

    clients = [_client(cfg, examples, part, seed, cid) for cid, part in enumerate(parts)]

    train_hist = category_histogram(
        [ex for c in clients for ex in c.train],
        _consecutive_parts([len(c.train) for c in clients]),
    )
    return FederatedData(
        clients=clients,
        histogram_markdown=format_histogram_table(train_hist),
        skipped=skipped,
        skipped_reasons=reasons,
        num_examples=len(examples),
        unassigned=len(examples) - sum(len(p) for p in parts),
        sources=names,
    )


def _consecutive_parts(sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out
