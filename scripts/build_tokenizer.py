"""Builds the tiny model's tokenizer (configs/dsv4-tiny/tokenizer.json and tokenizer_config.json), offline, with
the `tokenizers` library: a byte-level BPE whose vocabulary is exactly the model's 1024 ids, so any text encodes and
every id the model can emit decodes. Ids 0 and 1 are the BOS/EOS the model config names; the next ids are the
special tokens vLLM's DeepSeek-V4 chat encoding writes as text, so chat requests tokenize them as single ids.

The merges are learned from this repository's own prose (README.md, docs/*.md): English and code-ish text,
deterministic for a given tree. The committed files are the artifact; rerun this only to change them:

    python scripts/build_tokenizer.py [--out configs/dsv4-tiny]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 1024  # configs/dsv4-tiny/config.json: vocab_size
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # ids 0, 1 (config: bos_token_id, eos_token_id)
# What vllm/tokenizers/deepseek_v4_encoding.py writes into a chat prompt besides BOS/EOS.
CHAT_SPECIALS = ["<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜latest_reminder｜>", "｜DSML｜"]


def corpus_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def build(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, *CHAT_SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in corpus_files()], trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise SystemExit(f"trained vocabulary has {tok.get_vocab_size()} ids, the model has {VOCAB_SIZE}")
    if (tok.token_to_id(BOS), tok.token_to_id(EOS)) != (0, 1):
        raise SystemExit("BOS/EOS must be ids 0/1 (the model config's bos_token_id/eos_token_id)")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out / 'tokenizer.json'} ({tok.get_vocab_size()} ids) and tokenizer_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "configs" / "dsv4-tiny")
    build(ap.parse_args().out)


if __name__ == "__main__":
    main()
