"""From a :class:`fedmoe.config.DataConfig` and the run seed to every client's train/val/test data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from ..seeds import NumpyStream, numpy_rng
from .partition import category_histogram, format_histogram_table, partition, split_client
from .sources import DataError, Example, load_examples, source_name
from .tasks import as_choice, concept_shift, label_set, relabel

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["ClientData", "FederatedData", "answer_options", "prepare_client_data", "prepare_federated_data",
           "resolve_labels"]


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
    labels: list[str] | None = None  # a label task's label set
    heldout: list[Example] = field(default_factory=list)  # data.heldout: the shared test examples
    # data.concept_shift: each client's group and each group's label map
    groups: list[int] | None = None
    label_maps: list[dict[str, str]] | None = None


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
        fm = {**cfg.field_map, **cfg.field_maps.get(src, {})}
        try:
            res = load_examples(src, field_map=fm or None, on_bad_row=cfg.on_bad_row,
                                hf_split=cfg.hf_split, revision=cfg.revision)
        except DataError as e:
            if len(sources) > 1 and cfg.field_map and src not in cfg.field_maps:  # a map for another source's names
                raise DataError(f"{e} (data.field_map applies to every source in data.source: give this one its own "
                                f"entries, data.field_maps: {{{src}: {{...}}}})") from None
            raise
        if not res.examples:
            raise DataError(f"data source {src!r} gave no usable examples ({res.skipped} bad rows skipped)")
        examples.extend(res.examples)
        skipped += res.skipped
        reasons.update(res.skipped_reasons)
    return examples, skipped, dict(reasons), names


def _filter_and_subsample(cfg: DataConfig, examples: list[Example], seed: int) -> list[Example]:
    """``cfg.dedupe``: drop rows repeating an earlier row's instruction and input; keep ``cfg.categories`` (unknown
    names raise :class:`DataError`), then subsample ``max_examples``."""
    if cfg.dedupe:
        seen: set[tuple[str, str]] = set()
        unique = []
        for ex in examples:
            key = (ex.instruction.strip(), ex.input.strip())
            if key not in seen:
                seen.add(key)
                unique.append(ex)
        examples = unique

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


def labelled(cfg: DataConfig, examples: list[Example]) -> tuple[list[Example], list[str] | None]:
    """A label task's examples in their prompt form and its label set (others: as they are, None)."""
    if "label" not in cfg.field_map:
        return examples, None
    labels = label_set(examples, cfg.labels)
    return as_choice(examples, labels, cfg.label_instruction, cfg.label_text_chars), labels


def hold_out(examples: list[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(the rest, ``n`` held-out examples balanced over the categories: each category in turn gives
    one, from a seeded shuffle, until ``n`` are taken or the categories run out)."""
    if n <= 0:
        return examples, []
    if n >= len(examples):
        raise DataError(f"data.heldout = {n} leaves none of the {len(examples)} examples for the clients: lower it")
    rng = numpy_rng(seed, NumpyStream.HELDOUT)
    pools: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        pools.setdefault(ex.category, []).append(i)
    queues = {c: [idx[int(j)] for j in rng.permutation(len(idx))] for c, idx in sorted(pools.items())}
    taken: list[int] = []
    while len(taken) < n:
        for c in queues:
            if queues[c] and len(taken) < n:
                taken.append(queues[c].pop())
    held = set(taken)
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _client(cfg: DataConfig, examples: list[Example], part, seed: int, cid: int,
            label_map: dict[str, str] | None = None) -> ClientData:
    """Client ``cid``'s train/val/test from its examples (``part``: their indices), with the caps,
    relabelled by its concept-shift group's ``label_map``."""
    tr, va, te = split_client(part, cfg.split, seed=seed, client=cid)
    if cfg.max_train_per_client is not None:
        tr = tr[: cfg.max_train_per_client]
    if cfg.max_test_per_client is not None:
        te = te[: cfg.max_test_per_client]
    if cfg.max_val_per_client is not None:
        va = va[: cfg.max_val_per_client]
    train, val, test = ([examples[i] for i in idx] for idx in (tr, va, te))
    if label_map is not None:
        train, val, test = relabel(train, label_map), relabel(val, label_map), relabel(test, label_map)
    return ClientData(id=cid, train=train, val=val, test=test, category_counts=_counts(train))


def _counts(examples: list[Example]) -> dict[str, int]:
    return dict(sorted(Counter(ex.category for ex in examples).items()))


def _shift(cfg: DataConfig, labels: list[str] | None, seed: int):
    if cfg.concept_shift is None:
        return None, None
    return concept_shift(cfg.concept_shift, labels, cfg.partition.num_clients, seed)


def prepare_client_data(cfg: DataConfig, seed: int, client: int, path: str) -> tuple[ClientData, int]:
    """One client's data from its own file (a client of a real deployment, whose data never leaves
    it): the whole file is this client's, filtered and subsampled as ``cfg`` says and split into
    train/val/test seeded by ``(seed, client)``. Returns (its data, bad rows skipped while loading).
    A label task needs the run's label set in ``cfg.labels`` (every client must answer from the same)."""
    if cfg.pool_train:
        raise DataError("data.pool_train (the centralised bound) pools every client's training data: it cannot run "
                        "with clients that bring their own data files")
    if "label" in cfg.field_map and cfg.labels is None:
        raise DataError("a label task with clients' own data files needs the label set in data.labels (every client "
                        "must answer from the same labels): list them in the config")
    examples, skipped, _, _ = _load_all(cfg, [path])
    examples = _filter_and_subsample(cfg, examples, seed)
    examples, labels = labelled(cfg, examples)
    groups, maps = _shift(cfg, labels, seed)
    label_map = None if maps is None else maps[groups[client]]
    return _client(cfg, examples, range(len(examples)), seed, client, label_map), skipped


def _before_partitioning(cfg: DataConfig) -> str:
    """What took examples away before the partition saw them, said after a partition's error (which counts only
    what was left: a source or a category they emptied looks absent)."""
    steps = [f"data.{k} = {v}" for k, v in (("categories", cfg.categories), ("max_examples", cfg.max_examples),
                                            ("heldout", cfg.heldout or None)) if v is not None]
    return (f" (counted after {', '.join(steps)} took examples away before partitioning: a source or category they "
            "emptied is not there)") if steps else ""


def prepare_federated_data(cfg: DataConfig, seed: int) -> FederatedData:
    """Load, filter, subsample, partition and split the data of a run.

    1. load every ``cfg.source`` (a list is concatenated in the given order); ``cfg.dedupe``: drop each row whose
       instruction and input an earlier row has;
    2. keep only ``cfg.categories`` when set (unknown names raise :class:`DataError`);
    3. subsample ``cfg.max_examples`` examples (seeded, original order kept);
    4. a label task: the label set (``cfg.labels`` or the data's) and every example's prompt form;
    5. hold out ``cfg.heldout`` examples (balanced over the categories, seeded) as the shared test set;
    6. partition across ``cfg.partition.num_clients`` clients (seeded by ``seed``);
    7. split each client into train/val/test by ``cfg.split`` (seeded by ``(seed, client)``);
    8. keep the first ``cfg.max_train_per_client`` / ``cfg.max_val_per_client`` / ``cfg.max_test_per_client`` of
       the seeded train / val / test parts;
    9. ``cfg.concept_shift``: relabel each client's examples by its group's label map;
    10. ``cfg.pool_train``: every client trains on the union of the clients' training sets.
    """
    examples, skipped, reasons, names = _load_all(cfg)
    examples = _filter_and_subsample(cfg, examples, seed)
    examples, labels = labelled(cfg, examples)
    examples, heldout = hold_out(examples, cfg.heldout, seed)
    pc = cfg.partition
    try:
        parts = partition(examples, pc.scheme, pc.num_clients, seed, alpha=pc.alpha, categories=pc.categories,
                          shards_per_client=pc.shards_per_client, dirichlet_mode=pc.dirichlet_mode)
    except DataError as e:
        raise DataError(f"{e}{_before_partitioning(cfg)}") from None
    groups, maps = _shift(cfg, labels, seed)
    clients = [_client(cfg, examples, part, seed, cid, None if maps is None else maps[groups[cid]])
               for cid, part in enumerate(parts)]
    if cfg.pool_train:
        pool = [ex for c in clients for ex in c.train]
        for c in clients:
            c.train, c.category_counts = list(pool), _counts(pool)

    train_hist = category_histogram(
        [ex for c in clients for ex in c.train],
        _consecutive_parts([len(c.train) for c in clients]),
    )
    return FederatedData(
        clients=clients,
        histogram_markdown=format_histogram_table(train_hist),
        skipped=skipped,
        skipped_reasons=reasons,
        num_examples=len(examples) + len(heldout),
        unassigned=len(examples) - sum(len(p) for p in parts),
        sources=names,
        labels=labels,
        heldout=heldout,
        groups=groups,
        label_maps=maps,
    )


def resolve_labels(cfg):
    """``cfg`` (a ``RunConfig``) with a label task's label set in ``data.labels``, read from the data
    when it is None, so that the run's config.yaml fixes it (and a resume or a client with its own
    file uses the same); other configs unchanged."""
    d = cfg.data
    if "label" not in d.field_map or d.labels is not None:
        return cfg
    examples = _filter_and_subsample(d, _load_all(d)[0], cfg.seed)
    return cfg.model_copy(update={"data": d.model_copy(update={"labels": label_set(examples)})})


def answer_options(cfg) -> list[tuple[str, ...]]:
    """The distinct option lists a choice task's examples are scored over (``cfg``: a ``RunConfig``): a label
    task's label set (``data.labels``, else read from the data), or every distinct ``options`` field of the
    examples the run draws its test sets from; [] for a task without options."""
    d = cfg.data
    if "label" in d.field_map:
        return [tuple(resolve_labels(cfg).data.labels)]
    if "options" not in d.field_map:
        return []
    return list(dict.fromkeys(ex.options for ex in _filter_and_subsample(d, _load_all(d)[0], cfg.seed)
                              if ex.options is not None))


def _consecutive_parts(sizes: list[int]) -> list[list[int]]:
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out
