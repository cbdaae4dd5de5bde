"""The data settings: where a corpus comes from, how it is tokenized and split (see gptmini.data).

Apart from the rest of `gptmini.config` (which re-exports it) because the commands that read a dataset without
training on it (evaluate, heads) take it too; like the whole package, it imports nothing of gptmini outside it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the corpus comes from, how it is tokenized and split. Prepared once into <data_dir>/<name>/."""

    name: str = "python_stdlib"  # folder under data_dir that holds train.bin, val.bin, meta.json
    # python_stdlib: this interpreter's standard library; files: data.path; url: data.url (data.path, when
    # set, is a local copy used instead); hub: a Hugging Face hub dataset.
    source: str = "python_stdlib"
    path: str | None = None  # a file, folder or glob of .txt/.jsonl/.json/.parquet files
    url: str | None = None
    hub_name: str | None = None  # e.g. roneneldan/TinyStories
    hub_subset: str | None = None
    hub_split: str = "train"
    text_field: str = "text"  # the column holding the text (jsonl, parquet, hub)
    streaming: bool = False  # hub: stream instead of downloading the whole dataset first
    max_tokens: int | None = None  # stop after this many tokens (streamed corpora)
    tokenizer: str = "char"  # char | bytes | tiktoken
    vocabulary: str | None = None  # char: these characters instead of the corpus's (evaluate sets a checkpoint's)
    encoding: str = "gpt2"  # tiktoken: an encoding name or a local .tiktoken file
    val_fraction: float = 0.1
    # auto: by document when there are several (val is text the model never saw), else by position
    split: str = "auto"  # auto | document | position
    num_proc: int = 1  # processes for tokenization (Dataset.map)
    dtype: str = "auto"  # token file dtype: auto (uint16 when the vocabulary fits, else uint32) | uint16 | uint32
    on_bad_utf8: str = "error"  # error | replace (with U+FFFD, and a warning)
