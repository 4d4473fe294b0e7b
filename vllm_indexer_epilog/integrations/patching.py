"""What every vllm-ascend hook shares: the version guard, site lookup, refusing, logging once, and undo.

A hook module names the vllm-ascend version range it was written against, the modules that hold its
site (`TRIGGERS`), and an `install(patcher)` that finds the site (raising `SiteMissing` when an expected
module, class or method is absent) and patches it through the `Patcher`, which remembers how to put
everything back. Hooks are installed when vllm-ascend itself first imports a trigger module, never by
importing vllm-ascend's modules early.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import re
import sys
from types import ModuleType
from typing import Any, Callable, Protocol

from .config import CONFIG_KEY, EpilogConfig, EpilogConfigError

logger = logging.getLogger("vllm_indexer_epilog.integrations.vllm_ascend")

_logged: set[str] = set()


class SiteMissing(Exception):
    """The code a hook patches is not where (or what) it was when the hook was written."""


class Hook(Protocol):
    NAME: str
    WRITTEN_AGAINST: str
    VERSIONS: tuple[tuple[int, ...], tuple[int, ...]]  # [lowest, first unsupported)
    TRIGGERS: tuple[str, ...]  # modules whose first import installs the hook (any one that holds the site)

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

    def on_undo(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def _rollback_to(self, mark: int) -> None:
        while len(self._undo) > mark:
            self._undo.pop()()

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `on_import(self)` right after one of `names` has been executed for the first time.

    It finds nothing itself: it asks the finders after it and wraps the loader they return, so the module
    loads exactly as it would have. vllm-ascend keeps its model and attention modules unimported until it
    needs them (after its own patches); hooking at that moment, rather than importing them at plugin load,
    changes nothing about when or how they are imported.
    """

    def __init__(self, names: list[str], on_import: Callable[["_AfterImport"], None]) -> None:
        self.names = set(names)
        self._on_import = on_import

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader, self._loaded)
                return spec
        return None

    def _loaded(self, module: ModuleType) -> None:
        self.names.discard(module.__name__)
        self._on_import(self)

    def close(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


class _NotifyingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, loaded: Callable[[ModuleType], None]) -> None:
        self._inner, self._loaded = inner, loaded

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._loaded(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self._inner, name)


def _attempt(hook: Hook, patcher: Patcher) -> tuple[int, str, bool]:
    """Install now: (log level, line, whether the site was missing). A failed hook is rolled back alone."""
    mark = len(patcher._undo)
    try:
        return logging.INFO, f"{hook.NAME}: {hook.install(patcher)}", False
    except Exception as exc:  # a half-installed hook is worse than none
        patcher._rollback_to(mark)
        if isinstance(exc, SiteMissing):
            return logging.INFO, f"{hook.NAME}: site not found ({exc}); not hooked, vllm-ascend's own path is kept", True
        return logging.WARNING, (f"{hook.NAME}: failed to install ({type(exc).__name__}: {exc}); not hooked, "
                                 "vllm-ascend's own path is kept"), False


def install_hook(hook: Hook, patcher: Patcher) -> tuple[int, str]:
    """Install one hook now if one of its trigger modules is already imported, else when vllm-ascend
    imports one; returns the log level and the one line to log now. Never raises."""
    version = vllm_ascend_version()
    if version is None:
        return logging.INFO, f"{hook.NAME}: vllm-ascend not installed; nothing hooked"
    if not version_allowed(version, hook.VERSIONS):
        return logging.INFO, (f"{hook.NAME}: written against {hook.WRITTEN_AGAINST}, found vllm-ascend {version}; "
                              "not hooked, vllm-ascend's own path is kept")
    waiting = [name for name in hook.TRIGGERS if name not in sys.modules]
    if len(waiting) < len(hook.TRIGGERS):
        level, line, missing = _attempt(hook, patcher)
        if not (missing and waiting):
            return level, line

    def on_import(finder: _AfterImport) -> None:
        level, line, missing = _attempt(hook, patcher)
        if missing and finder.names:
            return  # another candidate module may still hold the site
        finder.close()
        log_once(line, level)

    finder = _AfterImport(waiting, on_import)
    sys.meta_path.insert(0, finder)
    patcher.on_undo(finder.close)
    return logging.INFO, f"{hook.NAME}: will hook when vllm-ascend imports {' or '.join(waiting)}"
