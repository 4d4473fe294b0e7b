"""Builds vLLM's DeepSeek-V4 model for configs/dsv4-tiny (no engine, no KV cache), poisons every parameter, loads a
checkpoint directory through the model's own `load_weights`, and prints one JSON line prefixed "RESULT ": the
model's parameters the loader did not report, those still holding poison, and the checkpoint's tensors the loader
mapped to nothing. Used by tests/integrations/vllm_cpu/test_tiny_checkpoint.py, in its own process (vLLM's
distributed state is process-wide).

    python tests/integrations/vllm_cpu/tiny_checkpoint_load.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def main(model_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    from vllm.config import set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype
    import vllm.v1.worker.cpu.shm  # noqa: F401  (the CPU worker's torch.cuda.Event stand-in, which the model builds)

    cfg = EngineArgs(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, max_model_len=4096,
                     max_num_seqs=8).create_engine_config()
    with tempfile.TemporaryDirectory() as tmp, set_current_vllm_config(cfg), \
            set_default_torch_dtype(cfg.model_config.dtype):
        init_distributed_environment(1, 0, f"file://{tmp}/dist", 0, "gloo")
        ensure_model_parallel_initialized(1, 1)
        model = initialize_model(vllm_config=cfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for p in params.values():
                p.fill_(-1 if not p.is_floating_point() else float("nan"))
        weights = load_file(str(model_dir / "model.safetensors"))
        loaded = model.load_weights(iter(weights.items()))
    poisoned = sorted(n for n, p in params.items()
                      if (p.isnan() if p.is_floating_point() else p < 0).any())
    dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in params.items()}
    return {"params": len(params), "not_loaded": sorted(set(params) - set(loaded)), "poisoned": poisoned,
            "checkpoint_tensors": len(weights), "dtypes": dtypes,
            "numel": sum(p.numel() for p in params.values())}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))), flush=True)
