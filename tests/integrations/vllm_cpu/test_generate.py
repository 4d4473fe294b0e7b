"""The bundled tiny DeepSeek-V4 generates through vLLM's CPU platform on this host, with the compat layer
installed by the plugin: offline (vllm.LLM) and through the `vllm serve` CLI on 127.0.0.1. One prompt of each
pair is past 2048 tokens, so the indexer's top-k reads its cache (max_seq_len // 4 > index_topk): the plugin's
stats file (VLLM_INDEXER_EPILOG_STATS_DIR) shows its writer wrote the indexer rows and vLLM's reader read them
(no flag: standard e4m3fn, which vLLM's reader reads).

Host-dependent, both asserted: without AVX512-BF16 the compat layer defines all 16 DeepSeek-V4 ops and its call
log (VLLM_INDEXER_EPILOG_CPU_CALL_LOG) shows fp8_paged_mqa_logits_cpu and topk_transform_512_cpu ran; with it,
vLLM's own library has them, the layer defines none (its log line says it kept them) and no compat op runs.
Each vLLM runs in its own process; every wait is bounded. ~4-5 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from serving import Server  # noqa: E402
from vllm_indexer_epilog.integrations.vllm_cpu_compat import OP_NAMES  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODEL = ROOT / "configs" / "dsv4-tiny"
LONG = 2300  # > 4 * index_topk (512) = 2048
INDEXER_READ_OPS = {"fp8_paged_mqa_logits_cpu", "topk_transform_512_cpu"}
# vLLM loads its _C library with the DeepSeek-V4 ops only on AVX512-BF16 hosts (platforms/cpu.py).
VLLM_HAS_OPS = torch.cpu._is_avx512_bf16_supported()

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="vLLM's CPU platform on Linux")]


def _env(call_log: Path, stats_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_INDEXER_EPILOG_CPU_CALL_LOG=str(call_log), PYTHONUNBUFFERED="1")
    if stats_dir is not None:
        env["VLLM_INDEXER_EPILOG_STATS_DIR"] = str(stats_dir)
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the Triton backend tests; not for vLLM
    return env


def _ops_called(call_log: Path) -> set[str]:
    if not call_log.exists():
        return set()
    return {line.split()[1] for line in call_log.read_text().splitlines() if len(line.split()) == 3}


def _assert_ops_served(log: str, call_log: Path) -> None:
    """Who served the 16 DeepSeek-V4 ops: the compat layer (defined all, its ops ran) or vLLM (kept all)."""
    called = _ops_called(call_log)
    if VLLM_HAS_OPS:
        assert "vllm_cpu: defined " not in log, log[-4000:]
        assert f"vllm_cpu: vLLM's library has {', '.join(OP_NAMES)}; kept" in log, log[-4000:]
        assert called == set(), called  # no compat op ran
    else:
        assert "vllm_cpu: defined 16 op(s)" in log, log[-4000:]
        assert INDEXER_READ_OPS <= called, call_log.read_text() if call_log.exists() else "no call log"


def _assert_indexer_read(stats: list[dict]) -> None:
    """The worker's stats: the plugin's writer wrote the indexer rows, vLLM's reader read them past index_topk."""
    stats = [s for s in stats if s["rows_written"]]
    assert len(stats) == 1, stats  # one worker process
    (s,) = stats
    assert s["enabled"] and s["mode"] == "standard" and s["fp8"] == "float8_e4m3fn", s
    assert s["rows_written"] >= LONG // 4, s
    assert s["reads"]["vllm"] > 0 and s["reads"]["plugin"] == 0, s["reads"]
    assert s["max_read_len"] > 512, s  # compressed positions beyond index_topk: the top-k really selected


def _read_stats(stats_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(stats_dir.glob("*.json"))]


def test_offline_generate(tmp_path: Path) -> None:
    call_log = tmp_path / "calls.txt"
    stats_dir = tmp_path / "stats"
    cmd = [sys.executable, str(HERE / "tiny_generate.py"), "--lens", "16", str(LONG), "--max-tokens", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(call_log, stats_dir), capture_output=True, text=True,
                          timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert [len(t) for t in result["tokens"]] == [3, 3], result
    assert all(0 <= tok < 1024 for toks in result["tokens"] for tok in toks)
    _assert_ops_served(out, call_log)
    _assert_indexer_read(_read_stats(stats_dir))


def test_vllm_serve_completions(tmp_path: Path) -> None:
    vllm_cli = Path(sys.executable).with_name("vllm")
    assert vllm_cli.exists(), "the vllm console script (vllm-cpu) is not installed next to this Python"
    version = subprocess.run([str(vllm_cli), "--version"], capture_output=True, text=True, timeout=120,
                             env=_env(tmp_path / "v.txt"))
    assert version.returncode == 0 and "+cpu" in version.stdout, version.stdout + version.stderr[-2000:]

    call_log = tmp_path / "calls.txt"
    # No flag: what a user gets from `vllm serve` with the plugin merely installed.
    with Server(env=_env(call_log), workdir=tmp_path / "serve", max_num_seqs=4) as server:
        for n in (16, LONG):
            reply = server.complete([(7 * i + 3) % 1000 + 2 for i in range(n)], max_tokens=2)
            assert reply["usage"]["prompt_tokens"] == n and reply["usage"]["completion_tokens"] == 2, reply
            assert reply["finish_reason"] == "length" and len(reply["token_ids"]) == 2, reply
        log = server.log_text()
        stats = server.stats()
    _assert_ops_served(log, call_log)
    _assert_indexer_read(stats)
