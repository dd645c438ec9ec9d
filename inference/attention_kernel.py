"""Sink attention for heads of <= 16 dimensions in compiled C (AVX-512), with torch as the fallback.

At the release's widths (128 heads of 16) torch's CPU flash kernel was ~45% of the fast forward
(bench/README.md, "Faster sparse forward"). Its tiles are built for wide heads; at 16 dimensions it
spends ~4 cycles per query-key pair. `attention_kernel.c` does the same causal softmax with flash's
running maximum, arranged for 16-dimensional heads and AbsTopK's zeros (32 queries in the lanes;
each key's first 4 nonzeros in slots, its others and the values' nonzeros in per-dimension lists;
scores in units of log2 with a polynomial 2^x; the sink folded into the denominator): ~3x torch's
flash on one core (bench/README.md). Built and loaded by `inference.native` (a numba attention
kernel, 256-bit vectors, had measured 0.9x flash). The heads are spread over the fast forward's
worker threads (ctypes releases the GIL). No kernel here, head dimension > 16, another dtype or
device, or a gradient needed: `attention` returns None and the caller runs torch's flash path, which
the tests run too.
"""

from __future__ import annotations

import ctypes
import math

import torch

from inference import native

ENABLED = True  # tests switch the compiled kernel off to run torch's path on the same inputs
MAX_HEAD_DIM = 16
MAX_TOKENS = 1 << 26  # the kernel's offsets into its score tile are int32
SOURCE = "attention_kernel.c"


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sink_attention_f32.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, ctypes.c_int, ctypes.c_float, i64, i64]
    lib.sink_attention_f32.restype = ctypes.c_int
    lib.exp2_f32.argtypes = [p, p, i64]
    lib.exp2_f32.restype = None


def library() -> ctypes.CDLL | None:
    """The compiled library (`sink_attention_f32`, and `exp2_f32` for the tests), or None."""
    return native.library(SOURCE, _declare)


def kernel():
    """The compiled `sink_attention_f32`, or None when it cannot be built here (a warning once)."""
    lib = library()
    return None if lib is None else lib.sink_attention_f32


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the compiled kernel can take these (B, H, T, d) tensors (without building it; the
    caller also checks that no gradient is needed)."""
    return (
        ENABLED
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v))
        and q.dim() == 4
        and q.shape == k.shape == v.shape
        and 1 <= q.shape[-1] <= MAX_HEAD_DIM
        and q.shape[-2] <= MAX_TOKENS
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_logit: torch.Tensor | None,
    out: torch.Tensor | None = None,
    run_parts=None,
) -> torch.Tensor | None:
    """Causal attention of (B, H, T, d) float32 tensors (scale 1/sqrt(d)), with the release's sink
    when `sink_logit` (H,) is given; into `out` (B, H, T, d; any strides with the last one 1) when
    given. `run_parts(fn, parts)` runs fn(part) for each slice of the B*H heads (the fast forward's
    worker threads); default: one after another. None when the kernel does not apply or cannot be
    built (the caller runs torch)."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_logit))
    if grad or not applies(q, k, v):  # (no backward here: autograd runs torch's attention)
        return None
    fn = kernel()
    if fn is None:
        return None
    B, H, T, D = q.shape
    if out is None:
        # (B, T, H, d) underneath: the callers' transpose back to (B, T, H*d) is then a view
        out = torch.empty(B, T, H, D, dtype=q.dtype).transpose(1, 2)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device.type != "cpu" or out.stride(-1) != 1:
        raise ValueError(f"attention: out must be a float32 CPU tensor of shape {tuple(q.shape)} with unit last stride")
    sink = None if sink_logit is None else sink_logit.detach().to(torch.float32).contiguous()
    if sink is not None and sink.shape != (H,):  # the kernel reads H of them
        raise ValueError(f"attention: sink_logit must hold one logit per head ({H}), got shape {tuple(sink.shape)}")
    strides = [(ctypes.c_int64 * 4)(*t.stride()) for t in (q, k, v, out)]
    scale = 1.0 / math.sqrt(D)

    def part(s: slice) -> None:
        rc = fn(
            q.data_ptr(), strides[0], k.data_ptr(), strides[1], v.data_ptr(), strides[2], out.data_ptr(), strides[3],
            None if sink is None else sink.data_ptr(), H, T, D, scale, s.start, s.stop,
        )  # fmt: skip
        if rc != 0:
            raise MemoryError(f"inference.attention_kernel: the kernel failed (code {rc}) on {B * H} heads of {T} x {D}")

    step = max(1, math.ceil(B * H / 16))  # 16 parts: even load over 2-8 threads
    parts = [slice(s, min(s + step, B * H)) for s in range(0, B * H, step)]
    if run_parts is None:
        for s in parts:
            part(s)
    else:
        run_parts(part, parts)
    return out
