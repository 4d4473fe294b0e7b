"""CPU benchmark of custom.indexer_compress_epilog (compiled kernel) against the eager reference.

Prints a markdown table: median time, GB/s (bytes read + written), fraction of this machine's
memcpy bandwidth measured in the same run, speed-up over the eager torch reference, and the peak
resident memory the call adds beyond its inputs and outputs.

A second table times decode-size calls (T = 1, 64; d = 128; bf16 -> e4m3fn; int64 slots; a paged cache
[blocks, 64, 1, 128]) against `index_copy_` of the same rows into the same cache, measured interleaved in
the same run: the floor of any dispatched scatter on this machine.

    python benchmarks/bench_cpu.py [--quick] [--decode-only] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vllm_indexer_epilog  # noqa: E402,F401  (registers the op)
from common import bytes_moved, make_inputs, make_paged_inputs, print_table  # noqa: E402
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog  # noqa: E402


def median_time(fn: Callable[[], None], *, min_reps: int = 5, budget_s: float = 1.0) -> float:
    fn()  # warm-up (first-use build, page faults)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], None]], *, rounds: int = 200, per_round: int = 50) -> dict[str, float]:
    """Median seconds per call of each fn, timed in alternating short bursts so that the load of a shared
    machine affects all of them alike."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return {name: statistics.median(v) for name, v in samples.items()}


def decode_table() -> str:
    """Decode-size calls of the op against index_copy_ of the same rows into the same paged cache."""
    rows = []
    for t in (1, 64):
        cache, scale, x, slots = make_paged_inputs(t, 128)
        codes = torch.zeros(t, 128, dtype=torch.uint8)
        flat = cache.view(-1, 128).view(torch.uint8)
        op = torch.ops.custom.indexer_compress_epilog
        med = interleaved_medians({
            "op": lambda: op(cache, scale, x, slots, quant_mode=1, round_scale=True),
            "index_copy_": lambda: flat.index_copy_(0, slots, codes),
        })
        rows.append({
            "T": t, "d": 128, "cache": "[1024, 64, 1, 128] e4m3fn", "op (us)": f"{med['op'] * 1e6:.2f}",
            "index_copy_ (us)": f"{med['index_copy_'] * 1e6:.2f}", "op / index_copy_": f"{med['op'] / med['index_copy_']:.2f}x",
        })
    return print_table(rows, ["T", "d", "cache", "op (us)", "index_copy_ (us)", "op / index_copy_"])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_mib(fn: Callable[[], None]) -> float:
    """Peak RSS during `fn` above the RSS before it (Linux: clear_refs 5 resets the high-water mark)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status_kib("VmRSS:")
    fn()
    return max(0, _status_kib("VmHWM:") - base) / 1024


def memcpy_gbs(nbytes: int = 256 << 20) -> float:
    """Read + write bandwidth of torch's multi-threaded copy of a buffer larger than any cache."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_reps=10)
    return 2 * nbytes / t / 1e9


CONFIGS_FULL = [(t, d, mode) for d in (128, 4096) for t in (1, 64, 4096, 16384) for mode in (1, 0)]
CONFIGS_QUICK = [(t, d, mode) for d in (128, 4096) for t in (1, 64, 1024) for mode in (1, 0)]


def _calls(t: int, d: int, mode: int):
    cache, scale, x, slots = make_inputs(t, d, quant_mode=mode)
    kw = dict(quant_mode=mode, round_scale=True)
    op = lambda: torch.ops.custom.indexer_compress_epilog(cache, scale, x, slots, **kw)  # noqa: E731
    ref = lambda: reference_indexer_compress_epilog(cache, scale, x, slots, **kw)  # noqa: E731
    return (cache, scale, x, slots), op, ref


def peak_memory_table(configs: list[tuple[int, int, int]]) -> None:
    """Child process: print {config: [op MiB, ref MiB]} as JSON."""
    out = {}
    for t, d, mode in configs:
        _, op, ref = _calls(t, d, mode)
        op(), ref()  # first-use work (kernel load, lazy init) is not the call's memory
        out[f"{t},{d},{mode}"] = [peak_extra_mib(op), peak_extra_mib(ref)]
    print(json.dumps(out))


def measure_peak_memory(quick: bool) -> dict[str, list[float]]:
    # Large buffers must be unmapped when freed, or the RSS high-water mark cannot see temporaries:
    # glibc otherwise keeps freed memory resident. That setting slows allocation, so it is confined to
    # a child process and the timings stay unaffected.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, __file__, "--peak-memory-json"] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    ap.add_argument("--decode-only", action="store_true", help="only the decode-size table")
    ap.add_argument("--peak-memory-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configs = CONFIGS_QUICK if args.quick else CONFIGS_FULL
    if args.peak_memory_json:
        peak_memory_table(configs)
        return
    torch.manual_seed(0)
    decode = decode_table()
    if args.decode_only:
        if args.out:
            args.out.write_text(decode + "\n")
        return
    # This VM's memory bandwidth drifts by tens of percent: memcpy is measured at the start, middle and
    # end, and ratios use the best of the three (the conservative ceiling).
    copy_samples = [memcpy_gbs()]
    rows = []
    for i, (t, d, mode) in enumerate(configs):
        if i == len(configs) // 2:
            copy_samples.append(memcpy_gbs())
        tensors, op, ref = _calls(t, d, mode)
        t_op = median_time(op)
        t_ref = median_time(ref, min_reps=3, budget_s=0.5)
        rows.append({
            "T": t, "d": d, "mode": "standard" if mode == 1 else "MX",
            "time (us)": f"{t_op * 1e6:.1f}", "GB/s": bytes_moved(*tensors) / t_op / 1e9,
            "vs eager ref": f"{t_ref / t_op:.1f}x",
        })
        del tensors, op, ref
    copy_samples.append(memcpy_gbs())
    copy_bw = max(copy_samples)
    head = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; memcpy (read+write) {copy_bw:.1f} GB/s "
            f"(best of {', '.join(f'{c:.1f}' for c in copy_samples)})")
    print("# " + head, flush=True)
    for r in rows:
        r["vs memcpy"] = f"{r['GB/s'] / copy_bw:.0%}"
        r["GB/s"] = f"{r['GB/s']:.2f}"
    peaks = measure_peak_memory(args.quick)
    for r in rows:
        op_mib, ref_mib = peaks[f"{r['T']},{r['d']},{1 if r['mode'] == 'standard' else 0}"]
        r["peak extra (MiB)"] = f"{op_mib:.1f}"
        r["ref peak extra (MiB)"] = f"{ref_mib:.1f}"
    cols = ["T", "d", "mode", "time (us)", "GB/s", "vs memcpy", "vs eager ref", "peak extra (MiB)", "ref peak extra (MiB)"]
    table = print_table(rows, cols)
    if args.out:
        args.out.write_text(f"{head}\n\n{decode}\n\n{table}\n")


if __name__ == "__main__":
    main()
