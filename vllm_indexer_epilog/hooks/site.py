"""What every vllm-ascend hook shares: the version guard, site lookup, refusing, logging once, and undo.

A hook module names the vllm-ascend version range it was written against and an `install(patcher)`
that finds its site (raising `SiteMissing` when an expected module, class or method is absent) and
patches it through the `Patcher`, which remembers how to put everything back.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
from types import ModuleType
from typing import Any, Callable, Protocol

from ..config import CONFIG_KEY, EpilogConfig, EpilogConfigError

logger = logging.getLogger("vllm_indexer_epilog.hooks")

_logged: set[str] = set()


class SiteMissing(Exception):
    """The code a hook patches is not where (or what) it was when the hook was written."""


class Hook(Protocol):
    NAME: str
    WRITTEN_AGAINST: str
    VERSIONS: tuple[tuple[int, ...], tuple[int, ...]]  # [lowest, first unsupported)

    def install(self, patcher: "Patcher") -> str: ...


def log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, "vllm_indexer_epilog: %s", message)


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '0.23.1rc1.dev5+g1' -> (0, 23, 1)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"unparsable version {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def is_source_build(version: str) -> bool:
    """A build from a git checkout: its number comes from the nearest reachable tag (releases are tagged on
    branches, so main reports an old one) and says nothing about the code; the site checks decide."""
    return ".dev" in version or "+g" in version


def version_allowed(version: str, versions: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    if is_source_build(version):
        return True
    try:
        found = release(version)
    except ValueError:
        return False
    return versions[0] <= found < versions[1]


def vllm_ascend_version() -> str | None:
    if importlib.util.find_spec("vllm_ascend") is None:
        return None
    try:
        return importlib.metadata.version("vllm-ascend")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def import_site(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SiteMissing(f"module {name} not importable ({exc})") from exc


def require(owner: Any, *names: str) -> Any:
    """`owner.<name>` for the first name, after checking that every name exists."""
    for name in names:
        if not hasattr(owner, name):
            raise SiteMissing(f"{getattr(owner, '__name__', owner)}.{name} not found")
    return getattr(owner, names[0])


def refuse(config: EpilogConfig, site: str, reason: str) -> None:
    """A site that cannot honour the flag: an error if the user set the flag, otherwise one log line."""
    if config.explicit:
        raise EpilogConfigError(f"{CONFIG_KEY} ({config.describe()}) cannot be served by {site}: {reason}")
    log_once(f"{site}: inactive ({reason}); vllm-ascend's own path is kept")


class Patcher:
    """Sets attributes and remembers the originals, so that `undo()` restores the exact prior state."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        had_own = name in vars(owner)
        before = vars(owner).get(name)

        def undo() -> None:
            if had_own:
                setattr(owner, name, before)
            else:
                delattr(owner, name)

        setattr(owner, name, value)
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def install_hook(hook: Hook, patcher: Patcher) -> tuple[int, str]:
    """Install one hook if its site is there; returns the log level and the one line to log. Never raises:
    a hook that fails is rolled back alone, so the other sites keep their hooks."""
    version = vllm_ascend_version()
    if version is None:
        return logging.INFO, f"{hook.NAME}: vllm-ascend not installed; nothing hooked"
    if not version_allowed(version, hook.VERSIONS):
        return logging.INFO, (f"{hook.NAME}: written against {hook.WRITTEN_AGAINST}, found vllm-ascend {version}; "
                              "not hooked, vllm-ascend's own path is kept")
    mark = len(patcher._undo)
    try:
        return logging.INFO, f"{hook.NAME}: {hook.install(patcher)}"
    except Exception as exc:  # a half-installed hook is worse than none
        while len(patcher._undo) > mark:
            patcher._undo.pop()()
        if isinstance(exc, SiteMissing):
            return logging.INFO, f"{hook.NAME}: site not found ({exc}); not hooked, vllm-ascend's own path is kept"
        return logging.WARNING, (f"{hook.NAME}: failed to install ({type(exc).__name__}: {exc}); not hooked, "
                                 "vllm-ascend's own path is kept")
