"""What the entry points share: typed config conversion, Hydra start-up, one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# The YAML configs, beside the package in the repository (the package is installed in editable mode).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

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


def hydra_main(config_name: str, fn: Callable[[Any], Any]) -> None:
    """Run `fn(typed config)` under `@hydra.main` with `configs/<config_name>.yaml` (for `python -m ...`)."""
    import hydra

    from gptmini.config import register_configs

    register_configs()
    check_overrides(config_name, sys.argv[1:])

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)
    def main(cfg: DictConfig) -> None:
        run_reporting_errors(lambda: fn(to_dataclass(cfg)))

    main()


def prepare_train_launch() -> None:
    """Make every torchrun rank agree on one run directory before Hydra creates it.

    The default run directory is stamped with the start time (`${run_stamp:}` in configs/train.yaml); rank 0's
    stamp is broadcast so all ranks resolve the same path.
    """
    import datetime

    from gptmini.distributed import broadcast, init_process_group

    env = init_process_group()
    stamp = broadcast(datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), env)
    OmegaConf.register_new_resolver("run_stamp", lambda: stamp, replace=True)


def check_overrides(config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra starts, so a bad override ends in one line on stderr (exit 2).

    Hydra reports the same mistakes over several lines; this catches unknown groups, options and keys, wrong
    types, and values our dataclasses reject, with the same wording condensed. Sweeps (`-m`) and Hydra's own
    flags (`--help`, `--cfg`, ...) go straight to Hydra.
    """
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from gptmini.config import register_configs

    register_configs()
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra.")]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            to_dataclass(compose(config_name, overrides=overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        print(f"error: {one_line(str(err) + cause)}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """Hydra/OmegaConf's multi-line messages as one line: sentences joined, lists comma-separated, and the
    object-type details and config search path dropped."""
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines()]
    text, in_list = "", False
    for line in lines:
        if not line or line == "^" or line.startswith(("full_key:", "object_type=", "reference_type=")):
            continue
        if not text:
            text = line
        elif text.endswith(":") or in_list:  # "Available options in 'model':" then one option per line
            text += (" " if text.endswith(":") else ", ") + line
            in_list = True
        else:
            text += ("" if text.endswith(".") else ".") + " " + line
    return text
