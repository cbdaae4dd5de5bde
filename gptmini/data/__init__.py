"""Datasets: load a corpus with Hugging Face `datasets`, tokenize it once into flat token files, draw batches.

    <data_dir>/<name>/train.bin   uint16 (or uint32) token ids, documents separated by end-of-text
    <data_dir>/<name>/val.bin
    <data_dir>/<name>/meta.json   tokenizer spec, dtype, token counts, source, fingerprints, checksum

Two sides share one file format (`format`): preparation, offline (`preparation`, reading corpora through
`sources`, writing through `staging`), and what the trainer reads at run time (`batches`).
`prepare(cfg, data_dir)` does no work when `meta.json` already holds the fingerprint of the same source,
tokenizer and settings; otherwise it writes into a temporary folder and swaps it in with renames, so old and
new files are never mixed. Run it on its own with `python -m gptmini.data data=<name> [data.path=...]`.
"""

from gptmini.data.batches import BatchSampler, PreparedData, iter_windows, load_prepared
from gptmini.data.format import DATA_FORMAT, DATA_VERSION, DataError, check_prepared, read_meta
from gptmini.data.preparation import SPLIT_MODES, iter_token_documents, prepare, tokenize_documents
from gptmini.data.sources import (
    FILE_TYPES,
    SOURCE_REGISTRY,
    Source,
    load_documents,
    register_source,
    resolve_files,
    stdlib_files,
)
from gptmini.data.staging import DataDirError

__all__ = [
    "FILE_TYPES",
    "DATA_FORMAT",
    "SOURCE_REGISTRY",
    "Source",
    "SPLIT_MODES",
    "DATA_VERSION",
    "BatchSampler",
    "DataDirError",
    "DataError",
    "PreparedData",
    "check_prepared",
    "iter_token_documents",
    "iter_windows",
    "load_documents",
    "load_prepared",
    "prepare",
    "read_meta",
    "register_source",
    "resolve_files",
    "stdlib_files",
    "tokenize_documents",
]
