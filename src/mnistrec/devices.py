"""Where tensors live: choosing the device, and the memory layout that is fastest there."""

from __future__ import annotations

import torch
from torch import nn

from .errors import MnistrecError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise MnistrecError(f"unknown device {name!r}; choose from: auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise MnistrecError("--device cuda requested but PyTorch sees no CUDA device")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MnistrecError("--device mps requested but this PyTorch build has no MPS device")
    return torch.device(name)


def channels_last_helps(model: nn.Module, device: torch.device) -> bool:
    """Channels-last (NHWC) weights for conv nets on CPU (oneDNN) and CUDA (tensor cores).

    Measured on a 2-core CPU: a small CNN's training step is about 2x faster in
    NHWC. MLPs have no 4-D weights, so nothing changes for them; MPS is left alone.
    """
    return device.type in ("cpu", "cuda") and any(isinstance(m, nn.Conv2d) for m in model.modules())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CPU with AVX512-BF16 or AMX (CUDA and MPS: no;
    CUDA trains in float16). Elsewhere oneDNN emulates bfloat16, slower than float32."""
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a training run uses: float16 on CUDA (with a gradient scaler), else bfloat16 for
    ``precision`` ``bf16``, or ``auto`` on a CPU with native bfloat16; ``None`` trains in float32."""
    if device.type == "cuda":
        return torch.float16
    if precision == "bf16" or (precision == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None
