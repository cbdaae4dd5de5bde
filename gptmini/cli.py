"""What the entry points share: typed config conversion, Hydra start-up, one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gptmini.config import OLD_MUON_KEYS
from gptmini.config_checks import check_config
from gptmini.paths import check_writable
from gptmini.startup import resume_interrupts

T = TypeVar("T")

# The YAML configs, beside the package in the repository (the package is installed in editable mode).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, OmegaConfBaseException)


def to_dataclass(cfg: DictConfig) -> Any:
    """The composed config as its schema's dataclass instance, checked: the validators in __post_init__ run here,
    then the checks that need a registry (gptmini.config_checks)."""
    obj = OmegaConf.to_object(cfg)
    check_config(obj)
    return obj


def run_reporting_errors(fn: Callable[[], T]) -> T:
    """Run `fn`; bad input ends the process with one line on stderr and exit code 2, Ctrl-C with one line and 130.

    HYDRA_FULL_ERROR=1 shows the full traceback instead, as it does for Hydra's own errors. SIGTERM ends it as
    Ctrl-C does, running `finally` blocks on the way (the training loop installs its own handler while it runs).
    """
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn()
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        report(f"error: {message}")
        sys.exit(2)
    except KeyboardInterrupt as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        terminated = isinstance(err, Terminated)
        report(f"error: {'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}")
        sys.exit(143 if terminated else 130)


def report(line: str) -> None:
    """An error line on stderr, from one process: under torchrun every rank meets the same bad setting, and the
    user should read it once (rank 0 speaks; the others exit with the same code, silently)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM raised as an exception where the process is, so that `finally` blocks remove half-written temporary
    files and folders as they do for Ctrl-C (Python's default SIGTERM ends the process without running them)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def run_command(config_name: str, fn: Callable[..., Any], with_run_dir: bool = False) -> None:
    """The one entry helper every command goes through: `fn(typed config)` under `@hydra.main`, with
    `configs/<config_name>.yaml`; `with_run_dir` also passes Hydra's run directory (`fn(config, run_dir)`).

    A bad override ends in one `error:` line before Hydra starts (`check_overrides`); errors raised by `fn`
    end the same way (`run_reporting_errors`), and so does a Ctrl-C while the command starts (`started`).
    """
    run_reporting_errors(lambda: _run_command(config_name, fn, with_run_dir))


def _run_command(config_name: str, fn: Callable[..., Any], with_run_dir: bool) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from gptmini.config import register_configs

    register_configs()
    new_dirs = check_overrides(config_name, sys.argv[1:])
    sweep = Sweep()

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base=None)
    def main(cfg: DictConfig) -> None:
        if not with_run_dir:
            run_reporting_errors(lambda: started(fn)(to_dataclass(cfg)))
            return
        hydra_cfg = HydraConfig.get()

        def job() -> None:
            started(fn)(to_dataclass(cfg), hydra_cfg.runtime.output_dir)

        if hydra_cfg.mode.name == "MULTIRUN":
            run_reporting_errors(lambda: sweep.run(job, hydra_cfg))
            return
        try:
            run_reporting_errors(job)
        finally:
            remove_if_empty(new_dirs)  # a run refused before its first file leaves no empty folders behind

    main()
    sweep.report()


class Sweep:
    """A sweep (`-m`) runs every job: one refused for its input (too little data for its block_size, ...) is
    named on a line of its own and leaves no folder, the others still run, and the sweep ends with one `error:`
    line listing the refused jobs (exit 2). Values that no job could take are refused before any job runs
    (`check_overrides`)."""

    def __init__(self) -> None:
        self.refused: list[str] = []
        self.jobs = 0
        self.dir: Path | None = None

    def run(self, job: Callable[[], Any], hydra_cfg: Any) -> None:
        self.jobs += 1
        self.dir = Path(hydra_cfg.sweep.dir)
        try:
            job()
        except USER_ERRORS as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            name = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"{name} refused: {message}", file=sys.stderr)
            self.refused.append(f"{name}: {message}")
            remove_if_empty([Path(hydra_cfg.runtime.output_dir)])

    def report(self) -> None:
        if not self.refused:
            return
        if self.dir is not None:
            remove_if_empty([self.dir])  # every job refused: no empty sweep folder either
        report(f"error: {len(self.refused)} of {self.jobs} sweep jobs refused, the others ran; "
               + "; ".join(self.refused))
        sys.exit(2)


def started(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` once the command is ready to run it: a Ctrl-C deferred while torch, Hydra and the config loaded
    (gptmini.startup; interrupted inside those libraries, they fail with unrelated errors) is raised here."""

    def run(*args: Any) -> T:
        resume_interrupts()
        return fn(*args)

    return run


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) Hydra created for a run that then wrote nothing; rmdir refuses any
    folder that holds a file, so a run that wrote something keeps everything."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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


def check_overrides(config_name: str, argv: list[str]) -> list[Path]:
    """Compose the config before Hydra starts, so a bad override ends in one line on stderr (exit 2).

    Hydra reports the same mistakes over several lines; this catches unknown groups, options and keys, wrong
    types, values our dataclasses reject, and a run directory that cannot be one, with the same wording
    condensed. For a sweep (`-m`) every value of every swept key is checked. Hydra's informational flags
    (`--help`, `--cfg`, ...) go straight to Hydra.

    Returns the folders Hydra is about to create for the run directory (the missing ones, deepest first).
    """
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    args = [arg for arg in argv if arg not in ("-m", "--multirun", "-r", "--run")]
    new_dirs: list[Path] = []
    try:
        if any(arg.startswith("-") for arg in args):
            check_flags(args)  # informational: Hydra shows something and runs nothing
            return []
        check_renamed(args)
        for overrides in _sweep_variants(args) if multirun else [args]:
            cfg = _compose(config_name, overrides)
            if not multirun and "run" in cfg.get("hydra", {}):
                run_dir = Path(cfg.hydra.run.dir).absolute()
                _check_run_dir(cfg.hydra.run.dir, explicit=any(a.startswith("hydra.run.dir=") for a in args))
                new_dirs = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        return new_dirs
    except USER_ERRORS + (_hydra_errors(),) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = f"\n{err.__cause__}" if err.__cause__ is not None else ""
        report(f"error: {one_line(str(err) + cause)}")
        sys.exit(2)


def check_renamed(args: list[str]) -> None:
    """A setting typed by its old name is refused with its new one, not Hydra's "Key not in OptimConfig"."""
    for arg in args:
        key = arg.split("=", 1)[0].lstrip("+~")
        old = key.removeprefix("optim.")
        if key.startswith("optim.") and old in OLD_MUON_KEYS:
            raise ValueError(f"{key} is now optim.muon.{OLD_MUON_KEYS[old]} (Muon's settings sit under optim.muon; "
                             f"select Muon with optim=muon)")


# Hydra's flags that show something and run no job (no callback is instantiated).
INFO_FLAGS = ("-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p", "--package", "-i",
              "--info", "-sc", "--shell-completion")
# `_target_` Hydra itself reads: it instantiates only registered plugin classes from these two.
HYDRA_PLUGIN_TARGETS = ("hydra.launcher._target_", "hydra.sweeper._target_")


def check_flags(args: list[str]) -> None:
    """Refuse the flags that change where the config comes from (`-cd`, `-cn`, `-cp`, `--experimental-rerun`):
    the checks here compose the commands' own configs, so a job must run on exactly those."""
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("-") and flag not in INFO_FLAGS:
            raise ValueError(
                f"{flag}: gptmini's commands read their configs from {CONFIG_DIR} only; add a folder of your own "
                f"with hydra.searchpath=[file://FOLDER] and select its files with overrides (e.g. +experiment=NAME)"
            )


def refuse_targets(cfg: DictConfig) -> None:
    """Refuse `_target_` anywhere in the composed config, the hydra section included: Hydra would import and call
    it (a callback runs before any of our code), and gptmini instantiates nothing from its configuration."""
    stack: list[tuple[str, Any]] = [("", OmegaConf.to_container(cfg, resolve=False))]
    while stack:
        prefix, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            path = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}".lstrip(".")
            if key == "_target_" and path not in HYDRA_PLUGIN_TARGETS:
                raise ValueError(
                    f"{path}={value!r}: _target_ is refused anywhere in the configuration, its hydra: section "
                    f"included (Hydra would import and call it; gptmini instantiates nothing from its config); "
                    f"remove it from the experiment file or override that sets it"
                )
            stack.append((path, value))


def _hydra_errors() -> type[BaseException]:
    from hydra.errors import HydraException

    return HydraException


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose once with Hydra's own node (for the run-directory check); the rest must build the typed config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from gptmini.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    refuse_targets(cfg)
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    to_dataclass(job)
    return cfg


def _sweep_variants(overrides: list[str]) -> list[list[str]]:
    """For `-m`: the override lists that together try every value of every swept key once."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = {i: (o.input_line.split("=", 1)[0], list(o.sweep_string_iterator()))
             for i, o in enumerate(parsed) if o.is_sweep_override()}
    firsts = [f"{swept[i][0]}={swept[i][1][0]}" if i in swept else o.input_line for i, o in enumerate(parsed)]
    variants = [firsts]
    for i, (key, values) in swept.items():
        variants += [firsts[:i] + [f"{key}={value}"] + firsts[i + 1 :] for value in values[1:]]
    return variants


def _check_run_dir(run_dir: str, explicit: bool) -> None:
    """The run directory must be a directory we can create and write into."""
    key = "hydra.run.dir" if explicit else "the default run directory (hydra.run.dir)"
    check_writable(run_dir, key, folder=True, choose="hydra.run.dir")


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
