"""Serving benchmark: `vllm serve` of the tiny DeepSeek-V4 with the plugin on (each mode asked for) vs off
(`enabled: false`, vLLM's own indexer write and read), the same prompts, in one run.

    .venv/bin/python benchmarks/bench_serving.py                 # MX round/e4m3fn and standard/e4m3fn vs off
    .venv/bin/python benchmarks/bench_serving.py --modes mx --rounds 1 --quick

Servers run one at a time (127.0.0.1, free port, stopped by pid). Per server: one warm-up request, then
`--rounds` rounds of the workload (long prompts > 2048 tokens, so the indexer writes and reads, and short ones,
`--concurrency` in flight); the best round counts (least disturbed by the shared machine). Reported per server:
throughput (prompt + generated tokens per second of wall time, and generated tokens per second) and time to
first token (median over requests, long and short separately); then each mode's ratio to off (target: on >=
0.95x off). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the server harness lives with the end-to-end tests

from serving import Server, token_prompt, well_formed  # noqa: E402

MODES = {
    "off": {"enabled": False},
    "mx": {"quant_mode": "mx", "round_scale": True, "fp8_dtype": "float8_e4m3fn"},
    "mx-floor": {"quant_mode": "mx", "round_scale": False, "fp8_dtype": "float8_e4m3fn"},
    "standard": {"quant_mode": "standard", "fp8_dtype": "float8_e4m3fn"},
    "standard-e5m2": {"quant_mode": "standard", "fp8_dtype": "float8_e5m2"},
}


def workload(quick: bool) -> list[list[int]]:
    lens = [2300, 16, 64, 2100, 32, 128] if not quick else [2300, 16, 64]
    return [token_prompt(n, 1000 + i) for i, n in enumerate(lens)]


def run_round(server: Server, prompts: list[list[int]], max_tokens: int, concurrency: int) -> dict:
    t0 = time.perf_counter()
    resps = server.complete_many(prompts, max_tokens, concurrency)
    wall = time.perf_counter() - t0
    for p, r in zip(prompts, resps):
        if not well_formed(r, max_tokens, len(p)):
            raise RuntimeError(f"malformed response: {r}")
    prompt_tokens = sum(len(p) for p in prompts)
    gen = len(prompts) * max_tokens
    long_ttft = [r["ttft_s"] for p, r in zip(prompts, resps) if len(p) > 2048]
    short_ttft = [r["ttft_s"] for p, r in zip(prompts, resps) if len(p) <= 2048]
    return {"wall_s": wall, "tok_s": (prompt_tokens + gen) / wall, "gen_tok_s": gen / wall,
            "ttft_long_s": statistics.median(long_ttft), "ttft_short_s": statistics.median(short_ttft)}


def bench(mode: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    with Server(flag={"indexer_epilog": MODES[mode]}, max_num_seqs=max(8, args.concurrency)) as server:
        server.complete(token_prompt(2300, 7), 2)  # warm-up: first long prefill
        rounds = [run_round(server, prompts, args.max_tokens, args.concurrency) for _ in range(args.rounds)]
        lines = server.plugin_lines()
    best = min(rounds, key=lambda r: r["wall_s"])
    best["plugin_line"] = lines[0] if lines else None
    best["rounds_wall_s"] = [round(r["wall_s"], 2) for r in rounds]
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["mx", "standard"], choices=[m for m in MODES if m != "off"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    prompts = workload(args.quick)
    results = {}
    for mode in ["off", *args.modes]:
        print(f"[{mode}] serving ...", flush=True)
        results[mode] = bench(mode, prompts, args)
        r = results[mode]
        print(f"[{mode}] rounds {r['rounds_wall_s']} s; best {r['tok_s']:.1f} tok/s, TTFT long "
              f"{r['ttft_long_s']:.2f} s, short {r['ttft_short_s']:.2f} s", flush=True)
    off = results["off"]
    print(f"\nWorkload: {len(prompts)} requests ({', '.join(str(len(p)) for p in prompts)} prompt tokens), "
          f"{args.max_tokens} generated each, {args.concurrency} in flight; best of {args.rounds} rounds.\n")
    print("| plugin | throughput tok/s | generated tok/s | TTFT long (s) | TTFT short (s) | throughput on/off | "
          "TTFT long off/on |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        ratio = r["tok_s"] / off["tok_s"]
        ttft_ratio = off["ttft_long_s"] / r["ttft_long_s"]
        print(f"| {mode} | {r['tok_s']:.1f} | {r['gen_tok_s']:.2f} | {r['ttft_long_s']:.2f} | "
              f"{r['ttft_short_s']:.2f} | {ratio:.3f} | {ttft_ratio:.3f} |")
    worst = min(results[m]["tok_s"] / off["tok_s"] for m in args.modes)
    print(f"\nworst throughput ratio on/off: {worst:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
