"""Cache Attention kernels: dispatch, the torch reference, and the CuPy kernel against it."""

import pytest
import torch
import torch.nn.functional as F

from chaid.errors import ChaidError, InputError
from chaid.kernels import cache_attention, cache_attention_reference, select_backend
from chaid.kernels import cuda as cuda_kernel

GPU_OK, GPU_REASON = cuda_kernel.availability()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"CuPy kernel not runnable here: {GPU_REASON}")


def _qkv(n, heads, lq, lk, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, lq, d, generator=gen)
    k = torch.randn(n, heads, lk, d, generator=gen)
    v = torch.randn(n, heads, lk, d, generator=gen)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def test_reference_is_softmax_attention_per_row_and_head():
    q, k, v = _qkv(3, 2, 5, 7, 8)
    out = cache_attention_reference(q, k, v)
    manual = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    assert torch.allclose(out, manual, atol=1e-5)
    # row 1 of the queries only sees row 1 of the cache
    k2 = k.clone()
    k2[0] += torch.randn(k2[0].shape, generator=torch.Generator().manual_seed(9))
    out2 = cache_attention_reference(q, k2, v)
    assert torch.equal(out[1:], out2[1:]) and not torch.allclose(out[0], out2[0])


def test_equal_cache_gives_plain_self_attention():
    q, k, v = _qkv(2, 2, 6, 6, 16)
    assert torch.allclose(cache_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_dispatch_on_cpu_and_forced_backends():
    q, k, v = _qkv(1, 1, 4, 4, 8)
    assert select_backend(q, k, "auto") == "reference"
    assert select_backend(q, k, "reference") == "reference"
    with pytest.raises(ChaidError, match="unknown Cache Attention backend"):
        cache_attention(q, k, v, "magic")
    if not GPU_OK:
        with pytest.raises(ChaidError, match="unavailable"):
            cache_attention(q, k, v, "cupy")


def test_kernel_source_matches_the_launch_constants():
    src = cuda_kernel.SOURCE.read_text()
    assert f"#define TILE_K {cuda_kernel.TILE_K}" in src
    assert f"#define MAX_D {cuda_kernel.MAX_HEAD_DIM}" in src
    warps = int(src.split("#define WARPS ")[1].split()[0])
    rows = int(src.split("#define ROWS_PER_WARP ")[1].split()[0])
    assert warps * rows == cuda_kernel.ROWS_PER_BLOCK
    assert warps * 32 == cuda_kernel.THREADS_PER_BLOCK
    for name in ("cache_attention_f32", "cache_attention_f16", "cache_attention_bf16"):
        assert 'extern "C" __global__' in src and name in src


# Tolerances: fp32 accumulation in the kernel vs torch's own kernels for each dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "n, heads, lq, lk, d",
    [
        (2, 3, 16, 16, 64),  # tiny-shapes: 16 tokens per frame
        (30, 16, 405, 405, 72),  # OpenSora 240p, 15 frames x 2 guidance branches
        (1, 1, 1, 1, 8),
        (3, 2, 33, 70, 128),  # ragged tiles, largest head dim
        (2, 2, 17, 5, 32),
    ],
)
def test_cupy_kernel_matches_reference(dtype, n, heads, lq, lk, d):
    q, k, v = _qkv(n, heads, lq, lk, d, dtype=dtype, device="cuda")
    assert select_backend(q, k) == "cupy"
    out = cache_attention(q, k, v, "cupy")
    ref = cache_attention_reference(q.float(), k.float(), v.float())
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err}"


@pytest.mark.gpu
@needs_gpu
def test_cupy_kernel_runs_on_torch_current_stream_and_accepts_views():
    q, k, v = _qkv(4, 2, 40, 40, 64, device="cuda")
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous input
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = cache_attention(q_view, k, v, "cupy")
    stream.synchronize()
    assert torch.allclose(out, cache_attention_reference(q, k, v), atol=2e-5)


@pytest.mark.gpu
@needs_gpu
def test_unsupported_head_dim_falls_back_to_reference_in_auto():
    q, k, v = _qkv(1, 1, 8, 8, 160, device="cuda")
    assert select_backend(q, k) == "reference"
    with pytest.raises(ChaidError, match="does not support"):
        cache_attention(q, k, v, "cupy")


def test_inputs_that_do_not_fit_are_input_errors():
    """A cached entry that does not fit the request is the request's error, not INTERNAL."""
    q, k = torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 5, 8)
    with pytest.raises(InputError, match="shapes do not fit"):
        cache_attention(q, k, torch.zeros(2, 2, 5, 4))
    with pytest.raises(InputError, match="share dtype"):
        cache_attention(q, k, k.double())
    with pytest.raises(InputError, match="shapes do not fit"):
        cache_attention(q[0], k, k)
