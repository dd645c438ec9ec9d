"""Train a weight-sparse GPT (or its dense baseline) the way Gao et al. 2025 do, at toy scale.

- AdamW with linear warmup and cosine decay, gradient clipping, a fixed seed.
- Weight sparsity: after every optimizer step each weight matrix (embeddings and the
  unembedding included) keeps only its largest-magnitude entries, at least
  `min_nonzero_per_row` in every row so that no neuron or channel dies silently. The kept
  fraction goes linearly from 1 (dense) to `target_density` over the first `anneal_frac` of
  training, then stays there, so the final model has exactly that density.
- Activation sparsity is part of the model (AbsTopK at `afrac_loctypes`, `inference.model`).

Metrics go to `progress.json` (one JSON object per line) in the release's key names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from inference.config import GPTConfig
from inference.hooks import record
from inference.model import GPT
from pipeline.demo.profiles import Profile

# Parameter names that are "embeddings" for L0_non_embed (the release's split).
EMBED_PARAMS = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "final_logits_bias", "bigram_table")


def model_config(profile: Profile) -> GPTConfig:
    """The beeg_config of the demo models: the paper's choices (RMSNorm, untied unembedding,
    AbsTopK at the paper's locations), without biases so that every connection is a weight."""
    return GPTConfig(
        block_size=profile.block_size,
        vocab_size=profile.vocab_size,
        n_layer=profile.n_layer,
        n_head=profile.n_head,
        d_head=profile.d_head,
        d_model=profile.d_model,
        d_mlp=profile.d_mlp,
        dropout=0.0,
        bias=False,
        ln_bias=False,
        rms_norm=True,
        activation_type="gelu",
        afrac=profile.afrac,
        afrac_loctypes=profile.afrac_loctypes,
        tied_unembed=False,
        tokenizer_name="tinypython_2k",
        flash=True,
        sink=False,
        enable_bigram_table=profile.bigram_table,
        d_pos_emb=profile.d_pos_emb,
        learnable_bigram_table=profile.bigram_table,
    )


def sparse_param_names(model: GPT) -> list[str]:
    """Every weight matrix: the matrices pruned to `target_density` (biases, norms and the bigram
    table stay dense: the paper adds the table as a dense component)."""
    return [n for n, p in model.named_parameters() if p.ndim == 2 and n != "bigram_table"]


def kept_count(shape: tuple[int, int], density: float, min_per_row: int) -> int:
    """How many entries a (rows, cols) matrix keeps at this density (never fewer than min_per_row per row)."""
    rows, cols = shape
    return min(rows * cols, max(rows * min(min_per_row, cols), round(density * rows * cols)))


@torch.no_grad()
def sparsify_(w: torch.Tensor, density: float, min_per_row: int) -> None:
    """Zero all but the `kept_count` largest-magnitude entries of `w`, keeping the top
    `min_per_row` of every row first and the rest by magnitude over the whole matrix."""
    rows, cols = w.shape
    k = kept_count((rows, cols), density, min_per_row)
    if k >= w.numel():
        return
    mag = w.abs()
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.scatter_(1, mag.topk(min(min_per_row, cols), dim=1).indices, True)
    rest = k - int(keep.sum())
    if rest > 0:
        score = mag.masked_fill(keep, -1.0).flatten()
        # The rest-th largest score by selection (O(n); a global topk is O(n log k) and dominates
        # the step for a large table), then exactly `rest` entries: all above it, and of those
        # equal to it the first in index order.
        s = score.numpy()
        thr = float(np.partition(s, s.size - rest)[s.size - rest])
        above = score > thr
        ties = (score == thr).nonzero().squeeze(1)[: rest - int(above.sum())]
        keep.view(-1)[above] = True
        keep.view(-1)[ties] = True
    w.mul_(keep)


def density_at(step: int, profile: Profile) -> float:
    """Kept fraction after optimizer step `step` (1-based): linear from 1 to the target, then flat."""
    anneal_steps = max(1, round(profile.anneal_frac * profile.steps))
    if step >= anneal_steps:
        return profile.target_density  # exactly: the final kept counts are computed from it
    return 1.0 - (1.0 - profile.target_density) * step / anneal_steps


def lr_at(step: int, profile: Profile) -> float:
    if step < profile.warmup_steps:
        return profile.lr * (step + 1) / profile.warmup_steps
    t = (step - profile.warmup_steps) / max(1, profile.steps - profile.warmup_steps)
    return profile.lr * (profile.min_lr_frac + (1 - profile.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Fixed thread count for the build (results depend on it), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- data ------------------------------------------------------------------------------


def eval_windows(stream: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """Up to n evenly spaced, non-overlapping windows of block_size + 1 tokens: (n, block_size + 1)."""
    w = block_size + 1
    total = len(stream) // w
    if total == 0:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than one window of {w}")
    n = min(n, total)
    starts = [(i * total // n) * w for i in range(n)]
    return torch.stack([stream[s : s + w] for s in starts])


def unigram_xent(train_stream: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the add-one-smoothed unigram distribution of the train
    stream, on the given held-out target tokens: the baseline the models must beat."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(-logp[targets.reshape(-1)].mean())


@torch.no_grad()
def evaluate(model: GPT, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean cross-entropy (nats/token) over every target position of the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        _, loss = model(w[:, :-1], w[:, 1:])
        total += float(loss) * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def alive_neurons(model: GPT, windows: torch.Tensor) -> list[int]:
    """Per layer: MLP neurons with a nonzero activation on at least one token of the windows."""
    model.eval()
    with record(r"\d+\.mlp\.post_act") as rec:
        model(windows[:, :-1])
    model.train()
    return [int((rec[f"{i}.mlp.post_act"] != 0).flatten(0, 1).any(0).sum()) for i in range(model.config.n_layer)]


def nonzero_counts(model: GPT) -> tuple[int, int]:
    """(L0, L0_non_embed): nonzero parameters in the whole model / outside the embeddings."""
    l0 = l0_ne = 0
    for name, p in model.named_parameters():
        nz = int(torch.count_nonzero(p))
        l0 += nz
        if name not in EMBED_PARAMS:
            l0_ne += nz
    return l0, l0_ne


def weight_density(model: GPT) -> tuple[int, int]:
    """(nonzeros, entries) over the sparsified weight matrices."""
    params = dict(model.named_parameters())
    names = sparse_param_names(model)
    return sum(int(torch.count_nonzero(params[n])) for n in names), sum(params[n].numel() for n in names)


def expected_nonzeros(model: GPT, profile: Profile, sparse: bool) -> int:
    """The nonzero count the sparsified matrices must have at the end of training."""
    params = dict(model.named_parameters())
    if not sparse:
        return sum(params[n].numel() for n in sparse_param_names(model))
    return sum(
        kept_count(tuple(params[n].shape), profile.target_density, profile.min_nonzero_per_row) for n in sparse_param_names(model)
    )


# ---- training --------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: GPT
    curve: list[dict]  # progress.json lines
    final_test_xent: float
    unigram_xent: float
    num_params: int
    nonzero_weights: int
    weight_entries: int
    steps: int = 0  # optimizer steps taken (fewer than the profile's when stopped at a matched loss)


def _optimizer(model: GPT, profile: Profile) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms' gains and biases)."""
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": profile.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=profile.lr,
        betas=(profile.beta1, profile.beta2),
        eps=profile.adam_eps,
        foreach=False,
    )


def _eval_metrics(model: GPT, eval_w: torch.Tensor, step: int, on_eval: Callable[[int, GPT], dict] | None) -> dict:
    """The progress.json metrics measured on the model (nonzeros, alive neurons, `on_eval`'s)."""
    l0, l0_ne = nonzero_counts(model)
    line = {"L0": l0, "L0_non_embed": l0_ne}
    for i, n in enumerate(alive_neurons(model, eval_w)):
        line[f"num_alive_neurons/c_fc/layer_{i}"] = n
    if on_eval is not None:
        model.eval()
        with torch.no_grad():
            line.update(on_eval(step, model))
        model.train()
    return line


def train(
    profile: Profile,
    train_stream: torch.Tensor,
    test_stream: torch.Tensor,
    sparse: bool,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, GPT], dict] | None = None,
    stop_at_xent: float | None = None,
) -> TrainResult:
    """Train one model on token streams (1-D int64 tensors). `on_step(step, loss)` reports progress;
    `on_eval(step, model)` (model in eval mode) returns extra metrics for each progress.json line.
    `stop_at_xent`: stop (after a last eval line) at the first `match_every`-th step whose
    held-out cross-entropy on the final windows is at most this (a loss-matched baseline)."""
    cfg = model_config(profile)
    with torch_threads(profile.num_threads):
        torch.manual_seed(profile.seed)
        model = GPT(cfg)
        model.train()
        data_gen = torch.Generator().manual_seed(profile.seed + 1)
        eval_w = eval_windows(test_stream, cfg.block_size, profile.eval_windows)
        final_w = eval_windows(test_stream, cfg.block_size, profile.final_eval_windows)
        unigram = unigram_xent(train_stream, final_w[:, 1:], cfg.vocab_size)
        unigram_eval = unigram_xent(train_stream, eval_w[:, 1:], cfg.vocab_size)

        params = dict(model.named_parameters())
        matrices = [params[n] for n in sparse_param_names(model)]
        opt = _optimizer(model, profile)
        n_windows = len(train_stream) - cfg.block_size - 1
        if n_windows <= 0:
            raise ValueError(f"train stream of {len(train_stream)} tokens is shorter than block_size {cfg.block_size}")
        offsets = torch.arange(cfg.block_size + 1)
        curve: list[dict] = []
        loss_ema = None
        for step in range(1, profile.steps + 1):
            lr = lr_at(step - 1, profile)
            if profile.lr_density_scale and sparse:
                lr = lr / math.sqrt(density_at(step - 1, profile) if step > 1 else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            starts = torch.randint(0, n_windows, (profile.batch_size,), generator=data_gen)
            batch = train_stream[starts[:, None] + offsets]
            _, loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), profile.grad_clip)
            opt.step()
            density = density_at(step, profile) if sparse else 1.0
            if sparse:
                for w in matrices:
                    sparsify_(w.data, density, profile.min_nonzero_per_row)
            loss_v = float(loss.detach())
            loss_ema = loss_v if loss_ema is None else 0.9 * loss_ema + 0.1 * loss_v
            if on_step is not None:
                on_step(step, loss_ema)
            matched = stop_at_xent is not None and step % profile.match_every == 0 and evaluate(model, final_w) <= stop_at_xent
            if step % profile.eval_every == 0 or step == profile.steps or matched:
                line = {"step": step, "test_xent": evaluate(model, eval_w), "unigram_xent": unigram_eval, "train_loss": loss_v,
                        "train_loss_ema": loss_ema, "lr": lr, "density": density}  # fmt: skip
                curve.append(line | _eval_metrics(model, eval_w, step, on_eval))
            if matched:
                break
        final = evaluate(model, final_w)
        nz, entries = weight_density(model)
        curve[-1]["final_test_xent"] = final
        curve[-1]["final_unigram_xent"] = unigram
    model.eval()
    return TrainResult(model, curve, final, unigram, model.num_params(), nz, entries, steps=step)


def token_stream(texts: Iterable[str], encoding, eot: int) -> torch.Tensor:
    """Concatenate the encoded texts, each followed by <|endoftext|>, as one int64 tensor."""
    ids: list[int] = []
    for text in texts:
        ids.extend(encoding.encode_ordinary(text))
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)
