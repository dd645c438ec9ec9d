"""A faster forward pass for the weight-sparse GPT, equal to the plain one up to float rounding.

    model = accelerate(load_model(...))      # in place; returns the model
    with torch.no_grad():
        logits = model(idx)                   # same logits, same hook values

What changes (only while no gradient is needed; with autograd on, every piece runs the plain
code, so pruning and attribution keep their exact gradients):

- Linears whose weight is mostly exact zeros (density <= `SPARSE_MAX_DENSITY`, decided per
  matrix when it is first used and again whenever the weight is changed in place) multiply
  by a compressed copy of the weight: `x @ W.T` as dense-times-CSC (`torch.addmm` with
  `W.T` in CSC layout, which measured fastest of torch's sparse layouts for these shapes; see
  bench/README.md). At the release's density (~1/1000) that is 5-10x faster than the dense
  matmul; denser matrices (embeddings, the unembedding, the dense baselines) stay dense.
- Attention with a sink: the released algorithm (and `inference.model`) prepends a sink key
  and builds a (B, H, T, T+1) additive mask, which forces SDPA onto its slow "math" path
  (1.5 s per csp_yolo2 layer at 1024 tokens). Here: causal flash attention without the sink,
  which also returns each query's log-sum-exp `lse` of the scores, then one rescale. With the
  sink the softmax denominator gains `exp(s)` and the sink's value is zero, so the output is
  the sinkless one times `Z / (Z + exp(s)) = sigmoid(lse - s)`.

Every module keeps its parameters and names, so `state_dict()` (and `save_model`) is
unchanged, and every hook point of `inference.model` is still called with the same values:
recording and interventions work as before. `decelerate(model)` undoes it.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from inference.model import GPT, CausalSelfAttention

# Dense-times-CSC beats the dense matmul below about 2-3% density for the release's shapes
# (measured on 2 cores at 1024 tokens: 8192x2080 at 1%: 110 ms vs 280 ms dense; at 0.1%: 23 ms).
SPARSE_MAX_DENSITY = 0.02


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class SparseLinear(nn.Linear):
    """An `nn.Linear` that, when no gradient is needed and its weight is sparse enough,
    computes `x @ W.T + b` with a compressed copy of W (rebuilt when W changes in place)."""

    max_density: float = SPARSE_MAX_DENSITY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _grad_needed(x, self.weight) or x.dtype != self.weight.dtype:
            return super().forward(x)
        wt = self._compressed_weight_t()
        if wt is None:
            return super().forward(x)
        x2 = x.reshape(-1, self.in_features)
        y = torch.mm(x2, wt) if self.bias is None else torch.addmm(self.bias, x2, wt)
        return y.view(*x.shape[:-1], self.out_features)

    def density(self) -> float:
        return self.weight.count_nonzero().item() / max(1, self.weight.numel())

    def _compressed_weight_t(self) -> torch.Tensor | None:
        """W.T in CSC layout, or None when W is too dense to gain from it. Cached on the weight's
        identity and version counter, so an in-place edit (e.g. zeroing a neuron) is seen."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.max_density)
        cached = self.__dict__.get("_sparse_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        wt = None
        if self.density() <= self.max_density:
            # inference_mode(False): a normal tensor even when first built under inference_mode.
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSC tensor support is in beta")
                wt = w.detach().t().to_sparse_csc()
        self.__dict__["_sparse_cache"] = (key, wt)  # a plain attribute: never part of state_dict()
        return wt


_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class FastCausalSelfAttention(CausalSelfAttention):
    """Sink attention as causal flash attention plus a rescale by sigmoid(lse - sink_logit)."""

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if (
            not self.config.sink
            or _FLASH_WITH_LSE is None
            or q.device.type != "cpu"
            or q.dtype not in (torch.float32, torch.bfloat16)
            or _grad_needed(q, k, v, self.attn_imp.sink_logit)
        ):
            return super()._sdpa(q, k, v)
        y, lse = _FLASH_WITH_LSE(q, k, v, 0.0, True, scale=1.0 / math.sqrt(self.d_head))[:2]  # lse: (B, H, T)
        sink = self.attn_imp.sink_logit.to(lse.dtype).view(1, -1, 1)
        return y * torch.sigmoid(lse - sink).unsqueeze(-1).to(y.dtype)


def accelerate(model: GPT, max_density: float = SPARSE_MAX_DENSITY) -> GPT:
    """Switch `model` (in place) to the fast forward path; returns it.

    Each linear layer multiplies by a compressed weight when its density is at most
    `max_density` (checked per matrix, lazily); `max_density=1.0` forces the sparse kernel
    everywhere (tests), `0.0` keeps every matmul dense.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__class__ = SparseLinear
            module.max_density = max_density
        elif type(module) is CausalSelfAttention:
            module.__class__ = FastCausalSelfAttention
    return model


def decelerate(model: GPT) -> GPT:
    """Undo `accelerate`: every module back to the plain class, caches dropped."""
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.__class__ = nn.Linear
            module.__dict__.pop("_sparse_cache", None)
            module.__dict__.pop("max_density", None)
        elif isinstance(module, FastCausalSelfAttention):
            module.__class__ = CausalSelfAttention
    return model


def is_accelerated(model: GPT) -> bool:
    return any(isinstance(m, (SparseLinear, FastCausalSelfAttention)) for m in model.modules())
