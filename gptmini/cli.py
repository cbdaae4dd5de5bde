"""What the entry scripts share: typed config conversion and one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OmegaConfBaseException)


def to_dataclass(cfg: DictConfig) -> Any:
    """The composed config as its schema's dataclass instance (validators in __post_init__ run here)."""
    return OmegaConf.to_object(cfg)


def run_reporting_errors(fn: Callable[[], T]) -> T:
    """Run `fn`; bad input ends the process with one line on stderr and exit code 2.

    HYDRA_FULL_ERROR=1 shows the full traceback instead, as it does for Hydra's own errors.
    """
    try:
        return fn()
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
