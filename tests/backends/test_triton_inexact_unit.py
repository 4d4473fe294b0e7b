"""The Triton kernel's bytes on an arithmetic unit like Ascend's vector unit, emulated under TRITON_INTERPRET=1.

Ascend's vector `Div` is documented (asc-devkit 9.1.0) as within 1 ulp, flushing subnormals to zero;
triton-ascend lowers `/` and `div_rn` to it, and `tl.fma` to a multiply and an add. The kernel's only float
op is one such division (the rest is integer), but the emulated unit (patched into the interpreter's
builder) covers every float op anyway:
- division (`/`, `div_rn`): the correctly rounded float32 quotient moved by an adversarial error: one ulp up,
  one ulp down, or per element at random within 1 (and, for CUDA's `div.full.f32`, 2) ulps;
- multiplication, addition, subtraction and FMA: correctly rounded;
- every one of them flushes subnormal inputs and subnormal results to (signed) zero.
The kernel must give the reference's bytes anyway: over every golden vector and over random bit patterns
(all binades, float32 subnormals, groups whose standard-mode scale is subnormal or rounds to 0, Inf/NaN), for
every mode, FP8 format and x dtype. Two sanity tests show the emulation bites (a plain `div_rn` and a
subnormal product come out different), so a pass is not the patch silently missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import BACKENDS, CACHE_DTYPES, GOLDEN_FILES, MODES, X_DTYPES, as_bytes, load_golden, poisoned
from vllm_indexer_epilog.op.reference import reference_indexer_compress_epilog

pytestmark = pytest.mark.skipif(
    "triton" not in BACKENDS or BACKENDS["triton"][1] != "cpu", reason="needs Triton's CPU interpreter"
)

DIRECTIONS = ("up", "down", "random", "random2")
_TINY = np.float32(2.0**-126)


def _ftz(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float32:
        return a
    return np.where((np.abs(a) < _TINY) & (a != 0), np.copysign(np.float32(0), a), a).astype(np.float32)


class InexactUnit:
    """Patches the interpreter's float builders (monkeypatch undoes it)."""

    def __init__(self, direction: str, seed: int = 0) -> None:
        self.direction = direction
        self.rng = np.random.default_rng(seed)

    def _perturb(self, q: np.ndarray) -> np.ndarray:
        if self.direction == "up":
            steps = np.ones(q.shape, np.int64)
        elif self.direction == "down":
            steps = -np.ones(q.shape, np.int64)
        else:
            k = 1 if self.direction == "random" else 2
            steps = self.rng.integers(-k, k + 1, q.shape)
        out = q.copy()
        for _ in range(int(np.abs(steps).max(initial=0))):
            move = steps != 0
            out = np.where(move, np.nextafter(out, np.where(steps > 0, np.inf, -np.inf).astype(np.float32)), out)
            steps = steps - np.sign(steps)
        return np.where(np.isfinite(q), out, q).astype(np.float32)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

        unit = self
        original_fma = InterpreterBuilder.create_fma

        def binary(op, perturb: bool):
            def create(builder, lhs, rhs):
                a, b = np.broadcast_arrays(lhs.data, rhs.data)
                if a.dtype != np.float32:
                    return TensorHandle(op(a, b), lhs.dtype.scalar)
                with np.errstate(all="ignore"):
                    r = op(_ftz(a), _ftz(b)).astype(np.float32)
                if perturb:
                    r = unit._perturb(r)
                return TensorHandle(_ftz(r), lhs.dtype.scalar)

            return create

        def fma(builder, x, y, z):
            if z.data.dtype != np.float32:
                return original_fma(builder, x, y, z)
            flushed = [TensorHandle(_ftz(np.asarray(h.data)), h.dtype) for h in (x, y, z)]
            r = original_fma(builder, *flushed)
            return TensorHandle(_ftz(np.asarray(r.data)), r.dtype)

        monkeypatch.setattr(InterpreterBuilder, "create_fdiv", binary(np.divide, True))
        monkeypatch.setattr(InterpreterBuilder, "create_precise_divf", binary(np.divide, True))
        monkeypatch.setattr(InterpreterBuilder, "create_fmul", binary(np.multiply, False))
        monkeypatch.setattr(InterpreterBuilder, "create_fadd", binary(np.add, False))
        monkeypatch.setattr(InterpreterBuilder, "create_fsub", binary(np.subtract, False))
        monkeypatch.setattr(InterpreterBuilder, "create_fma", fma)


def _triton(*args, **kwargs) -> None:
    BACKENDS["triton"][0](*args, **kwargs)


# --- the emulation is live -------------------------------------------------------------------------------


def test_emulated_division_is_not_correctly_rounded(monkeypatch) -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def div_rn_kernel(a_ptr, b_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, tl.math.div_rn(tl.load(a_ptr + i), tl.load(b_ptr + i)))

    InexactUnit("up").install(monkeypatch)
    a = torch.tensor([1.0, 3.0, 2.0**-140, 2.0**-100], dtype=torch.float32)
    b = torch.tensor([3.0, 7.0, 1.0, 2.0**30], dtype=torch.float32)
    out = torch.empty(4)
    div_rn_kernel[(1,)](a, b, out, N=4)
    exact = (a.double() / b.double()).float()
    assert out[0] != exact[0] and out[1] != exact[1]  # one ulp above
    assert out[2] == 0 and out[3] == 0  # a subnormal input, a subnormal quotient: flushed


def test_old_formulation_fails_under_the_unit(monkeypatch) -> None:
    """x / S with div_rn (the kernel before issue 17) loses exactness here: the test can tell."""
    import triton
    import triton.language as tl

    @triton.jit
    def quotient_kernel(a_ptr, s_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, tl.math.div_rn(tl.load(a_ptr + i), tl.load(s_ptr + i)))

    InexactUnit("down").install(monkeypatch)
    x = torch.arange(1, 65, dtype=torch.float32) * 0.37
    s = torch.full((64,), 0.37 * 64 / 448, dtype=torch.float32)
    out = torch.empty(64)
    quotient_kernel[(1,)](x, s, out, N=64)
    assert not torch.equal(out, x / s)


# --- the kernel's bytes under it -------------------------------------------------------------------------


# The two d = 4096 vectors take seconds per run under the interpreter: there, the per-element random errors of
# up to 2 ulps (both directions in one run) only.
_GOLDEN_RUNS = [
    pytest.param(path, direction, id=f"{path.stem}-{direction}")
    for path in GOLDEN_FILES
    for direction in (("random2",) if path.stem.startswith("d4096") else DIRECTIONS)
]


@pytest.mark.parametrize("path,direction", _GOLDEN_RUNS)
def test_golden_bytes_on_inexact_unit(path, direction, monkeypatch) -> None:
    g = load_golden(path)
    InexactUnit(direction, seed=len(path.stem)).install(monkeypatch)
    _triton(g["cache"], g["scale"], g["x"], g["slot_mapping"], quant_mode=g["quant_mode"],
            round_scale=g["round_scale"])
    np.testing.assert_array_equal(as_bytes(g["cache"]), g["cache_out"].reshape(-1))
    np.testing.assert_array_equal(as_bytes(g["scale"]), g["scale_out"].reshape(-1))


_LAYOUT = {torch.float32: (8, 23, torch.int32), torch.bfloat16: (8, 7, torch.int16), torch.float16: (5, 10, torch.int16)}


def adversarial_x(t: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns, each row near its own binade: the top binades, the subnormal range (float32 and
    bfloat16: groups whose amax / FMAX is a float32 subnormal or rounds to 0), spreads of 1 to 40 binades,
    zero rows, and Inf/NaN sprinkled in."""
    ebits, mbits, idt = _LAYOUT[dtype]
    rng = np.random.default_rng(seed)
    top = (1 << ebits) - 2
    base = rng.integers(0, top + 1, (t, 1))
    base[0], base[1], base[2] = top, 0, min(3, top)  # largest binade, all-subnormal, a few binades above
    spread = rng.choice([1, 3, 12, 40], (t, 1))
    expf = np.clip(base - rng.integers(0, spread, (t, d)) * (rng.random((t, d)) < 0.9), 0, top)
    bits = (expf << mbits) | rng.integers(0, 1 << mbits, (t, d)) | (rng.integers(0, 2, (t, d)) << (ebits + mbits))
    bits[3] = 0  # an all-zero row
    special = rng.random((t, d)) < 0.01
    bits = np.where(special, ((1 << ebits) - 1) << mbits | rng.integers(0, 2, (t, d)), bits)  # Inf or NaN
    raw = bits.astype(np.uint32).view(np.int32) if idt == torch.int32 else bits.astype(np.uint16).view(np.int16)
    return torch.from_numpy(raw).view(dtype)


@pytest.mark.parametrize("direction", ("up", "down", "random2"))
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_random_bits_on_inexact_unit(mode, cache_dtype, x_dtype, direction, monkeypatch) -> None:
    quant_mode, round_scale = mode
    t, d, n = 24, 296, 32  # a short third group
    seed = hash((mode.name, str(cache_dtype), str(x_dtype), direction)) % 2**31
    x = adversarial_x(t, d, x_dtype, seed)
    slots = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:t]
    slots[5] = -1
    want_c, want_s = poisoned(n, d, cache_dtype, quant_mode, seed=seed)
    got_c, got_s = want_c.clone(), want_s.clone()
    reference_indexer_compress_epilog(want_c, want_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    InexactUnit(direction, seed=seed).install(monkeypatch)
    _triton(got_c, got_s, x, slots, quant_mode=quant_mode, round_scale=round_scale)
    np.testing.assert_array_equal(as_bytes(got_s), as_bytes(want_s))
    np.testing.assert_array_equal(as_bytes(got_c), as_bytes(want_c))


_EDGE_DIRECTIONS = ("up", "down", "up2", "down2", "random2")


def _quotient_kernel():
    # Built at call time (Triton may be absent); the interpreter resolves the kernel's globals in this module.
    import triton
    import triton.language as tl

    from vllm_indexer_epilog.backends.triton_epilog_jit import exact_quotient

    globals()["exact_quotient"] = exact_quotient

    @triton.jit
    def quotient_kernel(a_ptr, b_ptr, o_ptr, N: tl.constexpr, ULPS: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, exact_quotient(tl.load(a_ptr + i), tl.load(b_ptr + i), ULPS))

    return quotient_kernel


def _edge_pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 bit pairs (a, b) whose quotient sits at the edges of _quotient's guess: mantissa ratios next to
    1/2, 1 and 2, equal mantissas, results in the subnormal range and next to it, and random bits."""
    rng = np.random.default_rng(seed)
    m_lo, m_hi = 0, 0x7FFFFF
    mants = [(m_lo, m_hi), (m_lo, m_hi - 1), (m_lo, m_hi - 2), (m_hi, m_lo), (m_hi, m_lo + 1), (m_hi - 1, m_lo),
             (m_lo, m_lo), (m_hi, m_hi), (1, 0), (0, 1), (0x400000, 0x3FFFFF), (0x3FFFFF, 0x400000)]
    a, b = [], []
    for ma, mb in mants:
        for ea, eb in ((127, 127), (1, 127), (1, 150), (20, 150), (0, 127), (60, 130), (127, 254), (254, 1)):
            a.append((ea << 23) | ma)
            b.append((eb << 23) | mb)
    r = rng.integers(1, 0x7F800000, (2, 512))
    a.extend(r[0]), b.extend(r[1])
    a, b = np.array(a, np.int64), np.array(b, np.int64)
    keep = ((a & 0x7FFFFFFF) != 0) & ((b & 0x7FFFFFFF) != 0)
    return a[keep].astype(np.int32), b[keep].astype(np.int32)


@pytest.mark.parametrize("direction", _EDGE_DIRECTIONS)
def test_exact_quotient_on_edge_operands(direction, monkeypatch) -> None:
    """exact_quotient alone (the scale's amax / FMAX and, through the same _quotient, x / S) against the
    correctly rounded float32 quotient, float32 subnormals and Inf included, with the unit's division up to
    2 ulps off in a fixed direction or at random."""
    from vllm_indexer_epilog.backends.triton_epilog_jit import MAX_DIV_ULPS

    a, b = _edge_pairs(7)
    n = 1 << int(np.ceil(np.log2(len(a))))
    pa, pb = np.full(n, 0x3F800000, np.int32), np.full(n, 0x3F800000, np.int32)
    pa[: len(a)], pb[: len(b)] = a, b
    with np.errstate(over="ignore"):  # float64 -> float32 overflow is the Inf expected
        want = (pa.view(np.float32).astype(np.float64) / pb.view(np.float32).astype(np.float64)).astype(np.float32)
    unit = InexactUnit("random2" if direction == "random2" else direction.rstrip("2"), seed=3)
    if direction in ("up2", "down2"):
        base = unit._perturb
        unit._perturb = lambda q: base(base(q))
    unit.install(monkeypatch)
    out = torch.empty(n, dtype=torch.int32)
    _quotient_kernel()[(1,)](torch.from_numpy(pa), torch.from_numpy(pb), out, N=n, ULPS=MAX_DIV_ULPS)
    np.testing.assert_array_equal(out.numpy(), want.view(np.int32))
