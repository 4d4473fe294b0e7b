"""A seeded, deterministic checkpoint for the bundled tiny DeepSeek-V4 (configs/dsv4-tiny), with the magnitudes of a
trained model, so that serving it exercises what dummy weights cannot: `--load-format dummy` fills every tensor with
tiny uniforms, the indexer keys come out near zero and every MX scale sits on the 1e-4 amax floor.

    python scripts/make_tiny_checkpoint.py            # builds once (cached), prints the model directory
    python scripts/make_tiny_checkpoint.py --out DIR  # writes a fresh copy into DIR (tests: determinism)

The model directory (config.json, tokenizer files, model.safetensors) lives in the package's cache folder
(`~/.cache/vllm_indexer_epilog/`, `VLLM_INDEXER_EPILOG_CACHE` moves it) under a name keyed by the hash of the
config, the tokenizer and this file, so a change to any of them builds a new one; it is written to a temporary
folder and renamed into place, so a reader never sees half a checkpoint and two concurrent builders are harmless.
Tensor names are those of DeepSeek's own checkpoints (`layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`,
...), so vLLM's DeepSeek-V4 loader maps them as it maps a real one. Magnitudes (docs/vllm-cpu.md): norm weights
1 + N(0, 0.02^2); projections, router, experts and head N(0, 1/fan_in); embeddings N(0, 1); hyper-connection
weights that keep the residual mixing near an even, doubly stochastic one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "configs" / "dsv4-tiny"
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
SEED = 20
WEIGHTS = "model.safetensors"
SERVED_NAME = "dsv4-tiny"

NORM_NOISE = 0.02
# Routing bias of a trained DeepSeek router: small next to the O(1) sqrtsoftplus scores it shifts.
GATE_BIAS_STD = 0.01
APE_STD = 0.1  # compressor's per-position score bias
SINK_STD = 0.5  # attention-sink logits
HC_SCALE = 0.5  # how far the hyper-connection mixes move with the input
HC_COMB_DIAG = 2.0  # residual streams mostly keep their own content


def cache_root() -> Path:
    if str(ROOT) not in sys.path:  # run as a script from a tree whose package is not installed
        sys.path.insert(0, str(ROOT))
    from vllm_indexer_epilog.envs import cache_dir  # the package's one cache-folder rule

    return cache_dir()


def key() -> str:
    """Hash of what the checkpoint is made of: the model's files and this generator."""
    h = hashlib.sha256()
    for path in [*(SOURCE / f for f in FILES), Path(__file__).resolve()]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def model_dir() -> Path:
    return cache_root() / f"dsv4-tiny-{key()}"


def specs(config: dict) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """Every tensor of the checkpoint: name -> (shape, dtype name, init rule).

    Rules: "normal:S" N(0, S^2); "norm" 1 + N(0, NORM_NOISE^2); "fill:V"; "hc_base"; "hash" (token -> experts table).
    """
    hidden, n_layers = config["hidden_size"], config["num_hidden_layers"]
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    q_rank, o_rank, groups = config["q_lora_rank"], config["o_lora_rank"], config["o_groups"]
    hc = config["hc_mult"]
    mix_hc, hc_dim = (2 + hc) * hc, hc * hidden
    experts, inter = config["n_routed_experts"], config["moe_intermediate_size"]
    shared_inter = inter * config["n_shared_experts"]
    idx_heads, idx_dim = config["index_n_heads"], config["index_head_dim"]

    out: dict[str, tuple[tuple[int, ...], str, str]] = {}

    def linear(name: str, n_out: int, n_in: int) -> None:
        out[f"{name}.weight"] = ((n_out, n_in), "bfloat16", f"normal:{1 / math.sqrt(n_in)!r}")

    def norm(name: str, dim: int) -> None:
        out[f"{name}.weight"] = ((dim,), "bfloat16", "norm")

    def compressor(prefix: str, dim: int, ratio: int) -> None:
        coff = 2 if ratio == 4 else 1  # overlapping windows for ratio 4 (vLLM's DeepseekCompressor)
        linear(f"{prefix}.wkv", coff * dim, hidden)
        linear(f"{prefix}.wgate", coff * dim, hidden)
        out[f"{prefix}.ape"] = ((ratio, coff * dim), "float32", f"normal:{APE_STD!r}")
        norm(f"{prefix}.norm", dim)

    def hyper(prefix: str, rows: int) -> None:
        out[f"{prefix}_fn"] = ((rows, hc_dim), "float32", f"normal:{1 / math.sqrt(hc_dim)!r}")
        out[f"{prefix}_base"] = ((rows,), "float32", "hc_base")
        out[f"{prefix}_scale"] = ((3 if rows == mix_hc else 1,), "float32", f"fill:{HC_SCALE!r}")

    out["embed.weight"] = ((config["vocab_size"], hidden), "bfloat16", "normal:1.0")
    for i in range(n_layers):
        p = f"layers.{i}"
        ratio = config["compress_ratios"][i]
        hyper(f"{p}.hc_attn", mix_hc)
        hyper(f"{p}.hc_ffn", mix_hc)
        norm(f"{p}.attn_norm", hidden)
        norm(f"{p}.ffn_norm", hidden)
        a = f"{p}.attn"
        out[f"{a}.attn_sink"] = ((heads,), "float32", f"normal:{SINK_STD!r}")
        linear(f"{a}.wq_a", q_rank, hidden)
        linear(f"{a}.wkv", head_dim, hidden)
        norm(f"{a}.q_norm", q_rank)
        linear(f"{a}.wq_b", heads * head_dim, q_rank)
        norm(f"{a}.kv_norm", head_dim)
        linear(f"{a}.wo_a", groups * o_rank, heads * head_dim // groups)
        linear(f"{a}.wo_b", hidden, groups * o_rank)
        if ratio > 1:
            compressor(f"{a}.compressor", head_dim, ratio)
        if ratio == 4:  # only ratio-4 layers have an indexer (vLLM's DeepseekV4Attention)
            linear(f"{a}.indexer.wq_b", idx_heads * idx_dim, q_rank)
            linear(f"{a}.indexer.weights_proj", idx_heads, hidden)
            compressor(f"{a}.indexer.compressor", idx_dim, ratio)
        f = f"{p}.ffn"
        linear(f"{f}.gate", experts, hidden)
        if i < config["num_hash_layers"]:
            out[f"{f}.gate.tid2eid"] = ((config["vocab_size"], config["num_experts_per_tok"]), "int32", "hash")
        else:
            out[f"{f}.gate.bias"] = ((experts,), "float32", f"normal:{GATE_BIAS_STD!r}")
        for e in [*(f"experts.{j}" for j in range(experts)), "shared_experts"]:
            n = shared_inter if e == "shared_experts" else inter
            linear(f"{f}.{e}.w1", n, hidden)
            linear(f"{f}.{e}.w3", n, hidden)
            linear(f"{f}.{e}.w2", hidden, n)
    norm("norm", hidden)
    linear("head", config["vocab_size"], hidden)
    hyper("hc_head", hc)
    return out


def _tensor(name: str, shape: tuple[int, ...], dtype: str, rule: str, config: dict):  # -> torch.Tensor
    import torch

    # One generator per tensor, seeded by its name: a tensor's bytes do not depend on which others exist.
    seed = int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "little")
    gen = torch.Generator().manual_seed(seed)
    kind, _, arg = rule.partition(":")
    if kind == "normal":
        t = torch.randn(shape, generator=gen) * float(arg)
    elif kind == "norm":
        t = 1.0 + NORM_NOISE * torch.randn(shape, generator=gen)
    elif kind == "fill":
        t = torch.full(shape, float(arg))
    elif kind == "hc_base":
        hc = config["hc_mult"]
        if shape[0] == hc:  # hc_head: gates sigmoid(base) = 1/hc, an even average of the streams
            t = torch.full(shape, math.log(1 / (hc - 1)))
        else:  # pre gates sum to 1, post gates 2*sigmoid(0) = 1, comb near identity before Sinkhorn
            t = torch.cat([torch.full((hc,), math.log(1 / (hc - 1))), torch.zeros(hc),
                           (HC_COMB_DIAG * torch.eye(hc)).flatten()])
    elif kind == "hash":
        # A trained model's hash layer: every token routed to k distinct experts.
        t = torch.rand((shape[0], config["n_routed_experts"]), generator=gen).argsort(dim=1)[:, : shape[1]]
    else:
        raise ValueError(f"{name}: unknown init rule {rule!r}")
    return t.to(getattr(torch, dtype)).contiguous()


def write(out: Path) -> Path:
    """Write the complete model directory into `out` (created; must not exist yet)."""
    from safetensors.torch import save_file

    config = json.loads((SOURCE / "config.json").read_text())
    out.mkdir(parents=True)
    for f in FILES:
        shutil.copyfile(SOURCE / f, out / f)
    tensors = {name: _tensor(name, *spec, config) for name, spec in specs(config).items()}
    # One metadata key only: safetensors writes the metadata map in hash order, so two keys can swap between runs.
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    return out


def ensure() -> Path:
    """The cached model directory, built first if it is missing."""
    final = model_dir()
    if (final / WEIGHTS).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp / "model")
        try:
            os.rename(tmp / "model", final)
        except OSError:
            if not (final / WEIGHTS).is_file():  # not another builder's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write a fresh model directory here instead of the cached one")
    args = ap.parse_args()
    print(write(args.out) if args.out else ensure())
    return 0


if __name__ == "__main__":
    sys.exit(main())
