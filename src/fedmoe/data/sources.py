"""Loading instruction data into :class:`Example` records.

A *source* is one of

* ``"dolly"`` (or ``"builtin:dolly"``): the databricks-dolly-15k copy shipped in the package;
* a path to a ``.json`` file (a JSON list of objects; a file that is really JSON Lines is also
  accepted), a ``.jsonl`` file (one object per line), either of them gzip-compressed
  (``.json.gz`` / ``.jsonl.gz``), or a ``.parquet`` file (needs ``pyarrow``);
* a Hugging Face hub dataset id such as ``"databricks/databricks-dolly-15k"``, read through the
  ``datasets`` package when it is installed.

Every record is mapped onto our fields with a *field map*: ``our field -> the file's field``.
The defaults are :data:`DOLLY_FIELD_MAP` for Dolly and the identity map (Alpaca format:
``instruction / input / output / category``) for everything else; a user map overrides single
entries of the default one.

``instruction`` and ``output`` are required and ``output`` must not be blank; ``input`` is
optional (missing -> ``""``) and so is ``category`` (missing or blank -> the source name, i.e. the
file name without its data suffixes, so that a category-less file such as Alpaca still forms one
labelled group). Two more fields are read only when the field map names them:

* ``label`` (a classification task, e.g. ``{label: category}`` on Dolly: predict the request's
  category): ``instruction`` (the text) and ``label`` are required, ``output`` is not read, and the
  label becomes the example's output and category (so partitions skew labels).
  :func:`fedmoe.data.tasks.as_choice` later puts the run's label set into the prompt;
* ``options`` (a multiple-choice task with per-example options, as MMLU): a list of at least two
  texts, one of which is the ``output``.

A row that breaks these rules is a *bad row*: with ``on_bad_row="error"`` it
raises :class:`DataError` saying where it is and how to fix it, with ``"skip"`` it is counted in
:attr:`LoadResult.skipped` and dropped.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal

__all__ = [
    "DEFAULT_FIELD_MAP",
    "DOLLY_FIELD_MAP",
    "OPTIONAL_FIELDS",
    "OUR_FIELDS",
    "REQUIRED_FIELDS",
    "DataError",
    "Example",
    "LoadResult",
    "builtin_path",
    "load_examples",
    "source_name",
]


class DataError(ValueError):
    """A user-fixable problem with a data source or a data request."""


@dataclass(frozen=True)
class Example:
    """One instruction-following record."""

    instruction: str
    input: str
    output: str
    category: str
    source: str
    # a label task (data.field_map.label): the example's label (its output and category too)
    label: str | None = None
    # the answer options of a choice task (the run's label set, or the file's own per-example list);
    # the right one is ``output``
    options: tuple[str, ...] | None = None


@dataclass
class LoadResult:
    """What :func:`load_examples` read: the examples and how many rows were dropped (and why)."""

    examples: list[Example]
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)


OUR_FIELDS = ("instruction", "input", "output", "category", "label", "options")
REQUIRED_FIELDS = ("instruction", "output")
# read only when the field map names them: a label (a classification task: the label is the answer
# and the category) and per-example answer options (a list of texts; the output is the right one)
OPTIONAL_FIELDS = ("label", "options")

DOLLY_FIELD_MAP: dict[str, str] = {
    "instruction": "instruction",
    "input": "context",
    "output": "response",
    "category": "category",
}
DEFAULT_FIELD_MAP: dict[str, str] = {f: f for f in OUR_FIELDS if f not in OPTIONAL_FIELDS}

# Shipped data sets: name -> file inside the fedmoe package.
_BUILTINS: dict[str, str] = {
    "dolly": "assets/data/dolly-15k/databricks-dolly-15k.jsonl.gz",
}
_BUILTIN_FIELD_MAPS: dict[str, dict[str, str]] = {"dolly": DOLLY_FIELD_MAP}
# Hub ids whose records use Dolly's field names.
_DOLLY_HUB_IDS = {"databricks/databricks-dolly-15k"}

_DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"  # data.source: hf:ORG/NAME, a Hugging Face hub dataset (the datasets library)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Other names under which the fields are commonly found, used only for hints in error messages.
_ALIASES = {
    "instruction": ("prompt", "question", "query", "instruction"),
    "input": ("context", "input"),
    "output": ("response", "answer", "completion", "output"),
    "category": ("category", "label", "task"),
    "label": ("label", "labels", "class", "category", "target"),
    "options": ("options", "choices", "candidates"),
}

_FIX = "set data.on_bad_row: skip to drop such rows, or data.field_map to map your field names"


# ----------------------------------------------------------------------------------------------
# names and paths


def _builtin_key(source: str) -> str | None:
    key = source[len("builtin:"):] if source.startswith("builtin:") else source
    return key if key in _BUILTINS else None


def builtin_path(name: str) -> Path:
    """Path of a shipped data set (``"dolly"``) inside the installed package."""
    key = _builtin_key(name)
    if key is None:
        raise DataError(f"unknown built-in data set {name!r}; built-in: {', '.join(sorted(_BUILTINS))}")
    res = importlib.resources.files("fedmoe") / _BUILTINS[key]
    path = Path(str(res))
    if not path.is_file():
        raise DataError(f"the built-in data set {key!r} is missing from the installation (expected {path})")
    return path


def source_name(source: str) -> str:
    """The name examples of ``source`` carry in :attr:`Example.source`.

    ``"dolly"`` for the shipped copy, the file name without its data suffixes for a file
    (``data/alpaca_5000.json.gz`` -> ``alpaca_5000``), and the part after the last ``/`` for a hub id.
    """
    key = _builtin_key(source)
    if key is not None:
        return key
    name = Path(source).name
    low = name.lower()
    for suf in _DATA_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def _resolve_field_map(default: dict[str, str], user: dict[str, str] | None) -> dict[str, str]:
    fm = dict(default)
    for ours, theirs in (user or {}).items():
        if ours not in OUR_FIELDS:
            raise DataError(
                f"data.field_map has unknown key {ours!r}; the keys are our field names "
                f"({', '.join(OUR_FIELDS)}) and the values the field names in your file"
            )
        if not isinstance(theirs, str) or not theirs:
            raise DataError(f"data.field_map.{ours} must be a non-empty field name, got {theirs!r}")
        fm[ours] = theirs
    return fm


# ----------------------------------------------------------------------------------------------
# raw record readers: yield (location text, record or _BadJSON)


class _BadJSON:
    def __init__(self, msg: str):
        self.msg = msg


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _parse(text: str) -> Any:
    """``json.loads``, with what it raises besides JSONDecodeError — nesting deeper than Python's recursion
    limit, an integer of more than 4300 digits — as a JSONDecodeError-like ``ValueError`` message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _utf8(raw: bytes, where: str) -> str:
    """``raw`` as text (a byte-order mark at its start dropped, as Windows tools write one); a byte that is not
    UTF-8 raises ``UnicodeDecodeError`` with ``where`` and its position said in its reason."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UnicodeDecodeError("utf-8", raw, e.start, e.end,
                                 f"byte 0x{raw[e.start]:02x} at {where}line {line}, column {col} is not UTF-8 "
                                 "(save the file as UTF-8)") from None


def _iter_jsonl_lines(lines: Iterator[bytes]) -> Iterator[tuple[str, Any]]:
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield f"line {lineno}", _BadJSON(f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not UTF-8 "
                                             "(save the file as UTF-8)")
            continue
        try:
            yield f"line {lineno}", _parse(line)
        except json.JSONDecodeError as e:
            yield f"line {lineno}", _BadJSON(f"not valid JSON ({e.msg} at column {e.colno})")
        except ValueError as e:  # nested too deeply, an integer too long to read
            yield f"line {lineno}", _BadJSON(f"not valid JSON ({str(e).split(';')[0]})")


def _read_json_or_jsonl(path: Path, jsonl: bool) -> Iterator[tuple[str, Any]]:
    try:
        with _open_binary(path) as fh:
            if jsonl:
                yield from _iter_jsonl_lines(fh)
                return
            raw = fh.read()
        text = _utf8(raw, "")
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read the file: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: {e.reason}") from None
    try:
        data = _parse(text)
    except json.JSONDecodeError as e:
        first = text.lstrip().split("\n", 1)[0]
        if e.msg == "Extra data" and _one_value(first):
            # Many ".json" instruction files are really JSON Lines: their first line is a whole value.
            yield from _iter_jsonl_lines(iter(text.encode("utf-8").splitlines()))
            return
        more = (" after the first JSON value ended: the file holds more than one (files joined together?)"
                if e.msg == "Extra data" else "")
        raise DataError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}{more}); a .json source "
            "must hold a list of objects (use .jsonl for one object per line)"
        ) from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        hint = f" (it is an object; the records may be under {lists[0]!r}: save that list alone)" if lists else ""
        raise DataError(f"{path}: the top level of a .json source must be a list of records{hint}")
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level of a .json source must be a list of records")
    for i, rec in enumerate(data):
        yield f"record {i + 1}", rec  # counted from 1, as lines are


def _one_value(line: str) -> bool:
    try:
        _parse(line)
    except ValueError:  # JSONDecodeError included
        return False
    return True


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet files needs the pyarrow package: pip install pyarrow "
            "(or convert the file to .jsonl)"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types
        raise DataError(f"{path}: cannot read the parquet file: {e}") from None
    for i, rec in enumerate(rows):
        yield f"record {i + 1}", rec  # counted from 1, as lines are


def _datasets_module(source: str):
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        extra = " (or use source: dolly, the copy shipped with fedmoe)" if source in _DOLLY_HUB_IDS else ""
        raise DataError(
            f"data source {source!r} is a Hugging Face dataset, which needs the 'datasets' package: "
            f"pip install 'fedmoe[hf]' (or download the data as a .json/.jsonl/.parquet file and give its "
            f"path as data.source){extra}"
        ) from None
    return datasets


def _pick_split(datasets, ds, source: str, split: str):
    """The ``split`` of a DatasetDict (a Dataset as it is)."""
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data source {source!r} has the splits {sorted(ds)}, not {split!r}: set data.hf_split")
        return ds[split]
    return ds


def _hub_failure_advice(dataset_id: str, error: BaseException) -> str:
    """What to do after ``datasets.load_dataset`` failed with ``error``: a dataset the hub does not have (or will
    not show) asks for another spelling or a login; anything else (offline mode included) for a local copy."""
    if "NotFound" in type(error).__name__ or isinstance(error, FileNotFoundError):
        return (f"the hub has no dataset {dataset_id!r} that this machine may read: check ORG/NAME (spelling and case) "
                f"at https://huggingface.co/datasets/{dataset_id}, and data.revision / data.hf_split if set; a gated or "
                "private dataset needs `huggingface-cli login` (or HF_TOKEN) first")
    return ("offline, only a dataset already in the Hugging Face cache loads: download it as a .json/.jsonl/.parquet "
            "file or save it with Dataset.save_to_disk and give its path as data.source")


def _read_hub(dataset_id: str, split: str = "train", revision: str | None = None,
              note: str = "") -> Iterator[tuple[str, Any]]:
    datasets = _datasets_module(dataset_id)
    try:
        ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001
        raise DataError(
            f"{note}cannot load hub dataset {dataset_id!r} (split {split!r}, revision {revision!r}; "
            f"{type(e).__name__}: {e}); {_hub_failure_advice(dataset_id, e)}"
        ) from None
    for i, rec in enumerate(ds):
        yield f"record {i + 1}", rec  # counted from 1, as lines are


def _read_dataset_dir(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of
    .parquet or .arrow files (read as one dataset)."""
    datasets = _datasets_module(str(path))
    saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or \
        (path / "state.json").is_file()
    try:
        if saved:
            ds = _pick_split(datasets, datasets.load_from_disk(str(path)), str(path), split)
        else:
            kinds = {p.suffix for p in path.rglob("*") if p.suffix in (".parquet", ".arrow")}
            if len(kinds) != 1:
                raise DataError(f"data source {str(path)!r} is a directory without a saved dataset (dataset_info.json "
                                "from save_to_disk) or .parquet / .arrow files of one kind; give a .json/.jsonl/"
                                ".parquet file or such a folder")
            ds = datasets.load_dataset(kinds.pop()[1:], data_dir=str(path), split=split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read the dataset folder {str(path)!r} ({type(e).__name__}: {e})") from None
    for i, rec in enumerate(ds):
        yield f"record {i + 1}", rec  # counted from 1, as lines are


# ----------------------------------------------------------------------------------------------
# record -> Example


def _text(value: Any) -> str | None:
    """Field value as text; None for values that are not text (lists, objects)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _not_a_value(raw: Any, text: str) -> str | None:
    """Why a field's value, read as ``text``, is no text to train on, or None: a NaN or infinite number (how
    pandas writes a gap in a numeric column: it would become the answer or the class "nan"), or a string with a
    lone UTF-16 surrogate (JSON's "\\ud83d" without its pair: half of an emoji, no character; the tokenizer
    would fail on it mid-run)."""
    if isinstance(raw, float) and not math.isfinite(raw):
        return f"is {raw}, not a value (a gap in the column?)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds {text[e.start:e.end]!r} at character {e.start}: half of a UTF-16 surrogate pair (a broken "
                "emoji?), which is no character")
    return None


def _hint_for_missing(ours: str, rec: dict, fm: dict[str, str] | None = None) -> str:
    """A field map for this row: the missing field's likely name and every other field the prompt template or
    the categories use that the row has under another name (a Dolly row also needs ``input: context``, or its
    context would be silently dropped)."""
    fm = fm or {}
    suggest = {}
    for name in ("instruction", "input", "output", "category"):
        if name != ours and fm.get(name, name) in rec:
            continue
        alias = next((a for a in _ALIASES.get(name, ()) if a in rec and a != name), None)
        if alias is not None:
            suggest[name] = alias
    if ours not in suggest:
        return ""
    return f" (the row has {', '.join(repr(a) for a in suggest.values())}: set data.field_map: {{" + ", ".join(
        f"{k}: {v}" for k, v in suggest.items()) + "})"


def _convert(rec: Any, fm: dict[str, str], name: str) -> tuple[Example | None, str, str]:
    """-> (example, reason key, detail). example is None for a bad row."""
    if isinstance(rec, _BadJSON):
        return None, "invalid JSON", rec.msg
    if not isinstance(rec, dict):
        return None, "not an object", f"is a {type(rec).__name__}, not an object with named fields"
    labelled = "label" in fm
    required = ("instruction", "label") if labelled else REQUIRED_FIELDS  # a label task needs no output
    vals: dict[str, str] = {}
    for ours in OUR_FIELDS:
        if ours == "options" or ours not in fm or (labelled and ours == "output"):
            continue
        theirs = fm[ours]
        raw = rec.get(theirs)
        if raw is None:
            if ours in required:
                if theirs in rec:
                    return None, f"field '{theirs}' null", f"field {theirs!r} ({ours}) is null"
                present = ", ".join(sorted(map(str, rec))) or "none"
                return (
                    None,
                    f"missing field '{theirs}'",
                    f"has no field {theirs!r} (needed for {ours}; its fields: {present})"
                    + _hint_for_missing(ours, rec, fm),
                )
            vals[ours] = ""
            continue
        text = _text(raw)
        if text is None:
            return None, f"field '{theirs}' not text", f"field {theirs!r} ({ours}) is a {type(raw).__name__}, not text"
        why = _not_a_value(raw, text)
        if why:
            return None, f"field '{theirs}' not a value", f"field {theirs!r} ({ours}) {why}"
        vals[ours] = text
    if not vals["instruction"].strip():
        return None, "empty instruction", f"field {fm['instruction']!r} (instruction) is empty"
    if labelled:
        label = vals["label"].strip()
        if not label:
            return None, "empty label", f"field {fm['label']!r} (label) is empty"
        return Example(vals["instruction"], vals["input"], label, label, name, label=label), "", ""
    if not vals["output"].strip():
        return None, "empty output", f"field {fm['output']!r} (output) is empty"
    options = None
    if "options" in fm:
        raw = rec.get(fm["options"])
        if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(o, str) and o.strip() for o in raw):
            return None, "bad options", (f"field {fm['options']!r} (options) must be a list of at least two "
                                         f"non-empty texts, got {raw!r:.80}")
        why = next((w for o in raw if (w := _not_a_value(o, o))), None)
        if why:
            return None, "bad options", f"an option of field {fm['options']!r} (options) {why}"
        options = tuple(raw)
        if vals["output"] not in options:
            return None, "answer not an option", (f"the output {vals['output']!r:.60} (field {fm['output']!r}) is "
                                                  f"not one of its options {list(options)!r:.120}")
    category = vals["category"].strip() or name
    return Example(vals["instruction"], vals["input"], vals["output"], category, name, options=options), "", ""


def _load_records(
    records: Iterator[tuple[str, Any]], where: str, fm: dict[str, str], name: str, on_bad_row: str,
    user_map: dict[str, str] | None = None,
) -> LoadResult:
    """The examples of ``records``. A field the user's map (``user_map``) names for an optional field (input,
    category) that no row has is an error: it would otherwise leave every prompt without its context, or every
    example in one category, without a word."""
    examples: list[Example] = []
    reasons: Counter[str] = Counter()
    optional = {ours: theirs for ours, theirs in (user_map or {}).items() if ours in ("input", "category")}
    unseen = set(optional.values())
    for loc, rec in records:
        if unseen and isinstance(rec, dict):
            unseen.difference_update(rec)
        ex, reason, detail = _convert(rec, fm, name)
        if ex is not None:
            examples.append(ex)
            continue
        if on_bad_row == "error":
            raise DataError(f"{where}: {loc}: {detail}; {_FIX}")
        reasons[reason] += 1
    for ours, theirs in optional.items():
        if theirs in unseen and examples:
            raise DataError(f"{where}: data.field_map.{ours} = {theirs!r}, but no row has a field {theirs!r}: "
                            f"correct the name (the field your file keeps the {ours} in), or remove "
                            f"data.field_map.{ours}")
    return LoadResult(examples, sum(reasons.values()), dict(reasons))


@lru_cache(maxsize=8)
def _load_builtin_cached(key: str, fm_items: tuple[tuple[str, str], ...], on_bad_row: str,
                         user_items: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[Example, ...], int,
                                                                           tuple[tuple[str, int], ...]]:
    path = builtin_path(key)
    res = _load_records(_read_json_or_jsonl(path, jsonl=True), str(path), dict(fm_items), key, on_bad_row,
                        dict(user_items))
    return tuple(res.examples), res.skipped, tuple(res.skipped_reasons.items())


def load_examples(
    source: str,
    field_map: dict[str, str] | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    hf_split: str = "train",
    revision: str | None = None,
) -> LoadResult:
    """Read one source into :class:`Example` records (see the module docstring for the rules).

    ``field_map`` maps our field names to the file's (``{"output": "response"}``) and overrides
    single entries of the default map. Raises :class:`DataError` for a source that cannot be
    found or read and, with ``on_bad_row="error"``, for the first bad row.
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data.source must be a non-empty string, got {source!r}")
    name = source_name(source)

    key = _builtin_key(source)
    if key is not None and not Path(source).exists():
        fm = _resolve_field_map(_BUILTIN_FIELD_MAPS[key], field_map)
        exs, skipped, reasons = _load_builtin_cached(key, tuple(sorted(fm.items())), on_bad_row,
                                                     tuple(sorted((field_map or {}).items())))
        return LoadResult(list(exs), skipped, dict(reasons))

    path = Path(source).expanduser()
    if path.is_file():
        fm = _resolve_field_map(DEFAULT_FIELD_MAP, field_map)
        low = path.name.lower()
        if low.endswith((".jsonl", ".jsonl.gz")):
            records = _read_json_or_jsonl(path, jsonl=True)
        elif low.endswith((".json", ".json.gz")):
            records = _read_json_or_jsonl(path, jsonl=False)
        elif low.endswith(".parquet"):
            records = _read_parquet(path)
        else:
            raise DataError(
                f"data source {source!r}: unsupported file type; use .json (a list of objects), "
                ".jsonl (one object per line), either gzip-compressed (.gz), or .parquet"
            )
        return _load_records(records, str(path), fm, name, on_bad_row, field_map)
    if path.is_dir():
        fm = _resolve_field_map(DEFAULT_FIELD_MAP, field_map)
        return _load_records(_read_dataset_dir(path, hf_split), f"dataset folder {path}", fm, name, on_bad_row,
                             field_map)

    no_local = (f"data.source {source!r}: no such local file or folder (relative paths are read from "
                f"{Path.cwd()})")
    hub = source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) else source
    if _HUB_ID.match(hub) and (source.startswith(HF_PREFIX) or not _looks_like_path(source)):
        default = DOLLY_FIELD_MAP if hub in _DOLLY_HUB_IDS else DEFAULT_FIELD_MAP
        fm = _resolve_field_map(default, field_map)
        # a bare ORG/NAME may be a mistyped local path as well: its error says both
        note = "" if source.startswith(HF_PREFIX) else (
            f"{no_local}, so it was taken for a hub dataset (write hub datasets as hf:ORG/NAME): ")
        return _load_records(_read_hub(hub, hf_split, revision, note), f"hub dataset {hub}", fm, name, on_bad_row,
                             field_map)

    raise DataError(
        f"{no_local}, and it is not a built-in data set ({', '.join(sorted(_BUILTINS))}): check the path, or "
        f"name a Hugging Face hub dataset as {HF_PREFIX}ORG/NAME"
    )


def _looks_like_path(source: str) -> bool:
    """A ``data.source`` written as a path rather than a hub id (ORG/NAME): absolute, relative to ``.``/``..``/``~``,
    with a data file's suffix, or under a folder that exists here (``cfg/mydata`` where ``cfg/`` is a folder)."""
    if source.startswith(("/", ".", "~")) or "\\" in source or source.lower().endswith(_DATA_SUFFIXES):
        return True
    parts = Path(source).parts
    return len(parts) > 1 and Path(parts[0]).is_dir()
