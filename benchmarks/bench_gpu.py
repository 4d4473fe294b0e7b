"""GPU benchmark of the Triton backend against baselines measured in the same run.

For T in {1, 8, 64, 1024, 16384, 65536} x d in {128, 4096} x {standard, MX}: median time (CUDA-graph
replay for T <= 64, triton.testing.do_bench otherwise), effective bandwidth (bytes read + written),
ratio to this GPU's device-to-device copy bandwidth, and speed-ups over the eager torch reference,
torch.compile of the reference (Inductor's fused kernel), and a two-kernel composition (per-128-group
quantize into a scratch buffer, then index_copy_ into the cache).

    python benchmarks/bench_gpu.py --out DIR     # writes DIR/bench_gpu.json, .md and bandwidth_d*.png
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton.testing  # noqa: E402

import vllm_indexer_epilog  # noqa: E402,F401
from common import bytes_moved, make_inputs, print_table  # noqa: E402
from vllm_indexer_epilog.op.reference import quantize_rows, reference_indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.op.spec import FP8_FORMATS  # noqa: E402
from vllm_indexer_epilog.backends.triton_kernel import triton_indexer_compress_epilog  # noqa: E402

TS = [1, 8, 64, 1024, 16384, 65536]
DS = [128, 4096]
GRAPH_MAX_T = 64


def time_graph_replay(fn: Callable[[], None], replays: int = 500) -> float:
    """Seconds per call when the call is one CUDA graph replayed back to back (decode-style)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(20):
        graph.replay()
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / replays)
    return sorted(samples)[len(samples) // 2]


def time_call(fn: Callable[[], None], graph: bool) -> float:
    if graph:
        return time_graph_replay(fn)
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    """Read + write bytes/s of a 1 GiB device-to-device copy."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    t = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median") / 1e3
    return 2 * n / t


def baselines(cache, scale, x, slots, quant_mode: int) -> dict[str, Callable[[], None]]:
    fmt = FP8_FORMATS[cache.dtype]
    t, d = x.shape
    cache_u8 = cache.view(torch.uint8).view(-1, d)
    scale_rows = scale.view(-1, scale.shape[-1])
    scale_store = scale_rows if quant_mode == 1 else scale_rows.view(torch.uint8)

    def compiled_body(c, s, xx, sl):
        codes, scales = quantize_rows(xx, fmt, quant_mode, True)
        c.index_copy_(0, sl, codes)
        s.index_copy_(0, sl, scales)

    compiled = torch.compile(compiled_body, fullgraph=True, dynamic=False)
    tmp_c = torch.empty(t, d, dtype=cache.dtype, device=x.device)
    tmp_s = torch.empty(t, scale.shape[-1], dtype=scale.dtype, device=x.device)
    identity = torch.arange(t, device=x.device)
    tmp_s_store = tmp_s if quant_mode == 1 else tmp_s.view(torch.uint8)

    def two_kernels():
        triton_indexer_compress_epilog(tmp_c, tmp_s, x, identity, quant_mode=quant_mode)
        cache_u8.index_copy_(0, slots, tmp_c.view(torch.uint8))
        scale_store.index_copy_(0, slots, tmp_s_store)

    return {
        "eager reference": lambda: reference_indexer_compress_epilog(cache, scale, x, slots, quant_mode=quant_mode),
        "torch.compile(reference)": lambda: compiled(cache_u8, scale_store, x, slots),
        "quant kernel + index_copy_": two_kernels,
    }


def plot(rows: list[dict], out: Path, copy_gbs: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for d in DS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for mode in ("standard", "MX"):
            sel = [r for r in rows if r["d"] == d and r["mode"] == mode]
            ax.plot([r["T"] for r in sel], [r["GB/s"] for r in sel], marker="o", label=f"epilog ({mode})")
            for name, style in (("torch.compile(reference)", "--"), ("quant kernel + index_copy_", ":")):
                pts = [(r["T"], r["baseline GB/s"].get(name)) for r in sel if r["baseline GB/s"].get(name)]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, marker=".", label=f"{name} ({mode})")
        ax.axhline(copy_gbs, color="gray", linewidth=1, label="device copy")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows T")
        ax.set_ylabel("GB/s (read + written)")
        ax.set_title(f"indexer_compress_epilog, d = {d}, bf16 -> e4m3fn, {torch.cuda.get_device_name()}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"bandwidth_d{d}.png"
        fig.savefig(path, dpi=120)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth() / 1e9
    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, triton {triton.__version__}; device copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for d in DS:
        for t in TS:
            for quant_mode in (1, 0):
                cache, scale, x, slots = make_inputs(t, d, device="cuda", quant_mode=quant_mode)
                graph = t <= GRAPH_MAX_T
                op = lambda: torch.ops.custom.indexer_compress_epilog(cache, scale, x, slots, quant_mode=quant_mode)  # noqa: E731
                t_op = time_call(op, graph)
                nbytes = bytes_moved(cache, scale, x, slots)
                row = {"T": t, "d": d, "mode": "standard" if quant_mode == 1 else "MX", "timing": "graph replay" if graph else "do_bench",
                       "time_us": t_op * 1e6, "GB/s": nbytes / t_op / 1e9, "vs copy": nbytes / t_op / 1e9 / copy_gbs,
                       "speedup": {}, "baseline GB/s": {}, "errors": {}}
                for name, fn in baselines(cache, scale, x, slots, quant_mode).items():
                    try:
                        # The eager reference syncs (slot check), so it cannot be captured in a graph.
                        t_b = time_call(fn, graph and name != "eager reference")
                        row["speedup"][name] = t_b / t_op
                        row["baseline GB/s"][name] = nbytes / t_b / 1e9
                    except Exception as exc:  # a baseline that fails is reported, not fatal
                        row["errors"][name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                        traceback.print_exc()
                rows.append(row)
                print(json.dumps(row), flush=True)
                del cache, scale, x, slots
                torch.cuda.empty_cache()
    table_rows = [{
        "T": r["T"], "d": r["d"], "mode": r["mode"], "timing": r["timing"], "time (us)": f"{r['time_us']:.2f}",
        "GB/s": f"{r['GB/s']:.0f}", "vs copy": f"{r['vs copy']:.0%}",
        **{f"vs {k}": (f"{r['speedup'][k]:.2f}x" if k in r["speedup"] else "n/a") for k in
           ("eager reference", "torch.compile(reference)", "quant kernel + index_copy_")},
    } for r in rows]
    header = f"{device}; torch {torch.__version__}; triton {triton.__version__}; device-to-device copy {copy_gbs:.0f} GB/s (read+write)"
    print(header)
    table = print_table(table_rows, list(table_rows[0]))
    plots = plot(rows, args.out, copy_gbs)
    (args.out / "bench_gpu.md").write_text(f"{header}\n\n{table}\n")
    (args.out / "bench_gpu.json").write_text(json.dumps({"device": device, "copy_GBps": copy_gbs, "rows": rows, "plots": plots}, indent=1))


if __name__ == "__main__":
    main()
