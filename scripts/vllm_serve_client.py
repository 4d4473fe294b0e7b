"""The main job (scripts/serve.sh): `vllm serve` of the bundled tiny DeepSeek-V4 (its seeded checkpoint) with the
plugin, a long and a short token-id prompt, a text completion and a chat request, then what the plugin did. The server
harness is tests/serving.py, shared with the end-to-end tests.

    python scripts/vllm_serve_client.py --config configs/indexer-epilog-mx.json   # what serve.sh runs
    python scripts/vllm_serve_client.py --load-format dummy                        # vLLM's dummy weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # a script, not a package: the harness lives with the tests that use it

from serving import Server, mx_floor_share, token_prompt, well_formed  # noqa: E402

# Rows whose MX scale is the 1e-4 amax floor's: with trained magnitudes the keys are RMS-normalized, amax O(1), and
# almost none are there; more means the keys are near zero and MX mode never exercised its scale rule.
MAX_FLOOR_SHARE = 0.01
TEXT_PROMPT = "The indexer cache of DeepSeek-V4 stores"


def summary(server: Server, check_floor: bool = True) -> tuple[bool, str]:
    """What the plugin did, as text, and whether it did its job (log line, rows written, the indexer read, and in MX
    mode with `check_floor` fewer than MAX_FLOOR_SHARE of the rows on the amax floor)."""
    out = []
    lines = server.plugin_lines()
    for line in lines:
        out.append(f"plugin line: indexer_epilog: {line['site']}: mode={line['mode']} round_scale={line['rs']} "
                   f"fp8={line['fp8']}")
    stats = [s for s in server.stats() if s.get("rows_written") or s.get("reads", {}).get("plugin")]
    for s in stats:
        sc = s["scale"]
        out.append(f"process {s['pid']}: mode={s['mode']} fp8={s['fp8']} round_scale={s['round_scale']}; "
                   f"{s['rows_written']} indexer rows written in {s['write_calls']} calls by {s['writer']}")
        out.append(f"  scales: min {sc['min']!r}, max {sc['max']!r}, mean log2 {sc['mean_log2']!r}, "
                   f"log2 histogram {sc['log2_histogram']}")
        share = mx_floor_share(s)
        if share is not None:
            limit = f"limit {100 * MAX_FLOOR_SHARE:.0f} %" if check_floor else "not checked: dummy weights"
            out.append(f"  MX rows on the 1e-4 amax floor: {100 * share:.2f} % ({limit})")
        out.append(f"  indexer reads: {s['reads']['plugin']} by the plugin's reader, {s['reads']['vllm']} by vLLM's "
                   f"(longest {s['max_read_len']} keys)")
    reads = sum(s["reads"]["plugin"] + s["reads"]["vllm"] for s in stats)
    ok = bool(lines) and bool(stats) and all(s["rows_written"] > 0 for s in stats) and reads > 0
    if check_floor:
        ok = ok and all((mx_floor_share(s) or 0.0) < MAX_FLOOR_SHARE for s in stats)
    return ok, "\n".join(out) if out else "the plugin left no trace (no log line, no stats)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "indexer-epilog-mx.json"),
                    help="the --additional-config JSON file (default: MX mode)")
    ap.add_argument("--long", type=int, default=2300, help="tokens of the long prompt (> 2048: the indexer reads)")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--load-format", choices=["dummy"], default=None,
                    help="serve vLLM's dummy weights instead of the seeded checkpoint (no amax-floor check)")
    args = ap.parse_args()
    flag = json.loads(Path(args.config).read_text())
    server = Server(flag=flag, workdir=Path(args.workdir) if args.workdir else None, load_format=args.load_format)
    print(f"starting: {' '.join(server.command()[:3])} ... (log: {server.log_path})", flush=True)
    t0 = time.perf_counter()
    server.start()
    try:
        if not server.wait_ready():
            print(f"FAILED: vllm serve exited during start-up; last lines of {server.log_path}:\n{server.log_tail()}")
            return 1
        print(f"ready on {server.url} after {time.perf_counter() - t0:.0f} s", flush=True)
        failures = []
        for n in (args.long, args.short):
            resp = server.complete(token_prompt(n, n), args.max_tokens)
            good = well_formed(resp, args.max_tokens, n)
            print(f"prompt of {n} tokens -> {resp['token_ids']} ({resp['elapsed_s']:.1f} s, "
                  f"{'ok' if good else 'MALFORMED'})", flush=True)
            if not good:
                failures.append(f"malformed response to the {n}-token prompt: {resp}")
        resp = server.complete(TEXT_PROMPT, args.max_tokens)
        good = well_formed(resp, args.max_tokens, None) and bool(resp["text"])
        print(f"text prompt {TEXT_PROMPT!r} -> {resp['text']!r} ({'ok' if good else 'MALFORMED'})", flush=True)
        if not good:
            failures.append(f"malformed response to the text prompt: {resp}")
        chat = server.chat("What does the indexer cache hold?", args.max_tokens)
        answer = chat["choices"][0]["message"].get("content")
        good = chat["usage"]["completion_tokens"] == args.max_tokens and isinstance(answer, str)
        print(f"chat -> {answer!r} ({'ok' if good else 'MALFORMED'})", flush=True)
        if not good:
            failures.append(f"malformed chat response: {chat}")
    finally:
        server.stop()
    print("stopped the server")
    ok, text = summary(server, check_floor=args.load_format is None)
    print(text)
    if not ok:
        floor = "" if args.load_format else f", with < {100 * MAX_FLOOR_SHARE:.0f} % of MX rows on the floor"
        failures.append(f"the plugin did not log its line, write indexer rows and serve the indexer read{floor}")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
