"""Cache Attention on CUDA: the RawKernel in cache_attention.cu, launched through CuPy.

Tensors stay torch tensors: they are handed to CuPy through DLPack without copies (16-bit
types as int16 views, since the kernel reads raw bits), and the kernel runs on torch's
current stream so it orders correctly with the model's other work. CuPy is optional: on a
machine without it, or without a device, :func:`availability` says why and the dispatcher
uses the torch reference.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from chaid.errors import ChaidError
from chaid.kernels.reference import check_inputs

SOURCE = Path(__file__).with_name("cache_attention.cu")
# Must match WARPS * ROWS_PER_WARP, WARPS * 32, TILE_K and MAX_D in the CUDA source.
ROWS_PER_BLOCK = 16
THREADS_PER_BLOCK = 256
TILE_K = 32
MAX_HEAD_DIM = 128
# gridDim.y limit: one grid row per (frame row, head).
MAX_GRID_Y = 65535

_KERNEL_NAMES = {
    torch.float32: "cache_attention_f32",
    torch.float16: "cache_attention_f16",
    torch.bfloat16: "cache_attention_bf16",
}


@functools.lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(True, "") when CuPy imports and sees a CUDA device, else (False, the reason)."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'chaid[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own runtime errors without a driver
        return False, f"CuPy sees no CUDA runtime: {exc}"
    if count < 1:
        return False, "no CUDA device"
    if not torch.cuda.is_available():
        return False, "torch has no CUDA support"
    return True, ""


@functools.cache
def _kernel(name: str, device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=SOURCE.read_text(), options=("--std=c++14",))
        return module.get_function(name)


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel handles these inputs (device, dtype, head dim, grid size)."""
    return (
        q.is_cuda
        and q.dtype in _KERNEL_NAMES
        and q.shape[-1] <= MAX_HEAD_DIM
        and q.shape[0] * q.shape[1] <= MAX_GRID_Y
        and k.shape[-2] >= 1
    )


def _as_cupy(t: torch.Tensor):
    import cupy

    raw = t.view(torch.int16) if t.element_size() == 2 and t.dtype != torch.float16 else t
    return cupy.from_dlpack(raw)


def cache_attention_cupy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, nh, Lq, D) x (N, nh, Lk, D) → (N, nh, Lq, D) on the GPU, scale D^-0.5.

    Raises InputError when the inputs do not fit together, ChaidError when CuPy or a device
    is missing or the kernel does not support them.
    """
    ok, why = availability()
    if not ok:
        raise ChaidError(f"the CuPy Cache Attention kernel is unavailable: {why}")
    check_inputs(q, k, v)
    if not supports(q, k):
        raise ChaidError(
            f"the kernel does not support {q.dtype} on {q.device} with head dim {q.shape[-1]}"
        )
    import cupy
    import numpy as np

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n, heads, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    fn = _kernel(_KERNEL_NAMES[q.dtype], q.device.index or 0)
    shared = (2 * TILE_K + ROWS_PER_BLOCK) * (d + 1) * 4
    grid = (math.ceil(lq / ROWS_PER_BLOCK), n * heads, 1)
    stream = torch.cuda.current_stream(q.device)
    with cupy.cuda.Device(q.device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
        fn(
            grid,
            (THREADS_PER_BLOCK, 1, 1),
            (
                _as_cupy(q),
                _as_cupy(k),
                _as_cupy(v),
                _as_cupy(out),
                np.int32(lq),
                np.int32(lk),
                np.int32(d),
                np.float32(d**-0.5),
            ),
            shared_mem=shared,
        )
    return out
