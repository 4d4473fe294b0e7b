"""Indexer quality per key format: top-k recall of each quantization mode against float32 keys, on the same
captured queries and keys, plus the agreement between modes and each mode's key error.

    python benchmarks/quality_per_mode.py --out benchmarks/results/quality.md      # serve, capture, analyse
    python benchmarks/quality_per_mode.py --capture-dir DIR                        # analyse an earlier capture

Capture (one `vllm serve` of the tiny DeepSeek-V4 through tests/serving.py's `Server`: its default, the seeded
realistic checkpoint of scripts/make_tiny_checkpoint.py, or `--load-format dummy`; VLLM_INDEXER_EPILOG_CAPTURE_DIR
on): `--prompts` prompts of `--prompt-len` tokens (default 4 x 3000, so 750 compressed positions > index_topk =
512 and the indexer really selects), taken from this repository's prose (README and docs/*.md at a pinned commit,
`--text-rev`) through the bundled tokenizer, each sent alone with a few generated tokens. The plugin records, in
call order, every indexer write (the compressor's bf16 key rows and their slots, before quantization) and
every scoring call's query side (FP8 queries, per-head weights, seq_lens, page table) and top-k.

Analysis (offline, no vLLM): the writes are replayed into one slot -> key store per mode, each made by the op
itself (`indexer_compress_epilog`, the bytes the plugin writes) and decoded exactly as the plugin's reader does;
every captured query row is scored with `scoring.paged_logits`, the function both the plugin's reader and the
compat layer's `fp8_paged_mqa_logits_cpu` use: logits[t] = k_scale[t] * sum_h w[h] * relu(q[h] . k[t]) over the
row's causal length. float32 keys (scale 1) are the reference. Per mode, over the query rows whose causal length
exceeds k (the rows where top-k selects anything):

- recall@k = |selected & reference top-k| / k, tie-aware: a selected position counts when its reference score is
  >= the reference's k-th score (so ties at the boundary of the reference are not counted as misses);
- the agreement between two modes = the mean overlap |A & B| / k of their selections;
- key error = relative RMS of the dequantized keys against the float32 keys, over all written rows.

Sanity check: the server's own top-k captures must equal the offline top-k of the server's mode (rows whose sets
differ only among equal scores are reported apart).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the server harness lives with the end-to-end tests

from vllm_indexer_epilog import indexer_compress_epilog  # noqa: E402
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.indexer_layout import (  # noqa: E402
    IndexerLayout, scales_as_float32,
)
from vllm_indexer_epilog.integrations.dsv4_indexer_cpu.scoring import (  # noqa: E402
    KeyGather, fp8_to_float32, paged_logits,
)
from vllm_indexer_epilog.op.spec import (  # noqa: E402
    HIF8_CACHE_DTYPE, QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD,
)

TOPK = 512  # configs/dsv4-tiny index_topk; topk_transform_512_cpu supports only this
FLOAT32 = "float32"

MODES: dict[str, IndexerLayout] = {
    "standard/e4m3fn": IndexerLayout(torch.float8_e4m3fn, QUANT_MODE_STANDARD),
    "standard/e5m2": IndexerLayout(torch.float8_e5m2, QUANT_MODE_STANDARD),
    "mx round/e4m3fn": IndexerLayout(torch.float8_e4m3fn, QUANT_MODE_MX, True),
    "mx floor/e4m3fn": IndexerLayout(torch.float8_e4m3fn, QUANT_MODE_MX, False),
    "hifloat8": IndexerLayout(HIF8_CACHE_DTYPE, QUANT_MODE_HIFLOAT8),
}
"""The key formats compared (the plugin's flag modes). vLLM's own write (plugin off) is bit-identical to
"mx round/e4m3fn" (power-of-two scale 2^ceil(log2(amax/448)), test_serve_e2e checks it), so it has no row."""

FLAGS: dict[str, dict] = {
    "standard/e4m3fn": {"quant_mode": "standard", "fp8_dtype": "float8_e4m3fn"},
    "standard/e5m2": {"quant_mode": "standard", "fp8_dtype": "float8_e5m2"},
    "mx round/e4m3fn": {"quant_mode": "mx", "round_scale": True, "fp8_dtype": "float8_e4m3fn"},
    "mx floor/e4m3fn": {"quant_mode": "mx", "round_scale": False, "fp8_dtype": "float8_e4m3fn"},
    "hifloat8": {"quant_mode": "hifloat8"},
}
"""`--additional-config` indexer_epilog flag of each mode (for the capture server)."""


# ------------------------------------------------------------------------------------------------- keys
def quantize_keys(x: torch.Tensor, layout: IndexerLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `x` [n, 128] through the op in `layout`'s mode, decoded as the plugin's reader decodes them:
    (codes as float32 [n, 128], key scale as float32 [n])."""
    n = x.shape[0]
    codes = torch.zeros(n, x.shape[1], dtype=layout.fp8_dtype)
    scales = torch.zeros(n, 1, dtype=layout.scale_dtype)
    indexer_compress_epilog(codes, scales, x, torch.arange(n), quant_mode=layout.quant_mode,
                            round_scale=layout.round_scale)
    return layout.codes_to_float32(codes.view(torch.uint8)), scales_as_float32(scales.view(torch.uint8), layout)


@dataclass
class KeyStore:
    """What one key format's cache holds, by vLLM slot: decoded codes (float32 [slots, 128]) and key scales
    (float32 [slots]). Grows to the largest slot written; a slot rewritten later (a freed block reused) holds
    the newest row, as the paged cache does."""

    codes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 128))
    scale: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def write(self, slots: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        need = int(slots.max()) + 1 if slots.numel() else 0
        if need > self.codes.shape[0]:
            size = max(need, 2 * self.codes.shape[0])
            self.codes = torch.cat([self.codes, torch.zeros(size - self.codes.shape[0], self.codes.shape[1])])
            self.scale = torch.cat([self.scale, torch.zeros(size - self.scale.shape[0])])
        self.codes[slots] = codes.float()
        self.scale[slots] = scale.float()

    def gather(self, block_size: int) -> KeyGather:
        """The `paged_logits` key reader of this store: (pages, offsets) -> (codes, scales) at those slots."""
        def gather(pages: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            slots = pages.long() * block_size + offsets.long()
            return self.codes[slots], self.scale[slots]

        return gather


def score(q: torch.Tensor, weight: torch.Tensor, seq_lens: torch.Tensor, page_table: torch.Tensor, block_size: int,
          max_seq_len: int, store: KeyStore) -> torch.Tensor:
    """The indexer's logits [B, max_seq_len] for float32 queries `q` [B, H, 128] against `store`'s keys: the same
    `paged_logits` as the plugin's reader and the compat layer's op (-inf beyond each row's causal length)."""
    return paged_logits(q, weight, seq_lens, page_table, block_size, max_seq_len, store.gather(block_size))


# ------------------------------------------------------------------------------------------------- top-k
def topk_positions(logits: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Top-k positions [B, k] of each row (callers pass only rows with more than k valid positions)."""
    return torch.topk(logits, k, dim=1).indices


def recall_at_k(selected: torch.Tensor, ref_logits: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Per row, the share of `selected` [B, k] positions in the reference top-k, tie-aware: a position counts when
    its reference score reaches the reference's k-th largest score (a tie at the boundary is no miss)."""
    kth = torch.topk(ref_logits, k, dim=1).values[:, -1:]
    hits = torch.gather(ref_logits, 1, selected) >= kth
    return hits.float().sum(1) / k


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """Per row, |A & B| / k for two selections [B, k] (positions, no padding)."""
    n = int(max(a.max(), b.max())) + 1 if a.numel() else 1
    ma = torch.zeros(a.shape[0], n, dtype=torch.bool).scatter_(1, a, True)
    mb = torch.zeros(b.shape[0], n, dtype=torch.bool).scatter_(1, b, True)
    return (ma & mb).sum(1).float() / k


# ------------------------------------------------------------------------------------------------- capture
TEXT_REV = "8a8473f"
"""The commit whose README and docs/*.md the prompts are cut from (the one that added the tokenizer): pinned, so
later edits of the docs do not change the prompts, hence the keys and queries, of a rerun."""


def prose_at(rev: str) -> str:
    """README.md and docs/*.md as of commit `rev` (git show), joined: the prompts' text."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=60).stdout

    docs = sorted(p for p in git("ls-tree", "--name-only", rev, "docs/").split() if p.endswith(".md"))
    return "\n\n".join(git("show", f"{rev}:{p}") for p in ["README.md", *docs])


def prose_prompts(n: int, length: int, rev: str = TEXT_REV) -> list[list[int]]:
    """`n` prompts of `length` token ids: BOS, then consecutive stretches of this repository's prose (README and
    docs at commit `rev`) encoded with the bundled tokenizer, so keys and queries come from text rather than
    uniform noise."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "configs" / "dsv4-tiny" / "tokenizer.json"))
    text = prose_at(rev)
    ids = tok.encode(text, add_special_tokens=False).ids
    need = n * (length - 1)
    if len(ids) < need:
        ids = (ids * (need // max(len(ids), 1) + 1))[:need]
    return [[0, *ids[i * (length - 1) : (i + 1) * (length - 1)]] for i in range(n)]


def capture(out_dir: Path, server_mode: str, prompts: list[list[int]], max_tokens: int,
            load_format: str | None = None) -> dict:
    """Serve once with capture on (one prompt at a time); returns what the analysis reports about the run."""
    from serving import Server

    cap = out_dir / "cap"
    server = Server(flag={"indexer_epilog": FLAGS[server_mode]}, workdir=out_dir,
                    env={"VLLM_INDEXER_EPILOG_CAPTURE_DIR": str(cap), "VLLM_INDEXER_EPILOG_CAPTURE_LIMIT": "100000"},
                    load_format=load_format)
    cmd = server.command()
    t0 = time.monotonic()
    with server:
        for i, p in enumerate(prompts):
            r = server.complete(p, max_tokens)
            print(f"[capture] prompt {i}: {len(p)} tokens, ttft {r['ttft_s']:.1f} s", flush=True)
        lines = server.plugin_lines()
    meta = {"server_mode": server_mode, "load_format": load_format or "seeded checkpoint",
            "model": cmd[cmd.index("serve") + 1], "prompts": [len(p) for p in prompts],
            "max_tokens": max_tokens, "plugin_line": lines[0] if lines else None,
            "serve_s": round(time.monotonic() - t0, 1), "command": " ".join(cmd)}
    (out_dir / "capture.json").write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------------------------------------- analysis
def load_records(cap_dir: Path) -> list[dict]:
    """Capture records in call order (per process: `capture-<pid>-<n>.pt`, n ascending)."""
    files = sorted(cap_dir.glob("capture-*.pt"), key=lambda p: (p.stem.split("-")[1], int(p.stem.split("-")[2])))
    return [torch.load(f, weights_only=False) for f in files]


def analyse(cap_dir: Path, server_mode: str | None, k: int = TOPK) -> dict:
    """Replay the capture through every mode; returns recalls, agreements, key errors and the sanity check."""
    names = [FLOAT32, *MODES]
    stores = {name: KeyStore() for name in names}
    server_store = KeyStore()  # the bytes the server actually wrote, decoded (sanity check)
    server_layout = MODES.get(server_mode) if server_mode else None
    err_num = {m: 0.0 for m in MODES}
    err_den = 0.0
    written = rewritten_equal = 0
    selections: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    recalls: dict[str, list[torch.Tensor]] = {m: [] for m in MODES}
    sanity = {"calls": 0, "rows": 0, "rows_equal": 0, "rows_tie_equal": 0, "rows_differ": 0}
    pending: dict | None = None  # the last read's server-mode logits, until its top-k record arrives
    rows_total = rows_selecting = calls = 0
    for rec in load_records(cap_dir):
        if rec["kind"] == "write":
            slots, x = rec["slots"].long(), rec["x"]
            xf = x.float()
            stores[FLOAT32].write(slots, xf, torch.ones(slots.numel()))
            err_den += float((xf.double() ** 2).sum())
            for m, layout in MODES.items():
                c, s = quantize_keys(x, layout)
                stores[m].write(slots, c, s)
                err_num[m] += float(((c * s[:, None]).double() - xf.double()).pow(2).sum())
            written += slots.numel()
            if server_layout is not None:
                c = server_layout.codes_to_float32(rec["codes"])
                s = scales_as_float32(rec["scale_bytes"], server_layout)
                server_store.write(slots, c, s)
                rewritten_equal += int(torch.equal(c, stores[server_mode].codes[slots])
                                       and torch.equal(s, stores[server_mode].scale[slots])) * slots.numel()
        elif rec["kind"] == "read":
            calls += 1
            dtype = getattr(torch, rec["q_dtype"].rsplit(".", 1)[-1])
            q = fp8_to_float32(rec["q"], dtype)
            args = (rec["weight"], rec["seq_lens"], rec["page_table"], rec["block_size"], rec["max_seq_len"])
            seq = rec["seq_lens"].long()
            sel_rows = (seq > k).nonzero().squeeze(1)
            rows_total += seq.numel()
            rows_selecting += sel_rows.numel()
            ref = score(q, *args, stores[FLOAT32])
            if sel_rows.numel():
                ref_sel = ref[sel_rows]
                selections[FLOAT32].append(topk_positions(ref_sel, k))
                for m in MODES:
                    lg = score(q[sel_rows], rec["weight"][sel_rows], rec["seq_lens"][sel_rows],
                               rec["page_table"][sel_rows], rec["block_size"], rec["max_seq_len"], stores[m])
                    top = topk_positions(lg, k)
                    selections[m].append(top)
                    recalls[m].append(recall_at_k(top, ref_sel, k))
            pending = {"logits": score(q, *args, server_store), "seq": seq} if server_layout is not None else None
        elif rec["kind"] == "topk" and pending is not None:
            sanity["calls"] += 1
            check_topk(rec["raw"], pending["logits"], pending["seq"], k, sanity)
            pending = None
    recall_stats = {m: summary(torch.cat(v)) if v else None for m, v in recalls.items()}
    sel = {n: torch.cat(v) if v else None for n, v in selections.items()}
    agree = {a: {b: (float(overlap(sel[a], sel[b], k).mean()) if sel[a] is not None else None) for b in names}
             for a in names}
    key_err = {m: (err_num[m] / err_den) ** 0.5 if err_den else None for m in MODES}
    return {"k": k, "read_calls": calls, "query_rows": rows_total, "selecting_rows": rows_selecting,
            "written_rows": written, "server_mode": server_mode,
            "server_bytes_equal_op": (rewritten_equal == written) if server_layout is not None else None,
            "recall": recall_stats, "agreement": agree, "key_rel_rms": key_err, "sanity": sanity}


def check_topk(raw: torch.Tensor, logits: torch.Tensor, seq: torch.Tensor, k: int, sanity: dict) -> None:
    """Compare the server's top-k positions with the offline logits of the server's own bytes, row by row."""
    for b in range(raw.shape[0]):
        n = int(seq[b])
        got = raw[b][raw[b] >= 0].long()
        sanity["rows"] += 1
        if n <= k:
            want_ok = set(got.tolist()) == set(range(n))
            sanity["rows_equal" if want_ok else "rows_differ"] += 1
            continue
        want = torch.topk(logits[b, :n], k).indices
        if set(got.tolist()) == set(want.tolist()):
            sanity["rows_equal"] += 1
        elif got.numel() == k and bool((logits[b, got] >= logits[b, want[-1]]).all()):
            sanity["rows_tie_equal"] += 1  # the same k-th score: a different pick among equal logits
        else:
            sanity["rows_differ"] += 1


def summary(r: torch.Tensor) -> dict:
    """Mean, 5th percentile, minimum and share of perfect rows of per-row recalls."""
    return {"mean": float(r.mean()), "p5": float(torch.quantile(r, 0.05)), "min": float(r.min()),
            "exact_rows": float((r == 1).float().mean()), "rows": int(r.numel())}


def markdown(res: dict, meta: dict | None) -> str:
    k = res["k"]
    out = []
    if meta:
        out.append(f"Checkpoint: {meta['load_format']} (`{meta.get('model')}`); capture server mode "
                   f"{meta['server_mode']}; prompts {meta['prompts']} tokens of README + docs at "
                   f"{meta.get('text_rev', 'the working tree')}, {meta['max_tokens']} generated each.")
    out.append(f"{res['read_calls']} scoring calls, {res['query_rows']} query rows, {res['selecting_rows']} with more "
               f"than k = {k} causal positions (the rows counted below); {res['written_rows']} key rows written.")
    out.append("")
    out.append(f"| mode | key rel. RMS error | recall@{k} mean | p5 | min | rows with recall 1 |")
    out.append("|---|---|---|---|---|---|")
    for m, st in res["recall"].items():
        e = res["key_rel_rms"][m]
        if st is None:
            out.append(f"| {m} | {e:.4f} | - | - | - | - |")
        else:
            out.append(f"| {m} | {e:.4f} | {st['mean']:.4f} | {st['p5']:.4f} | {st['min']:.4f} | "
                       f"{100 * st['exact_rows']:.1f}% |")
    out.append("")
    names = list(res["agreement"])
    out.append(f"Agreement between modes (mean |A & B| / {k} over the same rows):")
    out.append("")
    out.append("| | " + " | ".join(names) + " |")
    out.append("|---" * (len(names) + 1) + "|")
    for a in names:
        vals = [res["agreement"][a][b] for b in names]
        out.append(f"| {a} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    s = res["sanity"]
    if res["server_mode"]:
        out.append("")
        out.append(f"Sanity ({res['server_mode']}, the capture server's mode): written bytes equal the op's "
                   f"offline bytes: {res['server_bytes_equal_op']}; server top-k vs offline top-k of those bytes: "
                   f"{s['rows_equal']}/{s['rows']} rows equal, {s['rows_tie_equal']} differ only among equal "
                   f"scores, {s['rows_differ']} differ ({s['calls']} top-k calls).")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture-dir", type=Path, help="analyse this earlier run's directory (holds cap/ and "
                    "capture.json) instead of serving")
    ap.add_argument("--workdir", type=Path, default=None, help="where to serve and capture (default: a new temp dir)")
    ap.add_argument("--server-mode", default="mx round/e4m3fn", choices=list(MODES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=3000)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--text-rev", default=TEXT_REV, help="git commit whose README and docs the prompts come from")
    ap.add_argument("--load-format", choices=["dummy"], default=None,
                    help="serve vLLM's dummy weights instead of the seeded checkpoint")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    args = ap.parse_args()
    if args.capture_dir:
        work = args.capture_dir
        meta_path = work / "capture.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
    else:
        import tempfile

        work = args.workdir or Path(tempfile.mkdtemp(prefix="vie-quality-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"[capture] serving in {work}", flush=True)
        meta = capture(work, args.server_mode, prose_prompts(args.prompts, args.prompt_len, args.text_rev),
                       args.max_tokens, args.load_format)
        meta["text_rev"] = args.text_rev
        (work / "capture.json").write_text(json.dumps(meta, indent=1))
    t0 = time.monotonic()
    res = analyse(work / "cap", meta["server_mode"] if meta else None)
    print(f"[analyse] {time.monotonic() - t0:.1f} s", flush=True)
    text = markdown(res, meta)
    print(text)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"<!-- benchmarks/quality_per_mode.py, {stamp}, {platform.node()} -->\n{text}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "result": res, "date": stamp,
                                         "git": git_head()}, indent=1))
    s = res["sanity"]
    return 0 if s["rows_differ"] == 0 and res["server_bytes_equal_op"] in (True, None) else 1


def git_head() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
