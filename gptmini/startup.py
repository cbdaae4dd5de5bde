"""Ctrl-C while a command starts: deferred until the command can report it in one line.

Loading torch takes a second or two, and a KeyboardInterrupt raised inside its C++ initialisation aborts the
process (`terminate called after throwing an instance of 'pybind11::error_already_set'`) instead of raising in
Python; inside Hydra's or OmegaConf's start-up it leaves objects half-made that then fail with unrelated errors.
So while one of gptmini's commands (train.py, generate.py, `python -m gptmini.<command>`) is starting, SIGINT only
sets a flag; when the command itself begins (`gptmini.cli.started`), Python's handler is restored and, if the flag
is set, the command stops with the same `error: interrupted (Ctrl-C)` line as at any later moment. Imported by
the package before anything else, and imports nothing of ours; a program that merely imports gptmini keeps its
own handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

ENTRY_SCRIPTS = ("train.py", "generate.py")
interrupted = False


def _is_command() -> bool:
    """True while `python -m gptmini.<command>` or this repository's train.py/generate.py is starting."""
    if sys.argv[:1] == ["-m"]:  # runpy sets argv[0] to "-m" while it imports the package
        return True
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.basename(script) in ENTRY_SCRIPTS and os.path.dirname(script) == repo


def _note(signum: int, frame: object) -> None:
    global interrupted
    interrupted = True


def defer_interrupts() -> None:
    if _is_command() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _note)


def resume_interrupts() -> None:
    """Python's own SIGINT handler again; a Ctrl-C that came while loading is raised now, where it is reported."""
    if signal.getsignal(signal.SIGINT) is _note:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        raise KeyboardInterrupt
