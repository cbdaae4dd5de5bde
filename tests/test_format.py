"""The prepared-data format: meta.json and the .bin files checked against each other before use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gptmini.config import DataConfig
from gptmini.data import DataError, load_prepared
from gptmini.data import format as format_lib

sys.path.insert(0, str(Path(__file__).parent))
from data_helpers import cfg_for, make_docs, run  # noqa: E402


def test_meta_that_does_not_match_the_tokenizer_asked_for(tmp_path):
    make_docs(tmp_path / "corpus", 6)
    run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    with pytest.raises(DataError) as err:
        load_prepared(out, expect_tokenizer=DataConfig(tokenizer="tiktoken", encoding="cl100k_base"))
    message = str(err.value)
    assert "'char'" in message and "'tiktoken'" in message and "cl100k_base" in message and str(out) in message
    with pytest.raises(DataError, match="'bytes'"):
        load_prepared(out, expect_tokenizer=DataConfig(tokenizer="bytes"))
    assert load_prepared(out, expect_tokenizer=DataConfig(tokenizer="char")).meta["tokenizer"]["kind"] == "char"


def test_truncated_bin_is_detected_and_prepared_again(tmp_path):
    make_docs(tmp_path / "corpus", 8)
    first, _ = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    full = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(full[:-2])  # one uint16 token short
    with pytest.raises(DataError) as err:
        load_prepared(out)
    message = str(err.value)
    assert str(out / "train.bin") in message and f"{len(full) - 2} bytes" in message
    assert f"{first.meta['train_tokens']} uint16 tokens" in message
    again, logs = run(cfg_for(tmp_path / "corpus", val_fraction=0.3), tmp_path / "data")  # same fingerprint
    assert (out / "train.bin").read_bytes() == full and any("preparing it again" in line for line in logs)


def test_damaged_meta_json(tmp_path):
    make_docs(tmp_path / "corpus", 4)
    run(cfg_for(tmp_path / "corpus", split="position"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    with pytest.raises(DataError, match="no meta.json"):
        load_prepared(tmp_path / "data" / "elsewhere")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps(meta | {"vocab_size": 3}))
    with pytest.raises(DataError, match="vocab_size 3 does not match"):
        load_prepared(out)
    (out / "meta.json").write_text(json.dumps(meta | {"dtype": "float32"}))
    with pytest.raises(DataError, match="'float32' is not uint16 or uint32"):
        load_prepared(out)


@pytest.mark.parametrize("edit", ["permute the vocabulary", "change eot_id", "drop the checksum"])
def test_an_edited_meta_json_is_refused(tmp_path, edit):
    """Edits that keep meta.json consistent with the .bin sizes still show: meta.json carries its own checksum."""
    make_docs(tmp_path / "corpus", 6)
    run(cfg_for(tmp_path / "corpus"), tmp_path / "data")
    out = tmp_path / "data" / "corpus"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["checksum"] == format_lib.meta_checksum(meta)
    load_prepared(out)
    if edit == "permute the vocabulary":
        chars = meta["tokenizer"]["chars"]
        edited = meta | {"tokenizer": {"kind": "char", "chars": chars[1] + chars[0] + chars[2:]}}
    elif edit == "change eot_id":
        edited = meta | {"eot_id": 0}
    else:
        edited = {k: v for k, v in meta.items() if k != "checksum"}
    (out / "meta.json").write_text(json.dumps(edited))
    with pytest.raises(DataError) as err:
        load_prepared(out)
    message = str(err.value)
    assert "\n" not in message and str(out / "meta.json") in message and "checksum" in message
    assert f"delete {str(out)!r}" in message
