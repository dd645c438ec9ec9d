"""The weight-sparse GPT of Gao et al. 2025, nanoGPT-style: one module, the math visible.

Reads the released checkpoints unchanged: parameter names are exactly the state-dict keys
of `shared/spec/checkpoint-format.md`, and every hook point listed there is called with
that name (see `inference.hooks`). Besides the spec's hook points, each norm exposes its
per-token inverse scale as `{i}.ln_1.rstd`, `{i}.ln_2.rstd` and `ln_f.rstd` (shape
(B, T, 1)) so that pruning can freeze norms at their unpruned scale by intervening there.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from inference.config import GPTConfig
from inference.hooks import check_names, hook, hooks_active


def abs_topk(x: torch.Tensor, frac: float | None) -> torch.Tensor:
    """Activation sparsity: keep the int(frac * width) entries of largest |x| along the last dim."""
    if frac is None:
        return x
    k = int(frac * x.shape[-1])
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class Norm(nn.Module):
    """LayerNorm (eps 1e-5, optional bias) or RMSNorm (weight only, eps = dtype epsilon, as
    torch.nn.RMSNorm's default), written out so the inverse scale is a hook point."""

    def __init__(self, dim: int, rms: bool, bias: bool) -> None:
        super().__init__()
        self.rms = rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias and not rms else None

    def forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.scale(x, hook(f"{name}.rstd", self.inv_scale(x)))

    def inv_scale(self, x: torch.Tensor) -> torch.Tensor:
        """1 / std over the last dim (RMS for RMSNorm, centred for LayerNorm), shape (..., 1)."""
        if self.rms:
            return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
        xc = x - x.mean(-1, keepdim=True)
        return torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)

    def scale(self, x: torch.Tensor, rstd: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
        """The norm's output at a given inverse scale (its own, or a frozen one), at full width or
        (RMSNorm, which has no mean to couple the channels) at `channels` only."""
        w = self.weight if channels is None else self.weight[channels]
        if self.rms:
            return x * rstd * w
        y = (x - x.mean(-1, keepdim=True)) * rstd * w
        return y if self.bias is None else y + self.bias


class SinkAttention(nn.Module):
    """Holds the per-head sink logit (state-dict key `attn.attn_imp.sink_logit`)."""

    def __init__(self, n_head: int) -> None:
        super().__init__()
        self.sink_logit = nn.Parameter(torch.zeros(n_head))


class CausalSelfAttention(nn.Module):
    abs_topk = staticmethod(abs_topk)  # the fast path's classes swap in an exact, faster one (inference.fast)

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.d_head = config.n_head, config.d_head
        self.c_attn = nn.Linear(config.d_model_in, 3 * config.d_attn, bias=config.bias)
        self.c_proj = nn.Linear(config.d_attn, config.d_model, bias=config.bias)
        if config.sink:
            self.attn_imp = SinkAttention(config.n_head)
        if not config.flash:
            mask = torch.tril(torch.ones(config.block_size, config.block_size)).view(1, 1, config.block_size, config.block_size)
            self.register_buffer("bias", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, p = self.config, f"{self.layer}.attn"
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(cfg.d_attn, dim=2)
        q = hook(f"{p}.q", self.abs_topk(q, cfg.sparsity_at("attn_q")))
        k = hook(f"{p}.k", self.abs_topk(k, cfg.sparsity_at("attn_k")))
        v = hook(f"{p}.v", self.abs_topk(v, cfg.sparsity_at("attn_v")))
        q, k, v = (t.view(B, T, self.n_head, self.d_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, dh)
        if cfg.flash:
            y = self._sdpa(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = hook(f"{p}.y", y.transpose(1, 2).reshape(B, T, cfg.d_attn))
        return self.c_proj(y)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self.config.sink:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Attention sink: one extra key slot per head, always visible, with logit
        # sink_logit[h] whatever the query, and value zero. As SDPA input: a zero key and
        # value prepended, and an additive mask carrying the sink logit in that column.
        B, H, T, dh = q.shape
        zeros = q.new_zeros(B, H, 1, dh)
        k, v = torch.cat([zeros, k], dim=2), torch.cat([zeros, v], dim=2)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = q.new_full((T, T), float("-inf")).masked_fill(causal, 0.0)
        sink = self.attn_imp.sink_logit.to(q.dtype).view(H, 1, 1).expand(H, T, 1)
        mask = torch.cat([sink, mask.expand(H, T, T)], dim=-1)  # (H, T, T+1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    abs_topk = staticmethod(abs_topk)

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.c_fc = nn.Linear(config.d_model_in, config.d_mlp, bias=config.bias)
        self.c_proj = nn.Linear(config.d_mlp, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        h = self.c_fc(x)
        h = F.gelu(h) if cfg.activation_type == "gelu" else F.relu(h)
        h = hook(f"{self.layer}.mlp.post_act", self.abs_topk(h, cfg.sparsity_at("mlp_neuron")))
        return self.c_proj(h)


class Block(nn.Module):
    abs_topk = staticmethod(abs_topk)

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.config, self.layer = config, layer
        self.ln_1 = Norm(config.d_model, config.rms_norm, config.ln_bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = Norm(config.d_model, config.rms_norm, config.ln_bias)
        self.mlp = MLP(config, layer)
        if config.d_pos_emb:
            self.ln_p1 = Norm(config.d_pos_emb, config.rms_norm, config.ln_bias)
            self.ln_p2 = Norm(config.d_pos_emb, config.rms_norm, config.ln_bias)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor | None) -> torch.Tensor:
        cfg, i = self.config, self.layer
        x = hook(f"{i}.resid_in", x)

        h = self.ln_1(x, f"{i}.ln_1")
        if pos_emb is not None:  # concatenated position embedding, normed per block
            h = torch.cat([h, self.ln_p1(pos_emb, f"{i}.ln_p1").expand(h.shape[0], -1, -1)], dim=-1)
        h = hook(f"{i}.attn.act_in", self.abs_topk(h, cfg.sparsity_at("attn_in")))
        delta = hook(f"{i}.attn.resid_delta", self.abs_topk(self.attn(h), cfg.sparsity_at("attn_out")))
        x = self._residual(x + delta, "resid_post_attn")
        x = hook(f"{i}.resid_mid", x)

        h = self.ln_2(x, f"{i}.ln_2")
        if pos_emb is not None:
            h = torch.cat([h, self.ln_p2(pos_emb, f"{i}.ln_p2").expand(h.shape[0], -1, -1)], dim=-1)
        h = hook(f"{i}.mlp.act_in", self.abs_topk(h, cfg.sparsity_at("mlp_in")))
        delta = hook(f"{i}.mlp.resid_delta", self.abs_topk(self.mlp(h), cfg.sparsity_at("mlp_out")))
        return self._residual(x + delta, "resid_post_mlp")

    def _residual(self, x: torch.Tensor, loctype: str) -> torch.Tensor:
        if self.config.residual_activation_type == "relu":
            x = F.relu(x)
        return self.abs_topk(x, self.config.sparsity_at(loctype))


def sinusoid_table(block_size: int, dim: int) -> torch.Tensor:
    """Fixed position table: sin and cos at dim // 2 periods log-spaced from 4 to block_size tokens."""
    half = dim // 2
    periods = torch.logspace(math.log10(4.0), math.log10(float(block_size)), half, dtype=torch.float64)
    angle = 2 * math.pi * torch.arange(block_size, dtype=torch.float64)[:, None] / periods[None, :]
    table = torch.zeros(block_size, dim, dtype=torch.float64)
    table[:, :half] = torch.sin(angle)
    table[:, half : 2 * half] = torch.cos(angle)
    return table.float()


LAYER_HOOK_POINTS = ("resid_in", "ln_1.rstd", "attn.act_in", "attn.q", "attn.k", "attn.v", "attn.y", "attn.resid_delta",
                     "resid_mid", "ln_2.rstd", "mlp.act_in", "mlp.post_act", "mlp.resid_delta")  # fmt: skip


def hook_names(config: GPTConfig) -> tuple[str, ...]:
    """Every hook point the model calls, in forward order (the spec's, plus each norm's `.rstd`)."""
    per_layer = tuple(f"{i}.{p}" for i in range(config.n_layer) for p in LAYER_HOOK_POINTS)
    return per_layer + ("final_resid", "ln_f.rstd")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        d_pos = config.d_pos_emb or config.d_model
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.d_model),
                wpe=nn.Embedding(config.block_size, d_pos),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=Norm(config.d_model, config.rms_norm, config.ln_bias),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.final_logits_bias = nn.Parameter(torch.zeros(config.vocab_size))
        if config.enable_bigram_table:
            table = torch.zeros(config.vocab_size, config.vocab_size)
            if config.learnable_bigram_table:
                self.bigram_table = nn.Parameter(table)
            else:
                self.register_buffer("bigram_table", table)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual writes
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.d_pos_emb and config.sinusoidal_cat_pos_emb:
            self.transformer.wpe.weight.data.copy_(sinusoid_table(config.block_size, d_pos))
            self.transformer.wpe.weight.requires_grad_(False)
        if config.tied_unembed:
            self.lm_head.weight = self.transformer.wte.weight
        self.hook_names = hook_names(config)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, start: tuple[int, torch.Tensor] | None = None):
        """Logits (B, T, vocab) for token ids (B, T); with targets, (logits, loss).

        `start` = (layer, x): x (B, T, d_model) is the residual stream entering block `layer`
        (e.g. a recorded `{layer}.resid_in`); the embedding and the blocks before it are skipped,
        so their hook points are not called."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        wpe = self.transformer.wpe.weight[:T].unsqueeze(0)  # (1, T, d_pos)
        pos_emb = wpe if cfg.d_pos_emb else None
        if start is None:
            first, x = 0, self.transformer.wte(idx)
            if not cfg.d_pos_emb:
                x = x + wpe
        else:
            first, x = start
            if x.shape != (B, T, cfg.d_model):
                raise ValueError(f"start state of shape {tuple(x.shape)}, want {(B, T, cfg.d_model)}")
        for block in self.transformer.h[first:]:
            x = block(x, pos_emb)
        logits = self.head(hook("final_resid", x), idx)
        if hooks_active():
            check_names(self.hook_names)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def head(self, x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the final residual stream `x` (..., d_model) of tokens `idx` (...): ln_f, the
        unembedding and its bias, plus each token's row of the bigram table; into `out` when given
        (no autograd then)."""
        logits = torch.add(self.lm_head(self.transformer.ln_f(x, "ln_f")), self.final_logits_bias, out=out)
        if self.config.enable_bigram_table:
            logits += self.bigram_table[idx]
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
