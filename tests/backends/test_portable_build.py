"""Each vector path of the CPU kernel, built beside the native one under its own library name and checked
byte for byte: portable (`-march=x86-64`, no AVX2: what other x86 CPUs get), AVX2 (`-march=x86-64-v3`, what
AVX2-only hosts get, testable on any AVX2 host including an AVX-512 one) and AVX-512 (the native build of a
host with AVX512 F/BW/VL; skipped, with the reason, elsewhere). Outputs are poisoned and inputs drawn fresh,
so a skipped write or a wrong lane shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import GOLDEN_FILES, as_bytes, load_golden, poisoned, random_x
from vllm_indexer_epilog.backends.cpu import build_cpu_kernel
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog
from vllm_indexer_epilog.op.spec import SCALE_DTYPE_BY_MODE, num_groups


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


# (march, library, the path kernel's isa() must report, CPU flags it needs)
BUILDS = {
    "portable": ("x86-64", "vllm_indexer_epilog_cpu_portable_test", "portable", set()),
    "avx2": ("x86-64-v3", "vllm_indexer_epilog_cpu_avx2_test", "avx2", {"avx2", "fma", "f16c", "bmi2"}),
    "avx512": ("native", "vllm_indexer_epilog_cpu_avx512_test", "avx512", {"avx512f", "avx512bw", "avx512vl"}),
}


def _cpu_kernel_line() -> str:
    dump = torch._C._dispatch_dump("custom::indexer_compress_epilog")
    return next((line for line in dump.splitlines() if line.startswith("CPU:")), "")


@pytest.fixture(scope="module", params=sorted(BUILDS))
def built_op(request):
    march, library, isa, needs = BUILDS[request.param]
    missing = sorted(needs - _host_flags())
    if missing:
        pytest.skip(f"{request.param} path not testable here: this CPU lacks {', '.join(missing)}")
    before = _cpu_kernel_line()
    build_cpu_kernel(march=march, library=library)
    # Loading a second build registers its own namespace only; custom::'s CPU kernel is untouched.
    assert _cpu_kernel_line() == before
    ns = getattr(torch.ops, library)
    assert ns.isa() == isa, f"-march={march} built the {ns.isa()} path, not {isa}"
    return ns.quantize_scatter


def test_build_checks_arguments(built_op) -> None:
    cache, scale = poisoned(8, 128, torch.float8_e4m3fn, 1, seed=0)
    before = (as_bytes(cache).copy(), as_bytes(scale).copy())
    x = random_x(2, 128, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="^slot_mapping values"):
        built_op(cache, scale, x, torch.tensor([1, 8]), 1, True)
    with pytest.raises(ValueError, match="^indexer_compress_scale has 1 rows"):
        built_op(cache, scale[:1].contiguous(), x, torch.tensor([1, 2]), 1, True)
    np.testing.assert_array_equal(as_bytes(cache), before[0])
    np.testing.assert_array_equal(as_bytes(scale), before[1])


def test_build_golden(built_op) -> None:
    for path in GOLDEN_FILES:
        g = load_golden(path)
        built_op(g["cache"], g["scale"], g["x"], g["slot_mapping"], g["quant_mode"], g["round_scale"])
        np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1), err_msg=path.name)
        np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1), err_msg=path.name)


def _wide_x(t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows whose magnitudes span float32's whole range (per-row scale 2^-140 .. 2^120, clamped by the dtype):
    groups whose S is subnormal or tiny (the division fallback), huge, and everything between."""
    g = torch.Generator().manual_seed(seed)
    exps = torch.randint(-140, 121, (t, 1), generator=g).double()
    x = (torch.randn(t, d, generator=g, dtype=torch.float64) * torch.exp2(exps)).float()
    return x.to(dtype)


MODES = [(1, True), (0, True), (0, False), (2, True)]
MODE_IDS = ["standard", "mx_ceil", "mx_floor", "hif8"]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_build_matches_reference(built_op, x_dtype, cache_dtype, mode) -> None:
    quant_mode, round_scale = mode
    if quant_mode == 2 and cache_dtype != torch.float8_e4m3fn:
        pytest.skip("HiFloat8 has one code format (uint8)")
    for seed, d in enumerate([1, 128, 200, 4096, 257, 384]):
        for draw in (random_x, _wide_x):
            x = random_x(24, d, x_dtype, seed, specials=10) if draw is random_x else _wide_x(24, d, x_dtype, seed)
            slots = torch.randperm(32)[:24]
            slots[::4] = -1
            got_c, got_s = poisoned(32, d, torch.uint8 if quant_mode == 2 else cache_dtype, quant_mode, seed)
            want_c, want_s = got_c.clone(), got_s.clone()
            built_op(got_c, got_s, x, slots, quant_mode, round_scale)
            reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
            np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c), err_msg=f"d={d} {draw.__name__}")
            np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s), err_msg=f"d={d} {draw.__name__}")


@pytest.mark.parametrize("mode", MODES[:3], ids=MODE_IDS[:3])
def test_build_streaming_paged_write(built_op, mode) -> None:
    """A call large enough for streaming stores (T*d >= 2^20), into a paged [blocks, 64, 1, d] cache with
    shuffled int64 slots and -1 rows."""
    quant_mode, round_scale = mode
    t, d, n = 300, 4096, 384
    x = random_x(t, d, torch.bfloat16, 7, specials=40)
    slots = torch.randperm(n)[:t]
    slots[::7] = -1
    c, s = poisoned(n, d, torch.float8_e4m3fn, quant_mode, seed=5)
    got_c, got_s = c.view(n // 64, 64, 1, d), s.view(n // 64, 64, 1, num_groups(d))
    want_c, want_s = got_c.clone(), got_s.clone()
    built_op(got_c, got_s, x, slots, quant_mode, round_scale)
    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s))


def test_build_packed_pages(built_op) -> None:
    """vLLM's CPU page: [64 rows of codes][64 scales][padding], pages strided; padding bytes stay."""
    nb, bs, d, pad = 6, 64, 128, 192
    for quant_mode in (1, 0):
        sdt = SCALE_DTYPE_BY_MODE[quant_mode]
        ssize = torch.empty((), dtype=sdt).element_size()
        page = bs * d + bs * ssize + pad
        raw = torch.randint(0, 256, (nb * page,), generator=torch.Generator().manual_seed(quant_mode), dtype=torch.uint8)
        values = torch.as_strided(raw.view(torch.float8_e4m3fn), (nb, bs, 1, d), (page, d, d, 1), 0)
        scales = torch.as_strided(raw.view(sdt), (nb, bs, 1, 1), (page // ssize, 1, 1, 1), bs * d // ssize)
        x = random_x(200, d, torch.bfloat16, 11, specials=20)
        slots = torch.randperm(nb * bs)[:200]
        slots[::5] = -1
        want = raw.clone()
        built_op(values, scales, x, slots, quant_mode, True)
        got = raw.clone()
        raw.copy_(want)
        # The reference on contiguous copies, then laid back into the pages.
        rv = values.reshape(nb * bs, d).clone()
        rs = scales.reshape(nb * bs, 1).clone()
        reference_indexer_compress_epilog(rv, rs, x, slots, quant_mode=quant_mode, round_scale=True)
        pages = want.view(nb, page)
        pages[:, : bs * d] = rv.view(torch.uint8).view(nb, -1)
        pages[:, bs * d : bs * d + bs * ssize] = rs.view(torch.uint8).reshape(nb, -1)
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("round_scale", [True, False], ids=["mx_ceil", "mx_floor"])
def test_build_mx_every_bf16_magnitude(built_op, cache_dtype, round_scale) -> None:
    """MX groups of bf16 whose codes are all normal (the vector paths' fast encode, on raw bf16 words):
    every bf16 magnitude from the group's smallest normal quotient up to its amax, both signs, for amax
    across the exponent range (scales 2^-120 .. 2^110), against the reference."""
    fmax = 448.0 if cache_dtype == torch.float8_e4m3fn else 57344.0
    min_normal = 2.0**-6 if cache_dtype == torch.float8_e4m3fn else 2.0**-14
    all_bf16 = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    rows = []
    for k in range(-120, 111, 7):
        for amax in (fmax * 2.0**k, fmax * 2.0**k * 1.75, fmax * 2.0**k * 0.6):
            a = torch.tensor(amax).bfloat16().float()
            # The scale the rule gives (a power of two); magnitudes whose quotient is a normal fp8 value.
            e = torch.ceil(torch.log2(a / fmax)) if round_scale else torch.floor(torch.log2(a)) - (8 if fmax == 448.0 else 15)
            lo = min_normal * 2.0 ** float(e)
            vals = all_bf16[(all_bf16 >= lo) & (all_bf16 <= a)]
            vals = torch.cat([vals, torch.full(((-len(vals)) % 127,), float(a))])
            grid = vals.view(-1, 127)
            grid = grid * torch.where(torch.rand(grid.shape) < 0.5, -1.0, 1.0)
            rows.append(torch.cat([torch.full((grid.shape[0], 1), float(a)), grid], dim=1))
    x = torch.cat(rows).to(torch.bfloat16).contiguous()
    t = x.shape[0]
    slots = torch.randperm(t + 8)[:t]
    got_c, got_s = poisoned(t + 8, 128, cache_dtype, 0, seed=t)
    want_c, want_s = got_c.clone(), got_s.clone()
    built_op(got_c, got_s, x, slots, 0, round_scale)
    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=0, round_scale=round_scale)
    np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c))
    np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s))


def _standard_pair_groups(fmax: float, min_normal: float, amax_bits: torch.Tensor, seed: int) -> torch.Tensor:
    """One group per (amax, 127 magnitudes) for each amax in `amax_bits` (bf16 bits): every bf16 magnitude x
    <= amax whose quotient RN(x / S), S = RN(amax / FMAX), is a normal fp8 value, with random signs; the
    amax sits at a random position. Every group is then a finite group whose codes are all normal."""
    g = torch.Generator().manual_seed(seed)
    amax = amax_bits.to(torch.int16).view(torch.bfloat16).float()
    s = amax / torch.tensor(fmax, dtype=torch.float32)  # float32 division: the rule's S
    all_bf16 = torch.arange(0x0000, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    # First magnitude whose float32 quotient is normal: an estimate, then the exact float32 test nearby.
    lo = torch.searchsorted(all_bf16, (s.double() * min_normal).float()) - 2
    lo = lo.clamp(min=0)
    for _ in range(4):
        below = (all_bf16[lo] / s) < min_normal
        lo = lo + below.long()
    n = amax_bits.long() - lo + 1
    per = (n + 126) // 127
    which = torch.repeat_interleave(torch.arange(len(amax_bits)), per)
    k = torch.arange(len(which)) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
    idx = lo[which, None] + 127 * k[:, None] + torch.arange(127)[None, :]
    idx = torch.minimum(idx, amax_bits.long()[which, None])
    grid = all_bf16[idx] * torch.where(torch.rand(idx.shape, generator=g) < 0.5, -1.0, 1.0)
    rows = torch.cat([amax[which, None], grid], dim=1)
    # Move the amax (column 0) to a random column.
    perm = torch.argsort(torch.rand(rows.shape, generator=g), dim=1)
    return torch.gather(rows, 1, perm).to(torch.bfloat16).contiguous()


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_build_standard_every_bf16_pair(built_op, cache_dtype) -> None:
    """Standard-mode groups of bf16 whose codes are all normal (the vector paths encode them from raw bf16
    words through a table per S significand, csrc/cpu CodeTable): for every finite bf16 amax whose S is at
    least 2^-64, every bf16 magnitude x <= amax with a normal fp8 quotient, both signs, against the reference.
    About 0.45e8 (e4m3fn) and 0.9e8 (e5m2) elements, in chunks of amax values."""
    fmax = 448.0 if cache_dtype == torch.float8_e4m3fn else 57344.0
    min_normal = 2.0**-6 if cache_dtype == torch.float8_e4m3fn else 2.0**-14
    bits = torch.arange(0x0080, 0x7F80, dtype=torch.int32)
    s = bits.to(torch.int16).view(torch.bfloat16).float() / torch.tensor(fmax)
    bits = bits[s >= 2.0**-64]
    for c, chunk in enumerate(torch.split(bits, 2048)):
        x = _standard_pair_groups(fmax, min_normal, chunk, seed=c)
        t = x.shape[0]
        slots = torch.arange(t)
        got_c, got_s = poisoned(t, 128, cache_dtype, 1, seed=c)
        want_c, want_s = got_c.clone(), got_s.clone()
        built_op(got_c, got_s, x, slots, 1, True)
        reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=1, round_scale=True)
        np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c), err_msg=f"amax chunk {c}")
        np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s), err_msg=f"amax chunk {c}")
