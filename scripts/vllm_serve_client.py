"""The main job (scripts/serve.sh): `vllm serve` of the bundled tiny DeepSeek-V4 with the plugin, a long and a
short prompt, then what the plugin did. The server harness is tests/serving.py, shared with the end-to-end tests.

    python scripts/vllm_serve_client.py --config configs/indexer-epilog-mx.json   # what serve.sh runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # a script, not a package: the harness lives with the tests that use it

from serving import Server, token_prompt, well_formed  # noqa: E402


def summary(server: Server) -> tuple[bool, str]:
    """What the plugin did, as text, and whether it did its job (log line, rows written, the indexer read)."""
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
        out.append(f"  indexer reads: {s['reads']['plugin']} by the plugin's reader, {s['reads']['vllm']} by vLLM's "
                   f"(longest {s['max_read_len']} keys)")
    reads = sum(s["reads"]["plugin"] + s["reads"]["vllm"] for s in stats)
    ok = bool(lines) and bool(stats) and all(s["rows_written"] > 0 for s in stats) and reads > 0
    return ok, "\n".join(out) if out else "the plugin left no trace (no log line, no stats)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "indexer-epilog-mx.json"),
                    help="the --additional-config JSON file (default: MX mode)")
    ap.add_argument("--long", type=int, default=2300, help="tokens of the long prompt (> 2048: the indexer reads)")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    flag = json.loads(Path(args.config).read_text())
    server = Server(flag=flag, workdir=Path(args.workdir) if args.workdir else None)
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
    finally:
        server.stop()
    print("stopped the server")
    ok, text = summary(server)
    print(text)
    if not ok:
        failures.append("the plugin did not log its line, write indexer rows and serve the indexer read")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
