"""The lists of valid values and the one-line checks the validators share; imports nothing of gptmini.

The modules that act on a setting (gptmini.optim, gptmini.device, gptmini.distributed, ...) import its list from
here, so the list of names a config accepts and the names the code handles are the same tuple.
"""

from __future__ import annotations

import math

POS_ENCODINGS = ("learned", "rope")
MLP_KINDS = ("gelu", "gelu_tanh", "relu2")
# `model.init_from` names: the four OpenAI GPT-2 sizes on the Hugging Face hub (gptmini.pretrained loads them).
PRETRAINED_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
NS_DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "wsd")  # gptmini.optim computes them
DEVICES = ("auto", "cpu", "cuda", "mps")  # ROCm builds use cuda; gptmini.device resolves auto
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # gptmini.device maps them to torch dtypes
STRATEGIES = ("auto", "ddp", "fsdp")  # gptmini.distributed resolves auto
MAX_SEED = 2**31 - 1  # numpy seeds must stay below 2**32, and the trainer adds the rank


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the validators: each raises a one-line ValueError naming the key, the value and the range.


def check_int(key: str, value: object, low: int, high: int | None = None, *, none_ok: bool = False,
              note: str = "") -> None:
    """`key=value` must be an integer >= low (and <= high); None too when `none_ok`."""
    if value is None and none_ok:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high):
        return
    if high is not None:
        what = f"an integer in [{low}, {high}]"
    else:
        what = {0: "a non-negative integer (>= 0)", 1: "a positive integer (>= 1)"}.get(low, f"an integer >= {low}")
    raise ValueError(f"{key}={value!r} must be {what}{' or null' if none_ok else ''}{note}")


def check_number(key: str, value: object, low: float, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, note: str = "") -> None:
    """`key=value` must be a finite number in the interval from low to high (open ends when asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    if high is None:
        where = f"{'>' if low_open else '>='} {low:g}"
    else:
        where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    raise ValueError(f"{key}={value!r} must be a finite number {where}{note}")


def check_choice(key: str, value: object, valid: tuple[str, ...]) -> None:
    """`key=value` must be one of `valid`; the library functions that resolve a choice call this too."""
    if value not in valid:
        raise ValueError(f"{key}={value!r} is unknown; valid: {', '.join(valid)}")


def check_init_from(ref: object) -> None:
    """`model.init_from` must be one of PRETRAINED_NAMES or look like a path. Only the spelling is checked, never the
    file system: a checkpoint records the value and must stay loadable after the folder is gone."""
    is_path = isinstance(ref, str) and ref.strip() == ref and ("/" in ref or ref.startswith(("~", ".")))
    if ref in PRETRAINED_NAMES or is_path:
        return
    hint = f" (write ./{ref} for a folder here)" if isinstance(ref, str) and ref.strip() else ""
    raise ValueError(
        f"model.init_from={ref!r} is unknown; valid: {', '.join(PRETRAINED_NAMES)}, or the path of a local "
        f"Hugging Face GPT-2 folder{hint}"
    )
