"""Data for federated instruction tuning: loading, the Alpaca prompt, tokenisation, partitions.

``prepare_federated_data(cfg.data, cfg.seed)`` is the entry point for the federation runtime;
the pieces it is built from are exported for direct use and tests.
"""

from .partition import (
    SCHEMES,
    category_histogram,
    format_histogram_table,
    partition,
    split_client,
    split_sizes,
)
from .prepare import ClientData, FederatedData, prepare_client_data, prepare_federated_data, resolve_labels
from .sources import (
    DEFAULT_FIELD_MAP,
    DOLLY_FIELD_MAP,
    DataError,
    Example,
    LoadResult,
    builtin_path,
    load_examples,
    source_name,
)
from .template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from .tokenize import (
    IGNORE_INDEX,
    collate_sft,
    pad_token_id,
    tokenize_example,
    tokenize_examples,
    tokenize_prompt,
    truncation_lengths,
)

__all__ = [
    "DEFAULT_FIELD_MAP",
    "DOLLY_FIELD_MAP",
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "SCHEMES",
    "ClientData",
    "DataError",
    "Example",
    "FederatedData",
    "LoadResult",
    "builtin_path",
    "category_histogram",
    "collate_sft",
    "format_histogram_table",
    "format_prompt",
    "load_examples",
    "pad_token_id",
    "partition",
    "prepare_client_data",
    "prepare_federated_data",
    "resolve_labels",
    "source_name",
    "split_client",
    "split_sizes",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_prompt",
    "truncation_lengths",
]
