"""The op on Ascend NPUs: which implementation runs is decided here, and only here, and logged once.

Two entries, one per cache layout:

`write_split` -- contiguous cache and scale (DeepSeek-V3.2's LI-C8 cache); a packed-block pair given to the
  op goes to `write_packed`:
  0. `triton`: this package's Triton kernel (backends/triton_epilog_jit.py) launched through triton-ascend, for
     MX mode (the default there), and for standard mode where no compiled Ascend op fits. It is SPEC-exact on a
     division within 2 ulps and with no subnormal support (docs/ascend-triton.md), compiles for Ascend 950
     (scripts/ascend_check.sh) but has never been launched on an NPU. On the stand-in NPU layer of the tests
     (CPU tensors) it runs under Triton's interpreter, through the same launch code.
  1. `custom_ops`: cann-recipes-infer's compiled Ascend C op (Ascend 950), when its package defined
     `custom::indexer_compress_epilog`, for standard mode. Our call is mapped onto its schema: slot_mapping
     as int32 (its only index type), x float16/bfloat16 (it takes no float32), its extra `scale` left at
     1.0. Its MX mode is not SPEC-exact (docs/ascend-kernel.md: the round_scale exponent is bumped for exact
     powers of two, and without round_scale the stored byte does not decode the codes), so MX goes to it
     only when `VLLM_INDEXER_EPILOG_NPU_BACKEND=custom_ops` asks by name, with a log line saying so.
  2. `reference`: the pure-torch reference on NPU tensors; slow, but exact and always there.

`write_packed` -- vllm-ascend's packed-block cache (op/geometry.py; DeepSeek-V4's indexer on A5):
  0. `triton` as above, straight into the two strided views (MX by default; standard where v2 does not fit).
  1. `c_ascend_v2`: vllm-ascend's `_C_ascend.indexer_compress_epilog_v2`, where it fits: e4m3fn values,
     standard mode (float32 scales), x float16/bfloat16.
  2. `reference`, writing the two strided views.

Standard mode keeps the compiled Ascend op (v2 / custom_ops) in `auto` where it fits, although its scale is
amax * fl(1/FMAX), one ulp off SPEC for about half the amax values (docs/ascend-kernel.md): it is what
vllm-ascend runs and has run on A5 hardware, while the Triton kernel has only been compiled (to BiShengIR's
HIVM module), never launched. `VLLM_INDEXER_EPILOG_NPU_BACKEND=triton` makes standard mode exact now; the
default should move to `triton` once the kernel has passed tests/ on an A5. MX has no SPEC-exact compiled
alternative (custom_ops' MX is not exact; v2 has no MX), so there `triton` wins over the reference (several
torch kernels and a temporary) by default.

`auto` picks `triton` only where its kernel is launchable: on NPU tensors when the Triton in this process is
triton-ascend targeting Ascend 950 (the one target the lowering check covers); on CPU tensors (the stand-in)
when Triton runs its interpreter.

Every entry validates first with the shared checks, so errors name the argument and nothing is written.
Slots: both compiled ops read int32 only (vLLM passes int64), and neither checks a slot, so one outside
[-1, N) would be written out of bounds. `_int32_slots` turns such slots into -1 on the device, in the input dtype,
before narrowing: a slot >= 2^31 is skipped, never wrapped onto a valid row (what a bare `.to(torch.int32)`
would do). The compiled ops are chosen only for caches of at most 2^31 - 1 rows, so every kept slot fits.
Refusing such slots by name needs their values on the host; strict mode (VLLM_INDEXER_EPILOG_STRICT=1)
pays that sync and raises a ValueError naming slot_mapping before anything is written.

The compiled Ascend kernels have not run against SPEC.md here (no NPU): docs/ascend-kernel.md models what
their sources do and counts where it differs. `VLLM_INDEXER_EPILOG_NPU_BACKEND=reference` pins the exact
path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging

import torch

from .. import envs
from ..log_once import _logged  # noqa: F401  (the one set; tests clear it through this module too)
from ..log_once import log_once
from ..op import schema as op_schema
from ..op.geometry import block_buffer
from ..op.reference import reference_indexer_compress_epilog
from ..op.spec import QUANT_MODE_HIFLOAT8, QUANT_MODE_MX, QUANT_MODE_STANDARD
from ..op.validation import EpilogProblem, check_slot_range, validate_epilog_args

logger = logging.getLogger(__name__)

_COMPILED_X_DTYPES = (torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1
_MX_NOT_EXACT = "custom_ops' MX mode is not SPEC-exact (docs/ascend-kernel.md)"
_HIF8_NOT_EXACT = ("custom_ops' HiFloat8 cast saturates (SatMode::SAT): overflow and +/-Inf give +/-32768 and NaN "
                   "gives 0, where SPEC.md follows en-dtypes (+/-Inf, 0x80; docs/hifloat8.md)")


class NpuBackend(str, enum.Enum):
    TRITON = "triton"
    CUSTOM_OPS = "custom_ops"
    C_ASCEND_V2 = "c_ascend_v2"
    REFERENCE = "reference"


_ASCEND_950 = "Ascend950"
_triton_status: dict[str, str | None] = {}


def _triton_kernel_module():
    from . import triton_kernel

    return triton_kernel


def why_not_triton(device: torch.device) -> str | None:
    """None if the Triton kernel can be launched on tensors of this device type, else why not (cached per
    device type; no device work). CPU: only under Triton's interpreter (the stand-in NPU layer); NPU: only
    with triton-ascend targeting Ascend 950."""
    key = device.type
    if key not in _triton_status:
        _triton_status[key] = _probe_triton(key)
    return _triton_status[key]


def _probe_triton(device_type: str) -> str | None:
    try:
        kernel_module = _triton_kernel_module()
    except Exception as exc:  # absent, or a Triton whose import fails here (e.g. a driver it cannot load)
        return f"Triton is not importable ({type(exc).__name__}: {exc})"
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(kernel_module.epilog_kernel, InterpretedFunction)
    if device_type == "cpu":
        return None if interpreted else "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    if interpreted:
        return "Triton runs its interpreter in this process"
    try:
        import triton

        target = triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # no active Triton driver for this device
        return f"Triton has no active device driver ({exc})"
    arch = str(getattr(target, "arch", ""))
    if getattr(target, "backend", None) != "npu" or not arch.startswith(_ASCEND_950):
        return f"Triton targets {target.backend}:{arch}; the kernel is checked for {_ASCEND_950} only"
    return None


def _launch_triton(p: EpilogProblem, cache: torch.Tensor, scale: torch.Tensor, x: torch.Tensor,
                   slot_mapping: torch.Tensor, round_scale: bool, *, mx_float32_scale: bool = False) -> None:
    # The kernel skips slots outside [0, N) on the device; only strict mode pays a host check.
    if envs.strict():
        check_slot_range(slot_mapping, p.slots, reject_duplicates=True)
    npu = getattr(torch, "npu", None)
    guard = npu.device(x.device) if x.device.type == "npu" and npu is not None else contextlib.nullcontext()
    with guard:
        _triton_kernel_module().launch(p, cache, scale, x, slot_mapping.reshape(-1), round_scale=round_scale,
                                       mx_float32_scale=mx_float32_scale)



def _forced() -> NpuBackend | None:
    value = envs.npu_backend()
    if value in ("", "auto"):
        return None
    try:
        return NpuBackend(value)
    except ValueError:
        raise ValueError(
            f"{envs.NPU_BACKEND}={envs.quote(value)}: expected auto, " + ", ".join(b.value for b in NpuBackend)
        ) from None


def ascend_custom_op_installed() -> bool:
    """Whether cann-recipes-infer's compiled op owns custom::indexer_compress_epilog's NPU kernel."""
    if op_schema.defined_here():
        return False
    return op_schema.has_foreign_scale_argument() and op_schema.has_kernel("PrivateUse1")


def c_ascend_v2_installed() -> bool:
    """Whether vllm-ascend's compiled packed-cache writer is loaded."""
    return hasattr(torch.ops._C_ascend, "indexer_compress_epilog_v2")


def _why_not_compiled(p: EpilogProblem, x: torch.Tensor, installed: bool, what: str) -> str | None:
    if not installed:
        return f"{what} is not installed"
    if x.dtype not in _COMPILED_X_DTYPES:
        return f"{what} takes float16/bfloat16 x, not {x.dtype}"
    if p.slots > _INT32_MAX:
        return f"{what} takes int32 slots; this cache has {p.slots} rows"
    return None


def _choose(layout: str, p: EpilogProblem, x: torch.Tensor) -> NpuBackend:
    compiled = NpuBackend.CUSTOM_OPS if layout == "split" else NpuBackend.C_ASCEND_V2
    if compiled is NpuBackend.CUSTOM_OPS:
        why = _why_not_compiled(p, x, ascend_custom_op_installed(), "Ascend's custom_ops op")
    else:
        why = _why_not_compiled(p, x, c_ascend_v2_installed(), "_C_ascend.indexer_compress_epilog_v2")
        if why is None and (p.fmt is None or p.fmt.dtype != torch.float8_e4m3fn or p.quant_mode != QUANT_MODE_STANDARD):
            why = "_C_ascend.indexer_compress_epilog_v2 writes e4m3fn codes with float32 (standard) scales only"
    triton_why = "the NPU Triton kernel has no HiFloat8 mode" if p.hifloat8 else why_not_triton(x.device)
    forced = _forced()
    # Modes the compiled op runs differently from SPEC.md: used only when named.
    not_exact = {QUANT_MODE_MX: _MX_NOT_EXACT, QUANT_MODE_HIFLOAT8: _HIF8_NOT_EXACT}.get(p.quant_mode)
    inexact_mx = compiled is NpuBackend.CUSTOM_OPS and not_exact is not None
    mx = p.quant_mode == QUANT_MODE_MX
    if forced is not None:
        if forced not in (compiled, NpuBackend.REFERENCE, NpuBackend.TRITON):
            raise RuntimeError(f"{envs.NPU_BACKEND}={forced.value} cannot serve the {layout} cache layout")
        if forced is compiled and why is not None:
            raise RuntimeError(f"{envs.NPU_BACKEND}={forced.value} but {why}")
        if forced is NpuBackend.TRITON and triton_why is not None:
            raise RuntimeError(f"{envs.NPU_BACKEND}=triton but {triton_why}")
        chosen, reason = forced, f"forced by {envs.NPU_BACKEND}"
        if forced is compiled and inexact_mx:
            reason += f"; {not_exact}"
    elif mx and triton_why is None:
        chosen, reason = NpuBackend.TRITON, "MX: the SPEC-exact compiled path"
    elif why is None and inexact_mx:
        chosen, reason = NpuBackend.REFERENCE, f"{not_exact}; {envs.NPU_BACKEND}=custom_ops uses it anyway"
    elif why is None:
        chosen, reason = compiled, "fits"
    elif triton_why is None:
        chosen, reason = NpuBackend.TRITON, why
    else:
        chosen, reason = NpuBackend.REFERENCE, f"{why}; triton: {triton_why}" if why else f"triton: {triton_why}"
    log_once(f"NPU {layout}-cache writes use {chosen.value} ({reason})", logger=logger)
    return chosen


def _guarded_slots(slot_mapping: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Flat slots, in their own dtype, with every value outside [-1, num_slots) made -1 on the device (no
    sync). Strict mode checks on the host instead and raises, naming slot_mapping, before any write."""
    if envs.strict():
        check_slot_range(slot_mapping, num_slots, reject_duplicates=True)
    s = slot_mapping.reshape(-1)
    return torch.where((s >= -1) & (s < num_slots), s, -1)


def _int32_slots(slot_mapping: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The int32 slots a compiled Ascend op reads: guarded first, in the input's dtype, then narrowed, so a
    value >= 2^31 becomes -1 (skipped) rather than wrapping onto a valid row."""
    if num_slots > _INT32_MAX + 1:
        raise ValueError(f"slot_mapping: int32 slots cannot address {num_slots} cache rows")
    return _guarded_slots(slot_mapping, num_slots).to(torch.int32)


def write_split(
    cache: torch.Tensor,
    scales: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    scale: float = 1.0,
) -> NpuBackend:
    """The op on contiguous cache and scale tensors; returns the backend that ran. A packed-block pair (the
    op's other accepted layout, op/geometry.py) goes to `write_packed`. `scale`: HiFloat8's multiplier."""
    p = validate_epilog_args(cache, scales, x, slot_mapping, quant_mode, round_scale, scale_value=scale)
    if p.packed:
        return write_packed(cache, scales, x, slot_mapping, quant_mode=quant_mode, round_scale=round_scale,
                            scale=scale)
    backend = _choose("split", p, x)
    if backend is NpuBackend.TRITON:
        _launch_triton(p, cache, scales, x, slot_mapping, round_scale)
    elif backend is NpuBackend.CUSTOM_OPS:
        # Its documented x and slot shapes are [T, d] and [T]. In HiFloat8 mode it copies an unwritten local
        # buffer to the scale rows (docs/hifloat8.md); a scratch tensor takes them, so ours stays untouched.
        out_scales = torch.empty_like(scales) if p.hifloat8 else scales
        torch.ops.custom.indexer_compress_epilog(
            cache, out_scales, x.view(p.rows, p.dim), _int32_slots(slot_mapping, p.slots),
            quant_mode=quant_mode, round_scale=round_scale, **({"scale": p.scale} if p.hifloat8 else {}),
        )
    else:
        slots = _guarded_slots(slot_mapping, p.slots)
        reference_indexer_compress_epilog(cache, scales, x, slots, quant_mode=quant_mode, round_scale=round_scale,
                                          scale=scale)
    return backend


def write_packed(
    values: torch.Tensor,
    scales: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    quant_mode: int = QUANT_MODE_STANDARD,
    round_scale: bool = True,
    scale: float = 1.0,
) -> NpuBackend:
    """The op on the two views of a packed-block cache (op/geometry.py); returns the backend that ran."""
    p = validate_epilog_args(values, scales, x, slot_mapping, quant_mode, round_scale, packed=True,
                             scale_value=scale)
    backend = _choose("packed", p, x)
    if backend is NpuBackend.TRITON:
        _launch_triton(p, values, scales, x, slot_mapping, round_scale)
    elif backend is NpuBackend.C_ASCEND_V2:
        buffer = block_buffer(values, p.geometry, scales.element_size())
        slots = _int32_slots(slot_mapping, p.slots)
        torch.ops._C_ascend.indexer_compress_epilog_v2(buffer, x.view(p.rows, p.dim), slots, layout=2)
    else:
        slots = _guarded_slots(slot_mapping, p.slots)
        reference_indexer_compress_epilog(
            values, scales, x, slots, quant_mode=quant_mode, round_scale=round_scale, scale=scale, packed=True
        )
    return backend


def write_packed_mx_as_float32(
    values: torch.Tensor,
    scales: torch.Tensor,
    x: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    round_scale: bool = True,
) -> NpuBackend:
    """MX mode on a packed-block cache laid out for standard mode (float32 scale slots; issue #13 gap 2);
    returns the backend that ran.

    The pages, dtypes and so vLLM's KV-cache plan are those of standard mode (no e8m0 page, no re-padding of
    DeepSeek-V4's compressor state), and the lightning indexer reads the float32 scales as it does in standard
    mode: each group's e8m0 scale is stored as the float32 2^e it stands for (exact).

    `triton` (the default where it can launch): the kernel writes codes and float32 2^e straight into the two
    page views, no temporary, no widening pass. Otherwise (the reference, or custom_ops when named) the rows
    go through `write_split` into contiguous temporaries and are then put at the slots, widened.
    Slots outside [-1, N) are dropped as in every entry.
    """
    if values.dim() != 4 or scales.dim() != 4 or values.shape[:3] != scales.shape[:3]:
        raise ValueError(f"packed views [nb, bs, 1, d] / [nb, bs, 1, G] expected, got {tuple(values.shape)} "
                         f"and {tuple(scales.shape)}")
    if scales.dtype != torch.float32:
        raise ValueError(f"scales: float32 slots expected (standard layout), got {scales.dtype}")
    # The page is standard mode's, so it validates as one; the write itself is MX.
    p = validate_epilog_args(values, scales, x, slot_mapping, QUANT_MODE_STANDARD, round_scale, packed=True)
    p = dataclasses.replace(p, quant_mode=QUANT_MODE_MX)
    if _forced() is not NpuBackend.CUSTOM_OPS and _choose("packed", p, x) is NpuBackend.TRITON:
        _launch_triton(p, values, scales, x, slot_mapping, round_scale, mx_float32_scale=True)
        return NpuBackend.TRITON
    return _write_packed_mx_as_float32_via_split(values, scales, x, slot_mapping, round_scale=round_scale)


def _write_packed_mx_as_float32_via_split(
    values: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, *, round_scale: bool
) -> NpuBackend:
    from ..op.dequant import mx_scales_to_float32
    from ..op.spec import SCALE_DTYPE_BY_MODE, num_groups

    nb, bs, _, d = values.shape
    g = num_groups(d)
    rows = x.reshape(-1, d)
    t = rows.shape[0]
    codes = torch.empty(t, d, dtype=values.dtype, device=values.device)
    exps = torch.empty(t, g, dtype=SCALE_DTYPE_BY_MODE[QUANT_MODE_MX], device=values.device)
    # Through write_split, not torch.ops.custom: where cann-recipes' custom_ops owns that op, a direct call
    # would hand its MX mode (not SPEC-exact) int64 slots; write_split chooses and converts as for any call.
    backend = write_split(codes, exps, rows, torch.arange(t, dtype=torch.int32, device=values.device),
                          quant_mode=QUANT_MODE_MX, round_scale=round_scale)
    slots = _guarded_slots(slot_mapping, nb * bs).long()
    keep = slots >= 0
    s = slots[keep]
    block, off = s // bs, s % bs
    values[block, off] = codes[keep].unsqueeze(1)
    scales[block, off] = mx_scales_to_float32(exps[keep]).unsqueeze(1)
    log_once("NPU packed-cache MX writes go through the split-cache path into float32 scale slots "
             "(the standard layout)", logger=logger)
    return backend
