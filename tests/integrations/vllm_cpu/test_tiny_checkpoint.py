"""The tiny DeepSeek-V4's tokenizer and seeded checkpoint, without starting vLLM's engine: the tokenizer covers the
model's 1024 ids with BOS/EOS at 0/1 and round-trips any text; the checkpoint generator writes the same bytes every
run, vLLM's own DeepSeek-V4 loader fills every model parameter from it (each poisoned first), and the tensors have
the magnitudes the generator promises. About 40 s (two checkpoint writes, one model build in a subprocess)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MODEL = ROOT / "configs" / "dsv4-tiny"
CONFIG = json.loads((MODEL / "config.json").read_text())


def _generator():
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


gen = _generator()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gen.write(tmp_path_factory.mktemp("ckpt") / "model")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_ids_and_round_trip() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    assert tok.get_vocab_size() == CONFIG["vocab_size"] == 1024
    assert sorted(tok.get_vocab().values()) == list(range(1024))  # every id the model can emit decodes
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == CONFIG["bos_token_id"] == 0
    assert tok.token_to_id("<｜end▁of▁sentence｜>") == CONFIG["eos_token_id"] == 1
    for text in ["The indexer cache of DeepSeek-V4 stores FP8 codes.", "Ünïcödé → 索引 🙂\ttabs\nnew lines  ",
                 "<｜User｜>hi<｜Assistant｜>"]:
        ids = tok.encode(text).ids
        assert ids and all(0 <= i < 1024 for i in ids)
        assert tok.decode(ids, skip_special_tokens=False) == text
    # The chat specials vLLM's DeepSeek-V4 encoding writes are single ids, not spelled out byte by byte.
    assert len(tok.encode("<｜User｜>").ids) == 1 and len(tok.encode("<｜Assistant｜>").ids) == 1


def test_tokenizer_as_transformers_loads_it() -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL))
    assert len(tok) == 1024 and (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    text = "Ünïcödé → 索引"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# ------------------------------------------------------------------------------------------------ checkpoint
def test_checkpoint_is_deterministic(checkpoint: Path, tmp_path: Path) -> None:
    again = gen.write(tmp_path / "again")
    for name in ["model.safetensors", *gen.FILES]:
        assert _sha256(checkpoint / name) == _sha256(again / name), name
    for name in gen.FILES:  # the model directory carries the bundled config and tokenizer unchanged
        assert (checkpoint / name).read_bytes() == (MODEL / name).read_bytes()


def test_checkpoint_cache_key_follows_its_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_INDEXER_EPILOG_CACHE", str(tmp_path))
    first = gen.model_dir()
    assert first.parent == tmp_path and first.name.startswith("dsv4-tiny-")
    monkeypatch.setattr(gen, "SOURCE", tmp_path / "src")
    (tmp_path / "src").mkdir()
    for name in gen.FILES:
        (tmp_path / "src" / name).write_bytes((MODEL / name).read_bytes())
    assert gen.model_dir() == first
    (tmp_path / "src" / "config.json").write_text((MODEL / "config.json").read_text()+ " ")
    assert gen.model_dir() != first


def test_checkpoint_magnitudes(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "model.safetensors"))
    specs = gen.specs(CONFIG)
    assert set(weights) == set(specs)
    for name, (shape, dtype, rule) in specs.items():
        t = weights[name]
        assert tuple(t.shape) == shape and t.dtype == getattr(torch, dtype), name
        kind, _, arg = rule.partition(":")
        if kind == "normal" and t.numel() >= 1024:
            std = float(t.float().std())
            assert abs(std / float(arg) - 1) < 0.1 and abs(float(t.float().mean())) < 0.1 * float(arg), (name, std)
        elif kind == "norm":
            assert abs(float(t.float().mean()) - 1) < 0.01 and float(t.float().std()) < 0.05, name
    # Linear projections N(0, 1/fan_in): an O(1) input gives an O(1) output at every layer.
    assert math.isclose(float(weights["layers.0.attn.wq_b.weight"].float().std()), 1 / math.sqrt(128), rel_tol=0.05)
    assert math.isclose(float(weights["embed.weight"].float().std()), 1.0, rel_tol=0.05)
    table = weights["layers.0.ffn.gate.tid2eid"]
    assert table.shape == (CONFIG["vocab_size"], CONFIG["num_experts_per_tok"])
    assert int(table.min()) >= 0 and int(table.max()) < CONFIG["n_routed_experts"]
    assert all(len(set(row)) == CONFIG["num_experts_per_tok"] for row in table.tolist())  # distinct experts
    assert float(weights["layers.1.ffn.gate.bias"].abs().max()) < 0.1
    # Hyper-connections: pre gates sum to ~1, post gates ~1, the stream mix starts near the identity.
    hc = CONFIG["hc_mult"]
    base = weights["layers.0.hc_attn_base"]
    assert math.isclose(float(torch.sigmoid(base[:hc]).sum()), 1.0, rel_tol=1e-6)
    assert torch.equal(base[hc:2 * hc], torch.zeros(hc))
    comb = torch.softmax(base[2 * hc:].view(hc, hc), dim=-1)
    assert bool((comb.diagonal() > 0.5).all())


def test_vllm_loads_every_parameter(checkpoint: Path) -> None:
    """vLLM's DeepSeek-V4 loader, as `vllm serve` runs it, maps every checkpoint tensor and fills every parameter:
    each is poisoned (NaN, -1) before loading and none is left so. vLLM's own check cannot say this, since it
    exempts every unquantized linear layer."""
    pytest.importorskip("vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the Triton backend tests; not for vLLM
    proc = subprocess.run([sys.executable, str(HERE / "tiny_checkpoint_load.py"), str(checkpoint)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["not_loaded"] == [] and result["poisoned"] == [], result
    assert result["checkpoint_tensors"] == len(gen.specs(CONFIG))
    assert 50e6 < result["numel"] < 60e6, result["numel"]
