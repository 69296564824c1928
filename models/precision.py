"""Running the ordered transformer in bf16, with fp32 where precision matters.

Two mechanisms, one per use:
- Decoding loops (`sample`, `extract_orders` with `dtype=torch.bfloat16`) run a bf16 copy of the network
  (`cast_for_inference`, made once per call): ~100 steps of small matmuls then pay no per-op casts. The
  KV cache is bf16; logits are fp32 (`OrderedTransformer` returns fp32 logits), so confidences, token
  draws and scores are computed in fp32.
- One forward (`nll_under_order(..., dtype=...)`, training) runs under `torch.autocast` (what Lightning's
  `precision: bf16-mixed` opens around every step): matmuls in bf16, weights, residual stream and logits
  in fp32, gradients reach the fp32 weights. Decoding inside an enclosing autocast works too: the cache
  follows the autocast dtype (`OrderedTransformer.new_cache`), so it is never converted.
Measured agreement with fp32 and speed: README, "Benchmarks".

Where it pays: CPUs with AMX (Intel Xeon 4th generation and later: ~7x the fp32 matmul rate) or
AVX512-BF16, and GPUs with bf16 tensor cores (compute capability >= 8.0). Elsewhere bf16 is emulated
on CPUs: correct but slower than fp32, so fp32 stays the default there (`bf16_pays`).
"""

import contextlib
import copy

import torch
from torch import nn

DTYPES = {"fp32": None, "32": None, "32-true": None, "bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16}
PRECISIONS = (*DTYPES, "auto")  # auto: bf16 where it pays (`bf16_pays`), else fp32


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype of a precision name ("fp32", "bf16", "auto", or Lightning's "32-true" / "bf16-mixed") on
    `device`; None means fp32 (no autocast, no cast copy). "auto" is bf16 where `bf16_pays(device)`."""
    if precision is None or isinstance(precision, torch.dtype):
        return None if precision == torch.float32 else precision
    if precision == "auto":
        return torch.bfloat16 if bf16_pays(device) else None
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    return DTYPES[precision]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`'s type; a no-op for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def cast_for_inference(net: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """`net` itself when dtype is None or already its dtype; else a copy with its floating-point weights and
    buffers in `dtype` (for decoding: the original, its gradients and its optimizer are untouched)."""
    weight = next(net.parameters())
    if dtype is None or dtype == weight.dtype:
        return net
    return copy.deepcopy(net).to(dtype)


def bf16_pays(device: torch.device | str) -> bool:
    """Whether bf16 matmuls are native (faster than fp32) on this device: AMX or AVX512-BF16 CPUs,
    GPUs with bf16 tensor cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, hence the getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def emulated_bf16_warning(precision: str | None, device: torch.device | str) -> str | None:
    """A one-line warning when a Trainer `precision` asks for bf16 on a device that only emulates it (a CPU
    without AMX or AVX512-BF16: bf16 matmuls there run at a small fraction of fp32's rate), else None."""
    if precision is None or "bf16" not in str(precision) or bf16_pays(device):
        return None
    return (f"trainer.precision {precision} on {torch.device(device).type}, which has no native bf16 matmuls: "
            "they are emulated, many times slower than fp32 here; pass --trainer.precision 32-true")
