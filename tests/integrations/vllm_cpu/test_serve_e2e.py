"""End to end: `vllm serve` of the tiny DeepSeek-V4 (its seeded checkpoint, scripts/make_tiny_checkpoint.py) with
the plugin auto-loaded, one server per mode (standard/e4m3fn, MX round/e4m3fn, MX floor/e4m3fn, standard/e5m2,
HiFloat8) plus one with the plugin disabled.

Each mode's server gets a > 2048-token prompt and a short one (sequential, then compared with the disabled
server), then 8 concurrent requests, then a text completion and a chat request. Asserted: the plugin's log line,
well-formed responses (text and chat included), in MX modes fewer than 1 % of the rows on the 1e-4 amax floor,
every indexer row
written equals the op's reference applied to the compressor rows captured in the same run
(VLLM_INDEXER_EPILOG_CAPTURE_DIR), the indexer read ran (through the plugin's reader where vLLM's cannot read
the format), vLLM's KV cache size is the same in every mode; in MX round/e4m3fn the codes and scale values equal
what vLLM's own write path writes for the same input (shadow) and the indexer's top-k selections equal those of
the disabled server; in standard mode they agree on >= 99 %. One more server is started with a bad flag: it
must fail start-up naming the field and the source. About 11 minutes on the 2-core CI machine.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from serving import Server, mx_floor_share, token_prompt, well_formed  # noqa: E402

from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE  # noqa: E402

if shutil.which("vllm") is None and not (Path(sys.executable).parent / "vllm").exists():
    pytest.skip("the `vllm` CLI is not installed (scripts/env.sh installs it)", allow_module_level=True)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
LONG, SHORT, MAX_TOKENS = 2300, 16, 4
MODES = {
    "standard-e4m3fn": {"quant_mode": "standard", "fp8_dtype": "float8_e4m3fn"},
    "mx-round-e4m3fn": {"quant_mode": "mx", "round_scale": True, "fp8_dtype": "float8_e4m3fn"},
    "mx-floor-e4m3fn": {"quant_mode": "mx", "round_scale": False, "fp8_dtype": "float8_e4m3fn"},
    "standard-e5m2": {"quant_mode": "standard", "fp8_dtype": "float8_e5m2"},
    # HiF8 codes (uint8) in vLLM's page shape; the float32 scale slot is never written, the plugin reads keys.
    "hifloat8": {"quant_mode": "hifloat8"},
}
FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "n/a": torch.uint8}
QUANT_MODES = {"mx": 0, "standard": 1, "hifloat8": 2}
REPORT: dict[str, object] = {}


def captures(server: Server, kind: str) -> list[dict]:
    files = sorted((server.workdir / "cap").glob("capture-*.pt"))
    records = [torch.load(f, weights_only=False) for f in files]
    return [r for r in records if r["kind"] == kind]


def run_server(name: str, flag: dict, tmp: Path) -> dict:
    """Start, send the comparison prompts then 8 concurrent requests, stop; return everything observed."""
    server = Server(flag={"indexer_epilog": flag}, workdir=tmp / name,
                    env={"VLLM_INDEXER_EPILOG_CAPTURE_DIR": str(tmp / name / "cap"),
                         "VLLM_INDEXER_EPILOG_CAPTURE_LIMIT": "400"})
    with server:
        sequential = [(n, server.complete(token_prompt(n, n), MAX_TOKENS)) for n in (LONG, SHORT)]
        lens = [2100, 16, 40, 2200, 24, 64, 8, 32]
        concurrent = list(zip(lens, server.complete_many([token_prompt(n, 7 * n) for n in lens], MAX_TOKENS, 8)))
        text = server.complete("Which rows does the indexer select? Ünïcödé → 索引", MAX_TOKENS)
        chat = server.chat("What does the indexer cache hold?", MAX_TOKENS)
    return {"server": server, "responses": sequential + concurrent, "text": text, "chat": chat,
            "topk": captures(server, "topk"),
            "writes": captures(server, "write"), "stats": server.stats(), "lines": server.plugin_lines(),
            "kv_tokens": server.kv_cache_tokens()}


def prefill_topk(run: dict) -> torch.Tensor:
    """The indexer's selections for the long prompt's prefill (the first top-k call with LONG query rows)."""
    return next(r["raw"] for r in run["topk"] if r["raw"].shape[0] == LONG)


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    """Mean over query rows of |A & B| / |A| (sets of selected positions, -1 padding ignored); exact equality."""
    shares, exact = [], True
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = {x for x in ra if x >= 0}, {x for x in rb if x >= 0}
        exact &= sa == sb
        shares.append(1.0 if not sa and not sb else len(sa & sb) / max(len(sa), 1))
    return sum(shares) / len(shares), exact


@pytest.fixture(scope="session")
def vie_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve_e2e")


@pytest.fixture(scope="session")
def plugin_off(vie_tmp: Path) -> dict:
    """The disabled plugin's server (vLLM's own write and read), run once and stopped before any other starts."""
    return run_server("off", {"enabled": False}, vie_tmp)


@pytest.mark.parametrize("name", list(MODES))
def test_serve_mode(name: str, plugin_off: dict, vie_tmp: Path) -> None:
    flag = MODES[name]
    run = run_server(name, flag, vie_tmp)
    server = run["server"]

    # The plugin was active, with this mode, in the process that built the model.
    lines = run["lines"]
    assert len(lines) == 1, server.log_tail()
    mx = flag["quant_mode"] == "mx"
    hif8 = flag["quant_mode"] == "hifloat8"
    fp8_name = flag.get("fp8_dtype", "n/a")
    assert lines[0]["mode"] == flag["quant_mode"] and lines[0]["fp8"] == fp8_name
    assert lines[0]["rs"] == (str(flag["round_scale"]).lower() if mx else "n/a")
    assert plugin_off["lines"] == [] and "disabled (enabled=false)" in plugin_off["server"].log_text()

    for n, resp in run["responses"]:
        assert well_formed(resp, MAX_TOKENS, n), (n, resp)
    assert well_formed(run["text"], MAX_TOKENS, None) and run["text"]["text"], run["text"]
    chat = run["chat"]
    assert chat["model"] == "dsv4-tiny" and chat["usage"]["completion_tokens"] == MAX_TOKENS, chat
    assert isinstance(chat["choices"][0]["message"]["content"], str), chat

    # Memory accounting: the same KV cache (tokens, hence blocks) as with vLLM's own format.
    assert run["kv_tokens"] is not None and run["kv_tokens"] == plugin_off["kv_tokens"]

    # Every write: the op's reference of the captured compressor rows, byte for byte.
    writes = run["writes"]
    assert writes and sum(w["slots"].numel() for w in writes) >= LONG // 4
    quant_mode = QUANT_MODES[flag["quant_mode"]]
    fp8 = FP8[fp8_name]
    for w in writes:
        n = w["slots"].numel()
        want_c = torch.zeros(n, 128, dtype=fp8)
        want_s = torch.zeros(n, 1, dtype=SCALE_DTYPE_BY_MODE[quant_mode])
        reference_indexer_compress_epilog(want_c, want_s, w["x"], torch.arange(n), quant_mode=quant_mode,
                                          round_scale=flag.get("round_scale", True))
        assert torch.equal(w["codes"], want_c.view(torch.uint8))
        if not hif8:  # HiFloat8 leaves the scale slot as vLLM allocated it (SPEC: never written)
            assert torch.equal(w["scale_bytes"], want_s.view(torch.uint8).view(n, -1))
        if name == "mx-round-e4m3fn":  # shadow: vLLM's own write path on the same input
            assert torch.equal(w["codes"], w["vllm_codes"])
            got_scale = torch.exp2(w["scale_bytes"][:, 0].double() - 127).float()
            assert torch.equal(got_scale, w["vllm_scale"])

    # The indexer read ran (the long prompts), through the plugin's reader where vLLM's cannot read the format.
    stats = [s for s in run["stats"] if s["rows_written"]]
    assert len(stats) == 1
    if mx:  # trained magnitudes: RMS-normalized keys, amax O(1), scales off the floor
        assert mx_floor_share(stats[0]) < 0.01, stats[0]["scale"]
    reads = stats[0]["reads"]
    ours = mx or hif8 or fp8_name != "float8_e4m3fn"
    assert (reads["plugin"] > 0, reads["vllm"] > 0) == (ours, not ours), reads
    assert stats[0]["max_read_len"] > 512

    # Plugin off vs on, same inputs: the indexer's top-k selections of the long prompt's prefill.
    if name in ("mx-round-e4m3fn", "standard-e4m3fn", "standard-e5m2", "hifloat8"):
        share, exact = agreement(prefill_topk(run), prefill_topk(plugin_off))
        REPORT[name] = share
        print(f"\n{name}: top-k agreement with the plugin disabled: {100 * share:.3f} % (exact: {exact})")
        if name == "mx-round-e4m3fn":
            assert exact
        elif name == "standard-e4m3fn":
            assert share >= 0.99


def test_bad_flag_fails_start_up(vie_tmp: Path) -> None:
    """A bad value given through --hf-overrides stops `vllm serve` at model build, naming field and source."""
    server = Server(hf_overrides={"indexer_epilog": {"quant_mode": "mxfp4"}}, workdir=vie_tmp / "bad")
    server.start()
    try:
        assert server.wait_ready() is False
        assert server.wait_exit(60) != 0
    finally:
        server.stop()
    log = server.log_text()
    assert "model config (config.json / --hf-overrides): indexer_epilog.quant_mode must be" in log, server.log_tail()
    assert "'mxfp4'" in log
