"""Generate with the bundled tiny DeepSeek-V4 (its seeded checkpoint, or `--load-format dummy`) through vllm.LLM on
vLLM's CPU platform.

    python tests/integrations/vllm_cpu/tiny_generate.py --lens 16 2300 --max-tokens 4

Prints one JSON line prefixed "RESULT " (tokens per prompt, start-up and generate seconds, peak RSS of
the process tree: this process, vLLM's engine core and its worker).
Used by test_generate.py and benchmarks/bench_vllm_cpu.py; runs in its own process (vLLM's engine is
not something to start twice, or inside pytest's process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "configs" / "dsv4-tiny"


class TreeRss:
    """Samples the RSS of this process and all its descendants (vLLM's engine core and worker run in
    child processes) every `period` seconds; `peak_mib` is the largest sum seen."""

    def __init__(self, period: float = 0.25) -> None:
        import psutil  # a vLLM dependency

        self._proc = psutil.Process()
        self._psutil = psutil
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        total = 0
        for proc in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except self._psutil.Error:
                pass
        self.peak_mib = max(self.peak_mib, total / 2**20)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.sample()

    def stop(self) -> float:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=5)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
        return max(self.peak_mib, own)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lens", type=int, nargs="+", default=[16, 2300])
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-format", choices=["dummy"], default=None,
                    help="vLLM's dummy weights instead of the seeded checkpoint (scripts/make_tiny_checkpoint.py)")
    args = ap.parse_args()
    if args.load_format == "dummy":
        model, load = MODEL, {"load_format": "dummy"}
    else:
        sys.path.insert(0, str(ROOT / "tests"))  # a script: the harness's one way to the checkpoint
        from serving import checkpoint_dir

        model, load = checkpoint_dir(), {}

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    rss = TreeRss()
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(model),
        **load,
        skip_tokenizer_init=True,  # token-id prompts only
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=4,
        gpu_memory_utilization=0.1,
        seed=args.seed,
    )
    startup_s = time.perf_counter() - t0

    rng = random.Random(args.seed)
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(2, 1000) for _ in range(n)]) for n in args.lens]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - t1
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({
        "lens": args.lens, "max_tokens": args.max_tokens, "tokens": tokens,
        "startup_s": round(startup_s, 2), "generate_s": round(generate_s, 2), "peak_rss_mib": round(rss.stop()),
    }), flush=True)


if __name__ == "__main__":
    main()
