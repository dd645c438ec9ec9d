"""Circuits as the pruning setup defines them, and the release's task loss.

A node is one channel at one of eight locations per layer (viz-data-format.md):
`{i}.attn.act_in|q|k|v|resid_delta` and `{i}.mlp.act_in|post_act|resid_delta`, or at
`final_resid` (the residual stream after the last block, read by `ln_f`; no layer index);
each is a hook point of `inference.model`. `node_locations` lists the per-layer ones (every
circuit is pruned there); `final_resid` is a node location of a circuit whose `circuit_data`
lists it (released circuits do, the embedded store's do not): only then are its channels
outside the circuit held at their fill. The *circuit model* keeps the circuit's nodes, holds every other
node at its mean over pretraining text, and freezes every norm at its unpruned scale (the
per-token inverse scale recorded from the full model on the same tokens).

This module is the reference implementation (plain masked forwards through hooks); the fast
circuit model (`inference.circuit_model`) and every other faster path must agree with it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from inference.config import GPTConfig
from inference.hooks import intervene, record

ATTN_KINDS = ("act_in", "q", "k", "v", "resid_delta")
MLP_KINDS = ("act_in", "post_act", "resid_delta")
_LOCATION = re.compile(r"(\d+)\.(attn|mlp)\.(act_in|q|k|v|resid_delta|post_act)")
_RSTD = r"(\d+\.ln_[12]|ln_f)\.rstd"


FINAL_RESID = "final_resid"  # the residual stream after the last block (the model's hook point of that name)
FINAL, OTHER = "final", "other"  # the `half` of a final_resid node, and of a location this code does not know


def node_locations(config: GPTConfig) -> list[str]:
    """Every per-layer node location of the model, in forward order (not `final_resid`: see the module doc)."""
    out = []
    for i in range(config.n_layer):
        out += [f"{i}.attn.{k}" for k in ATTN_KINDS]
        out += [f"{i}.mlp.{k}" for k in MLP_KINDS]
    return out


def circuit_locations(config: GPTConfig, circuit_data: Mapping) -> list[str]:
    """The node locations a circuit is pruned at, in forward order: the per-layer ones, then
    `final_resid` when `circuit_data` lists it."""
    return node_locations(config) + ([FINAL_RESID] if FINAL_RESID in circuit_data else [])


def parse_location(location: str) -> tuple[int | None, str, str]:
    """'3.attn.q' -> (3, 'attn', 'q'); 'final_resid' -> (None, 'final', 'final_resid');
    raises ValueError for anything else (see `classify_location` for a reader that keeps it)."""
    if location == FINAL_RESID:
        return None, FINAL, FINAL_RESID
    m = _LOCATION.fullmatch(location) if isinstance(location, str) else None
    if not m or m.group(3) not in (ATTN_KINDS if m.group(2) == "attn" else MLP_KINDS):
        raise ValueError(f"not a node location: {location!r}")
    return int(m.group(1)), m.group(2), m.group(3)


def is_known_location(location: str) -> bool:
    try:
        parse_location(location)
    except ValueError:
        return False
    return True


def classify_location(location: str) -> tuple[int | None, str, str]:
    """(layer, half, kind) of any location string: `parse_location`'s for a known one; for any
    other, (the leading layer index if the name starts with one, else None, 'other', 'other')."""
    try:
        return parse_location(location)
    except ValueError:
        m = re.match(r"(\d+)\.", location)
        return (int(m.group(1)) if m else None), OTHER, OTHER


def layer_half_key(location: str) -> str | None:
    """The `layer_interv_losses` key a location's nodes belong to: '3.attn', 'final_resid', or None."""
    layer, half, _ = classify_location(location)
    if half == FINAL:
        return FINAL_RESID
    return None if half == OTHER else f"{layer}.{half}"


def location_width(config: GPTConfig, location: str) -> int:
    """Number of prunable channels (nodes) at a location."""
    _, _, kind = parse_location(location)
    return {"q": config.d_attn, "k": config.d_attn, "v": config.d_attn, "post_act": config.d_mlp}.get(kind, config.d_model)


def num_total_nodes(config: GPTConfig) -> int:
    return sum(location_width(config, loc) for loc in node_locations(config))


def _hook_width(config: GPTConfig, location: str) -> int:
    """Width of the hooked tensor: act_in also carries the concatenated position embedding."""
    _, _, kind = parse_location(location)
    return config.d_model_in if kind == "act_in" else location_width(config, location)


def circuit_masks(config: GPTConfig, circuit_data: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float masks at every node location of the circuit (`circuit_locations`): 1 for the circuit's
    channels, 0 elsewhere; locations the model does not know are ignored.

    Position-embedding channels of act_in (index >= d_model) are not nodes and stay 1.
    """
    masks = {}
    for loc in circuit_locations(config, circuit_data):
        m = torch.zeros(_hook_width(config, loc))
        m[location_width(config, loc) :] = 1.0
        if loc in circuit_data and len(circuit_data[loc]):
            m[torch.as_tensor(circuit_data[loc]).long()] = 1.0
        masks[loc] = m
    return masks


@torch.no_grad()
def node_means(model, idx: torch.Tensor, batch_size: int = 16, locations: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Mean of every node location's activation (or of `locations`', e.g. with `final_resid`) over
    all tokens of `idx` (N, T) (pretraining text)."""
    locs = node_locations(model.config) if locations is None else locations
    pattern = "|".join(re.escape(loc) for loc in locs)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, idx.shape[0], batch_size):
        batch = idx[start : start + batch_size]
        with record(pattern) as rec:
            model(batch)
        for loc in locs:
            s = rec[loc].double().sum(dim=(0, 1))
            sums[loc] = sums[loc] + s if loc in sums else s
        count += batch.shape[0] * batch.shape[1]
    return {loc: (s / count).float() for loc, s in sums.items()}


@torch.no_grad()
def frozen_norm_scales(model, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every norm's per-token inverse scale in the full (unpruned) model on `idx`."""
    with record(_RSTD) as rec:
        model(idx)
    return dict(rec)


class _Masked:
    """mask * x + (1 - mask) * fill: token by token, so it also applies to some of the tokens
    (`at_rows`, `inference.hooks.row_interventions`: the fast block then stays on its fused path)."""

    def __init__(self, mask: torch.Tensor, fill: torch.Tensor):
        self.mask, self.fill = mask, fill

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.mask + (1 - self.mask) * self.fill

    def at_rows(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        return self(t)


class _Frozen:
    """A norm's inverse scale replaced by the full model's (B, T, 1); `at_rows`: those tokens' own."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale

    def at_rows(self, t: torch.Tensor, rows: slice) -> torch.Tensor:
        return self.scale.reshape(-1, self.scale.shape[-1])[rows]


def masked_forward(
    model,
    idx: torch.Tensor,
    masks: Mapping[str, torch.Tensor],
    fill: Mapping[str, torch.Tensor],
    frozen_scales: Mapping[str, torch.Tensor] | None = None,
    start: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits of the model with each node location x replaced by mask * x + (1 - mask) * fill.

    `fill` is usually the node means (mean ablation). Masks may be float and require grad
    (pruning gates). Norms are frozen at `frozen_scales` (computed from the full model on `idx`
    when not given); locations missing from `masks` are left untouched. `start` = (layer,
    residual entering it), from a masked forward that agrees with this one before that layer:
    the blocks before it are skipped (`GPT.forward`).
    """
    if frozen_scales is None:
        frozen_scales = frozen_norm_scales(model, idx)
    fns = {loc: _Masked(m, fill[loc]) for loc, m in masks.items()}
    fns.update({name: _Frozen(s) for name, s in frozen_scales.items()})
    with intervene(fns):
        return model(idx, start=start)


def docs_lengths(docs: torch.Tensor) -> torch.Tensor:
    """Length of each right-padded doc: the position after which all ids are 0."""
    nonzero = docs != 0
    pos = torch.arange(docs.shape[1], device=docs.device).expand_as(docs)
    return torch.where(nonzero, pos + 1, torch.zeros_like(pos)).max(dim=1).values


def task_loss(logits: torch.Tensor, docs: torch.Tensor, per_pair: bool = False) -> torch.Tensor:
    """The release's two-sided task loss, raw (twice a per-prompt cross-entropy).

    `docs` (n, ctx): the first half one class, the second half the other, paired by index;
    each doc ends (at length - 1) with its correct next token, so pair j's `tokid` is the last
    token of doc j and `alt_tokid` that of doc j + n/2. Per pair the loss is
    -(log_softmax(first[[tokid, alt]])[0] + log_softmax(second[[tokid, alt]])[1]) at the
    position before the answer; the mean over pairs is returned (or each with `per_pair`).
    """
    n = docs.shape[0]
    doc = doc_losses(logits, docs, answer_tokens(docs), wanted_column(torch.arange(n), n))
    half = n // 2
    losses = doc[:half] + doc[half:]
    return losses if per_pair else losses.mean()


def answer_tokens(docs: torch.Tensor) -> torch.Tensor:
    """(n, 2): each doc's pair answers (`tokid`, `alt_tokid`), the one place the task layout
    (pairs split in halves, the answer as the last token of each doc) is read. The first half
    of the docs wants column 0, the second column 1 (`wanted_column`)."""
    n = docs.shape[0]
    if n % 2:
        raise ValueError(f"task docs must come in pairs, got {n} docs")
    half = n // 2
    answers = docs[torch.arange(n, device=docs.device), docs_lengths(docs) - 1]
    pair_tokens = torch.stack([answers[:half], answers[half:]], dim=1)  # (half, 2): tokid, alt_tokid
    return torch.cat([pair_tokens, pair_tokens])


def wanted_column(doc: torch.Tensor, n_docs: int) -> torch.Tensor:
    """The column of `answer_tokens` that docs `doc` (indices among `n_docs`) want."""
    return (doc >= n_docs // 2).long()


def answer_logits(logits: torch.Tensor, docs: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 2) float logits of each doc's pair answers (`answer_tokens`, or `tokens` for docs
    that are not a whole task batch) at the position before the answer."""
    tokens = answer_tokens(docs) if tokens is None else tokens
    rows = torch.arange(docs.shape[0], device=docs.device)
    last = logits[rows, docs_lengths(docs) - 2].float()  # (n, vocab): logits predicting the answer
    return last.gather(1, tokens)


def doc_losses(logits: torch.Tensor, docs: torch.Tensor, tokens: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """(n,) each doc's half of its pair's task loss: -log_softmax over its two answers `tokens`
    (n, 2) (its `answer_tokens` row) at the column it wants, `want` (n,) (`wanted_column`)."""
    pair = answer_logits(logits, docs, tokens)
    return -F.log_softmax(pair, dim=1).gather(1, want.to(pair.device)[:, None])[:, 0]


def task_accuracy(logits: torch.Tensor, docs: torch.Tensor) -> float:
    """Fraction of pairs where the correct token outscores the alternative on both prompts."""
    pair = answer_logits(logits, docs)
    half = docs.shape[0] // 2
    return ((pair[:half, 0] > pair[:half, 1]) & (pair[half:, 1] > pair[half:, 0])).float().mean().item()


@torch.no_grad()
def circuit_loss(model, docs: torch.Tensor, circuit_data, means) -> float:
    """Raw task loss of the circuit model (the stored `interv_loss` convention)."""
    masks = circuit_masks(model.config, circuit_data)
    return task_loss(masked_forward(model, docs, masks, means), docs).item()


@torch.no_grad()
def ablation_losses(
    model, docs: torch.Tensor, circuit_data, means, mode: str = "mean", per_pair: bool = False
) -> dict[str, torch.Tensor]:
    """Raw task loss of the circuit model with each circuit node also ablated, one at a time.

    Returns {location: tensor aligned with circuit_data[location]} (the `ch_interv_losses`
    convention). `mode="mean"` sets the node to its mean, `"zero"` to 0. Reference
    implementation: one full-size masked forward per node. `per_pair`: each node's loss per task
    pair instead of their mean, (nodes, pairs) per location.
    """
    if mode not in ("mean", "zero"):
        raise ValueError(f"mode must be 'mean' or 'zero', got {mode!r}")
    masks = circuit_masks(model.config, circuit_data)
    frozen = frozen_norm_scales(model, docs)
    out = {}
    for loc, channels in circuit_data.items():
        chans = torch.as_tensor(channels).long().tolist()
        losses = [one_ablation_loss(model, docs, masks, means, frozen, loc, c, mode, per_pair) for c in chans]
        if not per_pair:
            out[loc] = torch.tensor(losses)
        else:  # (nodes, pairs), also for a location without nodes (as CircuitModel's)
            out[loc] = torch.stack(losses) if losses else torch.zeros(0, docs.shape[0] // 2, dtype=torch.float64)
    return out


def ablated(masks, means, loc: str, c: int, mode: str) -> tuple[dict, dict]:
    """The masks and fill of the circuit with node (loc, c) also ablated: masked out, and with
    `mode="zero"` its fill set to 0 (`"mean"`: its mean, the fill as it is)."""
    m = dict(masks)
    m[loc] = masks[loc].clone()
    m[loc][c] = 0.0
    fill = means
    if mode == "zero":
        fill = dict(means)
        fill[loc] = means[loc].clone()
        fill[loc][c] = 0.0
    return m, fill


def one_ablation_loss(model, docs, masks, means, frozen, loc: str, c: int, mode: str, per_pair: bool = False):
    """Task loss of one full-size masked forward with node (loc, c) also ablated (a float; with
    `per_pair`, a tensor of each pair's loss)."""
    loss = task_loss(masked_forward(model, docs, *ablated(masks, means, loc, c, mode), frozen), docs, per_pair=per_pair)
    return loss.double().cpu() if per_pair else loss.item()
