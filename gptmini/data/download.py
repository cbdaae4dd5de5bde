"""Corpora named by URL (`data.source=url`): downloaded once with the standard library into a local cache.

Plain HTTP(S) needs nothing more than `urllib`; going through `datasets`' fsspec layer instead needed two extra
packages (aiohttp, requests) that a plain install does not bring, so the download failed online too. The file is
written beside its final name and renamed into place when complete: an interrupted download is never taken for
the corpus.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from gptmini.data.format import DataError

TIMEOUT_S = 60  # per network read: a stalled server ends in an error line instead of a hang


def download_cache() -> Path:
    """`$GPTMINI_CACHE` or `$XDG_CACHE_HOME/gptmini` (default `~/.cache/gptmini`), then `downloads/`."""
    root = os.environ.get("GPTMINI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "gptmini"
    return Path(root) / "downloads"


def cached_path(url: str) -> Path:
    """Where `url` is kept: its file name, under a folder named by a hash of the whole URL."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return download_cache() / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_url(url: str, log) -> Path:
    """The local copy of `url`, downloaded first if it is not cached yet."""
    target = cached_path(url)
    if target.is_file():
        return target
    if os.environ.get("HF_DATASETS_OFFLINE") == "1":  # the switch users already set for offline data
        raise DataError(f"data.url={url!r} is not downloaded yet and HF_DATASETS_OFFLINE=1 forbids downloads; "
                        f"pass a local copy with data.path=FILE")
    if urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise DataError(f"data.url={url!r} is not an http(s) URL; give one, or a local copy with data.path=FILE")
    log(f"data: downloading {url}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as err:
        raise DataError(f"cannot write the download cache {str(target.parent)!r} ({err.strerror}); set "
                        f"GPTMINI_CACHE= to a writable folder") from None
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, f)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, ValueError) as err:
        if isinstance(err, urllib.error.HTTPError):
            reason = f"HTTP {err.code} {err.reason}"
        else:
            reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise DataError(f"data.url={url!r} could not be downloaded ({reason}); check the network, or download it "
                        f"yourself and pass data.path=FILE") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
