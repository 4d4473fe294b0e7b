"""Times the pure-torch reference alone (best of 5), to compare it across commits; prints one line per d."""

import time

import torch

from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog as ref


def main() -> None:
    torch.manual_seed(0)
    for d in (128, 4096):
        T = 16384 if d == 128 else 2048
        x = torch.randn(T, d).to(torch.bfloat16)
        c = torch.empty(T, d, dtype=torch.float8_e4m3fn); s = torch.empty(T, (d+127)//128)
        slots = torch.randperm(T)
        ref(c, s, x, slots)
        ts = []
        for _ in range(5):
            t = time.perf_counter(); ref(c, s, x, slots); ts.append(time.perf_counter() - t)
        print(d, f"{min(ts)*1e3:.2f} ms")


if __name__ == "__main__":
    main()
