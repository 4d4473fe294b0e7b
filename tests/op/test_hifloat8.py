"""HiFloat8 codec (quant_mode=2) against its oracle, the `en_dtypes.hifloat8` numpy cast (the dtype
the cann-recipes-infer NPU test builds its golden with), and the three encoders against each other:
the torch reference (op/hifloat8.py), the C++ header (csrc/hif8_codec.h, compiled here into a small
driver) and the Triton device function (backends/hif8_triton.py, on CUDA or under the interpreter).

The inputs are exhaustive where it matters: every finite fp16 and every finite bf16 value, as float32,
times several float32 scales (the op's product fl32(fl32(x) * scale)), chosen to reach every HiF8
binade, the denormals, underflow to zero and overflow. Rules: docs/hifloat8.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_indexer_epilog.op.hifloat8 import (
    HIF8_DECODE_TABLE,
    HIF8_MAX,
    HIF8_NAN_CODE,
    decode_hifloat8,
    encode_hifloat8,
)

en_dtypes = pytest.importorskip("en_dtypes", reason="the HiF8 oracle is the en-dtypes package (test extra)")
HIF8 = en_dtypes.hifloat8

ROOT = Path(__file__).resolve().parents[2]

# 1/448 and 3.0 make inexact products (so rounding of the product and of the cast both matter);
# 2^-10 and 2^10 move the fp16/bf16 grids across the HiF8 binades and denormals; 2^16 and 7.0
# overflow part of the range; 2^-30 and 1e-9 push most values below 2^-23 (underflow to zero).
SCALES = (1.0, 0.5, 3.0, 1.0 / 448.0, 2.0**-10, 2.0**10, 7.0, 2.0**16, 2.0**-30, 1e-9)


def _all_16bit(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, as float32 (both zeros included)."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    return v[torch.isfinite(v)]


FP16 = _all_16bit(torch.float16)
BF16 = _all_16bit(torch.bfloat16)


def _scaled(values: torch.Tensor, scale: float) -> torch.Tensor:
    """The op's product: a float32 multiply by the float32 scale (correctly rounded on CPU)."""
    return values * torch.tensor(np.float32(scale))


def _oracle(values_f32: torch.Tensor) -> np.ndarray:
    return values_f32.numpy().astype(HIF8).view(np.uint8)


def _inputs_under_test() -> torch.Tensor:
    """All fp16 and bf16 values at every scale, concatenated (about 1.3 M float32 values)."""
    return torch.cat([_scaled(v, s) for v in (FP16, BF16) for s in SCALES])


def _specials() -> torch.Tensor:
    """±0, ±Inf, NaNs with several payloads and signs, float32 subnormals and the near-zero boundaries."""
    bits = [
        0x00000000, 0x80000000,  # ±0
        0x7F800000, 0xFF800000,  # ±Inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF,  # NaNs
        0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,  # float32 subnormals
        0x00800000, 0x80800000,  # float32 smallest normal
        0x34000000, 0xB4000000, 0x33FFFFFF, 0xB3FFFFFF,  # 2^-23 (tie 0 / 2^-22) and just below
        0x7F7FFFFF, 0xFF7FFFFF,  # float32 max
    ]
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _random_bits(n: int = 1 << 20) -> torch.Tensor:
    """Uniformly random float32 bit patterns (seeded): every exponent, sign and NaN payload, with full
    23-bit mantissas, which the fp16/bf16 grids (10 and 7 bits, widened only by the inexact scales) lack."""
    g = torch.Generator().manual_seed(16)
    return torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32).view(torch.float32)


def _all_inputs() -> torch.Tensor:
    """What the C++ and Triton encoders are checked on: the exhaustive grids, the specials, random bits."""
    return torch.cat([_inputs_under_test(), _specials(), _random_bits()])


def _finite_values_sorted() -> tuple[np.ndarray, np.ndarray]:
    """Non-negative finite HiF8 values in increasing order, with their codes."""
    table = HIF8_DECODE_TABLE.numpy()
    codes = np.array([c for c in range(128) if np.isfinite(table[c])], dtype=np.uint8)
    order = np.argsort(table[codes])
    return table[codes][order], codes[order]


# ---------------------------------------------------------------------------------------------
# Torch reference against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_reference_equals_en_dtypes_exhaustive(name: str, scale: float) -> None:
    values = _scaled(FP16 if name == "float16" else BF16, scale)
    ours = encode_hifloat8(values).numpy()
    theirs = _oracle(values)
    bad = np.nonzero(ours != theirs)[0]
    assert bad.size == 0, [(float(values[i]), hex(ours[i]), hex(theirs[i])) for i in bad[:8]]


def test_reference_equals_en_dtypes_random_bits() -> None:
    values = _random_bits()
    np.testing.assert_array_equal(encode_hifloat8(values).numpy(), _oracle(values))


def test_scales_reach_every_code() -> None:
    """The exhaustive inputs are not just many: they produce every one of the 256 codes."""
    codes = encode_hifloat8(torch.cat([_inputs_under_test(), _specials()]))
    assert torch.unique(codes).numel() == 256


def test_specials_equal_en_dtypes() -> None:
    values = _specials()
    ours = encode_hifloat8(values).numpy()
    np.testing.assert_array_equal(ours, _oracle(values))
    by_bits = dict(zip(values.view(torch.int32).tolist(), ours.tolist()))
    assert by_bits[0x00000000] == 0x00 and by_bits[-0x80000000] == 0x00  # -0 has no code of its own
    assert by_bits[0x7F800000] == 0x6F and by_bits[0xFF800000 - 2**32] == 0xEF
    assert all(by_bits[b] == HIF8_NAN_CODE for b in (0x7FC00000, 0x7F800001, -1, 0xFFC00000 - 2**32))
    assert by_bits[0x00000001] == 0x00 and by_bits[0x807FFFFF - 2**32] == 0x00  # float32 subnormals
    assert by_bits[0x34000000] == 0x01 and by_bits[0xB4000000 - 2**32] == 0x81  # 2^-23 ties away to 2^-22
    assert by_bits[0x33FFFFFF] == 0x00 and by_bits[0xB3FFFFFF - 2**32] == 0x00


def test_ties_round_half_away_from_zero() -> None:
    """Every exact midpoint of adjacent HiF8 values (both signs) goes to the larger magnitude; one
    float32 ulp either side goes to the nearer neighbour. Midpoints are exact in float32 (HiF8
    values have at most 4 significant bits)."""
    vals, codes = _finite_values_sorted()
    lo, hi = vals[:-1].astype(np.float64), vals[1:].astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)
    assert np.array_equal(mid.astype(np.float64), (lo + hi) / 2)
    below = np.nextafter(mid, np.float32(0))
    above = np.nextafter(mid, np.float32(np.inf))
    for sign in (1.0, -1.0):
        sbit = 0x80 if sign < 0 else 0
        for x, want in ((mid, codes[1:]), (below, codes[:-1]), (above, codes[1:])):
            t = torch.from_numpy(np.float32(sign) * x)
            got = encode_hifloat8(t).numpy()
            expect = np.where(want == 0, 0, want | sbit).astype(np.uint8)
            np.testing.assert_array_equal(got, expect)
            np.testing.assert_array_equal(got, _oracle(t))


def test_overflow_boundary() -> None:
    """2^15 is the largest finite value; from 40960 = 1.25 * 2^15 (the midpoint to the absent
    1.5 * 2^15) up the cast gives Inf, or 2^15 with saturate=True."""
    edge = np.float32(40960.0)
    x = torch.from_numpy(np.array([np.nextafter(edge, np.float32(0)), edge, 1e30, np.inf], dtype=np.float32))
    x = torch.cat([x, -x])
    np.testing.assert_array_equal(encode_hifloat8(x).numpy(), [0x6E, 0x6F, 0x6F, 0x6F, 0xEE, 0xEF, 0xEF, 0xEF])
    np.testing.assert_array_equal(encode_hifloat8(x).numpy(), _oracle(x))
    np.testing.assert_array_equal(encode_hifloat8(x, saturate=True).numpy(), [0x6E] * 4 + [0xEE] * 4)
    assert float(decode_hifloat8(torch.tensor([0x6E], dtype=torch.uint8))) == HIF8_MAX


def test_saturating_variant_is_the_cast_of_the_clipped_value() -> None:
    values = torch.cat([_inputs_under_test(), _specials()])
    clipped = torch.from_numpy(np.clip(values.numpy(), -HIF8_MAX, HIF8_MAX))  # NaN stays NaN
    np.testing.assert_array_equal(encode_hifloat8(values, saturate=True).numpy(), _oracle(clipped))


def test_encode_rejects_non_float32() -> None:
    with pytest.raises(TypeError):
        encode_hifloat8(torch.zeros(2, dtype=torch.float16))
    with pytest.raises(TypeError):
        decode_hifloat8(torch.zeros(2, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------


def test_decode_table_equals_en_dtypes() -> None:
    theirs = np.arange(256, dtype=np.uint8).view(HIF8).astype(np.float32)
    ours = decode_hifloat8(torch.arange(256, dtype=torch.int32).to(torch.uint8)).numpy()
    assert np.isnan(ours).nonzero()[0].tolist() == [HIF8_NAN_CODE] == np.isnan(theirs).nonzero()[0].tolist()
    finite = ~np.isnan(ours)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), theirs[finite].view(np.uint32))


def test_codes_are_canonical() -> None:
    """No two codes share a value (there is no -0: 0x80 is NaN), so encode(decode(c)) == c for
    every code but NaN, and NaN encodes to 0x80."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = decode_hifloat8(codes)
    not_nan = ~torch.isnan(values)
    assert torch.unique(values[not_nan]).numel() == int(not_nan.sum()) == 255
    assert torch.equal(encode_hifloat8(values)[not_nan], codes[not_nan])
    assert int(encode_hifloat8(values[~not_nan])[0]) == HIF8_NAN_CODE


def test_decode_of_encode_equals_en_dtypes_round_trip() -> None:
    values = _inputs_under_test()
    ours = decode_hifloat8(encode_hifloat8(values)).numpy()
    theirs = values.numpy().astype(HIF8).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32))


# ---------------------------------------------------------------------------------------------
# C++ header
# ---------------------------------------------------------------------------------------------

_DRIVER = r"""
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>
#include "hif8_codec.h"
// usage: driver IN OUT_PLAIN OUT_SAT OUT_DECODE; IN is raw float32. Outputs start poisoned so that
// a lane the loops skip shows up.
// usage: driver sweep START COUNT; writes the codes of the float32 bit patterns [START, START + COUNT).
static int sweep(uint64_t start, uint64_t count) {
  std::vector<uint8_t> out(1u << 22);
  for (uint64_t base = start; base < start + count; base += out.size()) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(out.size(), start + count - base));
    for (size_t i = 0; i < n; ++i) {
      const uint32_t b = static_cast<uint32_t>(base + i);
      float x;
      std::memcpy(&x, &b, sizeof x);
      out[i] = vie::encode_hif8(x);
    }
    if (std::fwrite(out.data(), 1, n, stdout) != n) return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && std::string(argv[1]) == "sweep") return sweep(std::stoull(argv[2]), std::stoull(argv[3]));
  if (argc != 5) return 2;
  FILE* f = std::fopen(argv[1], "rb");
  std::vector<float> x;
  float buf[4096];
  size_t n;
  while ((n = std::fread(buf, sizeof(float), 4096, f)) > 0) x.insert(x.end(), buf, buf + n);
  std::fclose(f);
  std::vector<uint8_t> plain(x.size(), 0xA5), sat(x.size(), 0xA5);
  for (size_t i = 0; i < x.size(); ++i) plain[i] = vie::encode_hif8(x[i]);
  for (size_t i = 0; i < x.size(); ++i) sat[i] = vie::encode_hif8<true>(x[i]);
  std::vector<float> dec(256);
  for (int c = 0; c < 256; ++c) dec[c] = vie::decode_hif8(static_cast<uint8_t>(c));
  f = std::fopen(argv[2], "wb"); std::fwrite(plain.data(), 1, plain.size(), f); std::fclose(f);
  f = std::fopen(argv[3], "wb"); std::fwrite(sat.data(), 1, sat.size(), f); std::fclose(f);
  f = std::fopen(argv[4], "wb"); std::fwrite(dec.data(), sizeof(float), 256, f); std::fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def cpp_driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("hif8_cpp")
    (d / "driver.cpp").write_text(_DRIVER)
    exe = d / "driver"
    # The CPU kernel's flags (backends/cpu.py), so that the vectorized code the kernel will get is what runs.
    flags = ["-std=c++20", "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    subprocess.run(
        [cxx, *flags, "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(d / "driver.cpp"), "-o", str(exe)],
        check=True,
    )
    return exe


def test_cpp_encoder_and_decoder_equal_reference(cpp_driver: Path, tmp_path: Path) -> None:
    values = _all_inputs()
    (tmp_path / "in.f32").write_bytes(values.numpy().tobytes())
    outs = [tmp_path / n for n in ("plain.u8", "sat.u8", "dec.f32")]
    subprocess.run([str(cpp_driver), str(tmp_path / "in.f32"), *map(str, outs)], check=True)
    plain = np.fromfile(outs[0], dtype=np.uint8)
    sat = np.fromfile(outs[1], dtype=np.uint8)
    dec = np.fromfile(outs[2], dtype=np.float32)
    np.testing.assert_array_equal(plain, encode_hifloat8(values).numpy())
    np.testing.assert_array_equal(plain, _oracle(values))
    np.testing.assert_array_equal(sat, encode_hifloat8(values, saturate=True).numpy())
    table = HIF8_DECODE_TABLE.numpy()
    assert np.isnan(dec).nonzero()[0].tolist() == [HIF8_NAN_CODE]
    finite = ~np.isnan(table)
    np.testing.assert_array_equal(dec[finite].view(np.uint32), table[finite].view(np.uint32))


# ---------------------------------------------------------------------------------------------
# Triton device function
# ---------------------------------------------------------------------------------------------


try:  # Triton is optional here; the kernel must live at module level for the JIT to resolve its globals.
    import triton
    import triton.language as tl

    from vllm_indexer_epilog.backends.hif8_triton import hif8_encode
except ImportError:  # pragma: no cover
    triton = None
else:

    @triton.jit
    def _encode_kernel(x_ptr, y_ptr, n, SATURATE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, hif8_encode(x, SATURATE), mask=mask)


@pytest.mark.skipif(triton is None, reason="no triton")
def test_triton_encoder_equals_reference() -> None:
    """Under TRITON_INTERPRET=1 on CPU (tests/helpers.py sets it when there is no GPU) or on CUDA.
    The output starts poisoned and n is not a multiple of the block, so a lane written outside the
    mask or a lane left unwritten both show."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = _all_inputs()
    n = values.numel()
    block = 65536
    assert n % block != 0
    for saturate in (False, True):
        out = torch.full((n + 64,), 0xA5, dtype=torch.uint8, device=device)
        _encode_kernel[(triton.cdiv(n, block),)](values.to(device), out, n, saturate, BLOCK=block)
        out = out.cpu()
        assert torch.equal(out[:n], encode_hifloat8(values, saturate=saturate))
        assert bool((out[n:] == 0xA5).all())


@pytest.mark.skipif(
    os.environ.get("VIE_HIF8_ALL_FLOAT32") != "1",
    reason="every float32 bit pattern takes about a minute; set VIE_HIF8_ALL_FLOAT32=1",
)
def test_cpp_encoder_equals_en_dtypes_on_every_float32(cpp_driver: Path) -> None:
    """All 2^32 float32 bit patterns through the C++ encoder against en-dtypes, streamed in chunks."""
    chunk = 1 << 24
    proc = subprocess.Popen([str(cpp_driver), "sweep", "0", str(1 << 32)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        for start in range(0, 1 << 32, chunk):
            ours = np.frombuffer(proc.stdout.read(chunk), dtype=np.uint8)
            with np.errstate(invalid="ignore"):
                theirs = np.arange(start, start + chunk, dtype=np.uint32).view(np.float32).astype(HIF8).view(np.uint8)
            bad = np.nonzero(ours != theirs)[0]
            assert bad.size == 0, (hex(start + int(bad[0])), hex(ours[bad[0]]), hex(theirs[bad[0]]))
        assert proc.wait() == 0
    finally:
        if proc.poll() is None:  # a failed chunk left the driver writing: stop it (our own child)
            proc.kill()
            proc.wait()
        proc.stdout.close()
