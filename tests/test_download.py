"""`data.source=url` (data=shakespeare_char, data=shakespeare) downloads for real: tested against an HTTP server on
127.0.0.1 serving a small file, so no test needs the network (issue 21, 'tried as a new user would')."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from gptmini.config import DataConfig
from gptmini.data import DataError, prepare
from gptmini.data.download import cached_path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """http://127.0.0.1:PORT/ serving tmp_path/www; downloads cached in tmp_path/cache; downloads allowed."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "input.txt").write_text(TEXT)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTMINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def decoded(prepared) -> str:
    ids = np.concatenate([prepared.train_tokens(), prepared.val_tokens()])
    return prepared.tokenizer.decode(ids.tolist())


def test_a_url_is_downloaded_once_and_prepared(server, tmp_path):
    cfg = DataConfig(name="shakespeare_char", source="url", url=f"{server}/input.txt", tokenizer="char",
                     split="position")
    logs: list[str] = []
    prepared = prepare(cfg, tmp_path / "data", log=logs.append)
    assert decoded(prepared) == TEXT  # every character, split 90/10 by position
    assert prepared.meta["val_tokens"] == len(TEXT) - int(len(TEXT) * 0.9)
    assert cached_path(cfg.url).read_text() == TEXT
    assert sum("downloading" in line for line in logs) == 1
    logs.clear()
    prepare(cfg, tmp_path / "data2", log=logs.append, force=True)  # prepared again: the cached copy is used
    assert not any("downloading" in line for line in logs)


def test_a_missing_file_on_the_server_is_one_line_and_caches_nothing(server, tmp_path):
    cfg = DataConfig(name="x", source="url", url=f"{server}/absent.txt", tokenizer="char")
    with pytest.raises(DataError, match=r"^data.url='.*absent.txt' could not be downloaded \(HTTP 404 "):
        prepare(cfg, tmp_path / "data")
    assert not cached_path(cfg.url).exists()
    assert list(cached_path(cfg.url).parent.iterdir()) == []  # no partial file left


def test_offline_refuses_a_download_in_one_line(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DataConfig(name="x", source="url", url=f"{server}/input.txt", tokenizer="char")
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE=1 forbids downloads; pass a local copy with data.path"):
        prepare(cfg, tmp_path / "data")


def test_the_data_command_downloads_shakespeare_char(server, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptmini.data", "data=shakespeare_char",
                           f"data.url={server}/input.txt", f"data_dir={tmp_path / 'data'}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    meta = (tmp_path / "data" / "shakespeare_char" / "meta.json").read_text()
    assert '"train_tokens"' in meta and "Traceback" not in proc.stderr
