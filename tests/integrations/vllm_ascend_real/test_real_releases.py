"""Real-code tests: the vllm-ascend hooks against the real vllm-ascend of every release in docs/ascend.md's matrix.

Each release runs in its own child process (its own vLLM and vllm-ascend on PYTHONPATH, see releases.py),
which runs pytest on real_deepseek_v4.py and real_sfa_li_c8.py with the stand-in NPU layer of
npu_standin.py. Downloads are cached under ~/.cache/vllm_indexer_epilog; without PyPI the tests skip with
pip's reason. VIE_ASCEND_RELEASES=0.23.0,0.30.0rc2 narrows the run. Releases with a source archive
(0.27.1rc1 on) also run vllm-ascend's OWN unit tests of the hooked sites, plugin inactive and hooks active
(ut_plugin.py; results in docs/ascend.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from . import releases

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
pytestmark = [pytest.mark.network, pytest.mark.slow]
CHECKS = ("real_deepseek_v4.py", "real_sfa_li_c8.py")
SELECTED = [v for v in os.environ.get("VIE_ASCEND_RELEASES", "").split(",") if v] or [r.version for r in releases.RELEASES]


def _run(version: str) -> tuple[str, int, str]:
    """("skip" | "ran", return code, output) of one release's child run."""
    try:
        releases.deps()
        folder = releases.prepare(version)
    except releases.Unavailable as exc:
        return "skip", 0, f"vllm-ascend {version} not obtainable here: {exc}"
    env = dict(os.environ, VLLM_PLUGINS="indexer_epilog", VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(folder), str(releases.deps()), str(HERE), str(ROOT),
                                           str(ROOT / "tests")]))  # tests/: fakes.npu_ops
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", "-p", "npu_standin",
           "-c", os.devnull, "--rootdir", str(HERE), "--confcutdir", str(HERE), *(str(HERE / c) for c in CHECKS)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return "ran", out.returncode, out.stdout + out.stderr


_pool: ThreadPoolExecutor | None = None
_futures: dict[str, Future] = {}


def _result(version: str) -> tuple[str, int, str]:
    """Two releases at a time (the child runs mostly wait on imports); the first test starts them all."""
    global _pool
    if _pool is None:
        releases.deps()  # once, before the workers race for it
        _pool = ThreadPoolExecutor(max_workers=int(os.environ.get("VIE_ASCEND_JOBS", "2")))
        for v in SELECTED:
            _futures[v] = _pool.submit(_run, v)
    return _futures[version].result()


@pytest.mark.parametrize("version", SELECTED)
def test_hooks_on_the_real_release(version: str) -> None:
    try:
        kind, rc, output = _result(version)
    except releases.Unavailable as exc:
        pytest.skip(f"vllm-ascend not obtainable here: {exc}")
    if kind == "skip":
        pytest.skip(output)
    tail = output[-6000:]
    assert rc == 0, f"vllm-ascend {version}: real-code checks failed\n{tail}"
    assert " passed" in output and " failed" not in output, tail


# ------------------------------------------------------------------------- vllm-ascend's own unit tests
def _run_ut(version: str, hooks: bool) -> tuple[str, int, str]:
    """vllm-ascend's own tests of the hooked sites (releases.UT_FILES) in a child process: plugin inactive
    (VLLM_PLUGINS empty) or every hook active in standard mode (ut_plugin.py loads the general plugins)."""
    try:
        releases.deps()
        folder = releases.prepare(version)
        found = releases.unit_tests(version)
    except releases.Unavailable as exc:
        return "skip", 0, f"vllm-ascend {version} not obtainable here: {exc}"
    if found is None or not found[1]:
        return "skip", 0, f"vllm-ascend {version}: no source archive with tests/ut (wheel-only release)"
    ut_root, files = found
    env = dict(os.environ, VLLM_PLUGINS="indexer_epilog" if hooks else "", VIE_UT_HOOKS="1" if hooks else "0",
               VLLM_LOGGING_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join([str(ut_root), str(folder), str(releases.deps()), str(HERE), str(ROOT)]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "ut_plugin", "-rf",
           "--rootdir", str(ut_root), *files]
    out = subprocess.run(cmd, cwd=ut_root, env=env, capture_output=True, text=True, timeout=600)
    return "ran", out.returncode, out.stdout + out.stderr


UT_SELECTED = [v for v in SELECTED if not releases.BY_VERSION[v].wheel]


@pytest.mark.parametrize("hooks", [False, True], ids=["plugin-inactive", "hooks-active"])
@pytest.mark.parametrize("version", UT_SELECTED)
def test_vllm_ascends_own_unit_tests_of_the_hooked_sites(version: str, hooks: bool) -> None:
    """docs/ascend.md's matrix records the results; a failure with hooks active is the hook's or the test's
    mock's fault, said there with the evidence."""
    kind, rc, output = _run_ut(version, hooks)
    if kind == "skip":
        pytest.skip(output)
    tail = output[-6000:]
    assert rc == 0 and " passed" in output and " failed" not in output, f"vllm-ascend {version}:\n{tail}"
