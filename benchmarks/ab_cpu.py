"""A/B of the CPU kernel against an earlier commit's source: both built for the same target (default the AVX2
path, `-march=x86-64-v3`) under their own library names, timed in one process, interleaved.

Each round times, per build, a 256 MiB copy and the op, each after an untimed 64 MiB read (bench_cpu's
`evict`), so every call starts from the same cache state and is paired with a copy timed beside it; every
other round runs in reverse order, so neither build always goes first. Prints one markdown row per (threads, shape, mode, dtypes): per build the median time,
the 90th percentile (a slow tail is what a late thread costs) and the median paired "vs memcpy", and each
build's median time over the first's. BENCHMARKS.md's issue-18 A/B tables came from this.

    python benchmarks/ab_cpu.py --base 47394aa [--march x86-64-v3] [--rounds 21] [--threads 2,1] [--targets]
                                [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import evict, interleaved_samples, paired_ratios  # noqa: E402
from common import bytes_moved, make_inputs  # noqa: E402
from vllm_indexer_epilog.backends import cpu  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
CONFIGS = [(16384, 4096, 1, "bf16", "e4m3fn"), (131072, 128, 1, "bf16", "e4m3fn"),
           (16384, 4096, 0, "bf16", "e4m3fn"), (131072, 128, 0, "bf16", "e4m3fn"),
           (16384, 4096, 1, "bf16", "e5m2"), (131072, 128, 1, "bf16", "e5m2"),
           (16384, 4096, 1, "fp16", "e4m3fn"), (131072, 128, 1, "fp16", "e4m3fn")]
QUICK = [(1024, 4096, 1, "bf16", "e4m3fn"), (8192, 128, 0, "bf16", "e4m3fn")]


def build(csrc: Path, march: str, library: str):
    """Compile `csrc` (a csrc/ folder) once into the package's cache and load it as torch.ops.<library>."""
    flags = cpu._flags(march, library)
    out = cpu.envs.cache_dir() / f"cpu-{cpu._build_key(csrc, flags)}" / f"{library}.so"
    if not out.exists():
        cpu._build(csrc, flags, out, march)
    cpu._load(out)
    return getattr(torch.ops, library).quantize_scatter


def base_csrc(rev: str, into: Path) -> Path:
    """csrc/ as of `rev`, extracted from git into `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "csrc"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the git revision to compare with (its csrc/)")
    ap.add_argument("--march", default="x86-64-v3", help="compiler target of both builds")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", default="2,1", help="thread counts, comma-separated")
    ap.add_argument("--targets", action="store_true", help="only issue 18's four bf16 -> e4m3fn rows")
    ap.add_argument("--quick", action="store_true", help="two small shapes, 3 rounds: a smoke run")
    args = ap.parse_args()
    configs = QUICK if args.quick else CONFIGS[:4] if args.targets else CONFIGS
    tag = args.march.replace("-", "_")
    with tempfile.TemporaryDirectory() as tmp:
        ops = {"base": build(base_csrc(args.base, Path(tmp)), args.march, f"vie_ab_base_{tag}"),
               "this": build(ROOT / "csrc", args.march, f"vie_ab_this_{tag}")}
    src = torch.ones(256 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    rounds = 3 if args.quick else args.rounds
    print(f"# base {args.base} vs this tree, -march={args.march}, {rounds} rounds")
    print("| threads | T | d | mode | x -> cache | base: median, p90, vs memcpy | this: median, p90, vs memcpy "
          "| this/base |\n|---|---|---|---|---|---|---|---|")
    for threads in (int(n) for n in args.threads.split(",")):
        torch.set_num_threads(threads)
        for t, d, mode, xd, cd in configs:
            c, s, x, sl = make_inputs(t, d, quant_mode=mode, x_dtype=DTYPES[xd], cache_dtype=DTYPES[cd])
            fns = {}
            for name, op in ops.items():
                fns[f"{name} copy"] = lambda: dst.copy_(src)
                fns[name] = lambda op=op: op(c, s, x, sl, mode, True)
            smp = interleaved_samples(fns, rounds=rounds, per_round=1, before=evict, alternate=True)
            times = {k: smp[k] for k in ops}
            ratios = {k: paired_ratios(bytes_moved(c, s, x, sl), smp[k], 2 * src.numel(), smp[f"{k} copy"])
                      for k in ops}
            med = {k: statistics.median(v) for k, v in times.items()}
            p90 = {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in times.items()}
            cells = " | ".join(f"{med[k] * 1e3:.2f} ms, {p90[k] * 1e3:.2f} ms, {statistics.median(ratios[k]):.0%}"
                               for k in ops)
            print(f"| {threads} | {t} | {d} | {'standard' if mode == 1 else 'MX'} | {xd} -> {cd} | {cells} | "
                  f"{med['this'] / med['base']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
