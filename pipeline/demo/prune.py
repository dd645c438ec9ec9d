"""Circuit pruning as in Gao et al. 2025: learnable node gates, mean ablation, frozen norms.

Every node location (`inference.circuit.node_locations`) gets one gate logit per channel,
clamped to [-1, 1] after every step. The forward pass uses the Heaviside mask (logit > 0);
the backward pass uses the derivative of sigmoid(logit / temperature) (straight-through
surrogate). A masked node is replaced by its mean over pretraining text (train split), and
every norm is frozen at its scale in the unpruned model on the same docs
(`inference.circuit.masked_forward`).

Objective: corrected task loss (raw `task_loss` / 2, i.e. per prompt) + lambda * (number of
kept nodes). Lambda grows geometrically from `lambda_start` to `lambda_end` over the run
(a regularisation path); every node remembers the last step at which its gate switched off.
The node ranking is "latest to switch off first" (nodes still on at the end first, by gate
logit), and the circuit at budget k is the top k nodes of that ranking. `k_optim` is the
smallest k whose circuit reaches `target_loss` (corrected, per prompt: raw <= 2 * target) on
the held-out task docs, found on a geometric grid of k refined by bisection; when no k reaches
it, `k_optim` is the grid's k of lowest circuit loss, flagged `k_optim_reached_target = False`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from inference.circuit import frozen_norm_scales, location_width, masked_forward, node_locations, task_loss

LOSS_FACTOR = 2.0  # stored task losses are raw = LOSS_FACTOR * per-prompt cross-entropy (release convention)


@dataclass(frozen=True)
class PruneConfig:
    """Every pruning hyperparameter; written verbatim to each viz_data's `prune_config`."""

    steps: int = 300
    lr: float = 0.05  # Adam on the gate logits
    init_logit: float = 0.5
    temperature: float = 0.5  # of the sigmoid surrogate gradient
    lambda_start: float = 1e-5  # penalty per kept node (corrected-loss units), start of the path
    lambda_end: float = 3e-2  # ... end of the path
    target_loss: float = 0.15  # corrected per-prompt task loss (nats) that k_optim must reach
    loss_factor: float = LOSS_FACTOR
    ks: tuple[int, ...] = (16, 32, 64, 128, 256)  # node budgets written besides k_optim
    k_optim_max: int = 2048  # k_optim search stops here (reported as not reached)
    train_pairs: int = 64  # train-split pairs used by the optimisation
    test_pairs: int = 32  # test-split pairs stored in task_samples and used for every loss
    ctx: int = 64  # task doc length (tokens, including the answer)
    mean_windows: int = 64  # pretraining windows (train split) for node means and samples
    snippet_radius: int = 50  # tokens either side of a sample's token of interest
    snippets_per_list: int = 5
    curve_every: int = 8  # all_loss records every curve_every-th step (viewer: (step + 1) * 8)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ks"] = list(self.ks)
        d["loss_scale"] = "raw = loss_factor * per-prompt CE; target_loss is per-prompt (corrected)"
        return d

    @classmethod
    def from_profile(cls, profile) -> PruneConfig:
        """Defaults, then this module's per-profile values, then the profile's own `prune` dict."""
        knobs = {**PROFILE_DEFAULTS.get(profile.name, {}), **(getattr(profile, "prune", None) or {})}
        return cls(**knobs)


# Per-profile overrides (the tiny store must build in about a minute on 2 shared cores).
PROFILE_DEFAULTS: dict[str, dict] = {
    "tiny": dict(steps=40, lr=0.1, train_pairs=16, test_pairs=8, ctx=32, ks=(8,), mean_windows=16, k_optim_max=48, curve_every=4),
    "demo": dict(steps=150, lr=0.05, train_pairs=64, test_pairs=64, ctx=32, ks=(16, 64), mean_windows=64, k_optim_max=2048),
}


class _HeavisideSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        return (logits > 0).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        s = torch.sigmoid(logits / ctx.temperature)
        return grad * s * (1 - s) / ctx.temperature, None


def heaviside_ste(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return _HeavisideSTE.apply(logits, temperature)


def _full_masks(config, gates: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
    """Gate masks at hook width (act_in's concatenated position channels stay 1)."""
    out = {}
    for loc, g in gates.items():
        m = heaviside_ste(g, temperature)
        hook_w = config.d_model_in if loc.endswith("act_in") else g.numel()
        if hook_w > g.numel():
            m = torch.cat([m, m.new_ones(hook_w - g.numel())])
        out[loc] = m
    return out


@dataclass
class PruneResult:
    order: list[tuple[str, int]]  # every node, most important first
    curve: list[tuple[int, float, int]]  # (step, corrected task loss, kept nodes)


def train_gates(model, docs: torch.Tensor, means: dict[str, torch.Tensor], cfg: PruneConfig, progress=None) -> PruneResult:
    """Run the gate optimisation on task docs; returns the node ranking and the curve."""
    config = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    locs = node_locations(config)
    gates = {loc: torch.full((location_width(config, loc),), cfg.init_logit, requires_grad=True) for loc in locs}
    opt = torch.optim.Adam(gates.values(), lr=cfg.lr)
    frozen = frozen_norm_scales(model, docs)
    off_step = {loc: torch.full_like(g, -1.0).detach() for loc, g in gates.items()}
    prev_on = {loc: (g > 0).detach() for loc, g in gates.items()}
    curve = []
    for step in range(cfg.steps):
        lam = cfg.lambda_start * (cfg.lambda_end / cfg.lambda_start) ** (step / max(1, cfg.steps - 1))
        masks = _full_masks(config, gates, cfg.temperature)
        loss = task_loss(masked_forward(model, docs, masks, means, frozen), docs) / cfg.loss_factor
        kept = sum(heaviside_ste(g, cfg.temperature).sum() for g in gates.values())
        opt.zero_grad(set_to_none=True)
        (loss + lam * kept).backward()
        opt.step()
        with torch.no_grad():
            for loc, g in gates.items():
                g.clamp_(-1.0, 1.0)
                on = g > 0
                off_step[loc][prev_on[loc] & ~on] = step
                prev_on[loc] = on
        if step % cfg.curve_every == 0 or step == cfg.steps - 1:
            curve.append((step, loss.item(), int(kept.item())))
            if progress and step % (cfg.curve_every * 10) == 0:
                progress(f"  step {step}: task loss {loss.item():.3f}, kept {int(kept.item())}")
    # rank: still on at the end (by logit), then by the last step they switched off (later first)
    keys = []
    for loc, g in gates.items():
        g = g.detach()
        for c in range(g.numel()):
            alive = bool(g[c] > 0)
            keys.append((0 if alive else 1, -float(off_step[loc][c]) if not alive else -float(g[c]), -float(g[c]), loc, c))
    keys.sort(key=lambda t: (t[0], t[1], t[2]))
    return PruneResult([(k[3], k[4]) for k in keys], curve)


def circuit_from_order(order: list[tuple[str, int]], k: int, locs: list[str]) -> dict[str, torch.Tensor]:
    """The top-k nodes as circuit_data: {location: sorted LongTensor} for every location."""
    chosen: dict[str, list[int]] = {loc: [] for loc in locs}
    for loc, c in order[:k]:
        chosen[loc].append(c)
    return {loc: torch.tensor(sorted(cs), dtype=torch.int64) for loc, cs in chosen.items()}


@torch.no_grad()
def raw_circuit_loss(model, docs, circuit, means, frozen) -> float:
    from inference.circuit import circuit_masks

    return task_loss(masked_forward(model, docs, circuit_masks(model.config, circuit), means, frozen), docs).item()


@torch.no_grad()
def find_k_optim(model, docs, order, means, cfg: PruneConfig) -> tuple[int, bool]:
    """Smallest k (grid + bisection) whose top-k circuit reaches the target on `docs`, and True.

    When no k up to `k_optim_max` reaches it: the grid's k with the lowest circuit loss, and
    False. (Not the whole model: the best circuit found is what a researcher wants to look at,
    and writing a viz_data of every node costs minutes of per-node ablations and snippets.)"""
    locs = node_locations(model.config)
    frozen = frozen_norm_scales(model, docs)
    target = cfg.target_loss * cfg.loss_factor
    n = min(len(order), cfg.k_optim_max)

    tried: dict[int, float] = {}

    def ok(k: int) -> bool:
        tried[k] = raw_circuit_loss(model, docs, circuit_from_order(order, k, locs), means, frozen)
        return tried[k] <= target

    grid = sorted({max(1, int(round(2 ** (e / 2)))) for e in range(0, int(2 * math.log2(n)) + 1)} | {n})
    prev = 0
    for k in grid:
        if ok(k):
            lo, hi = prev, k  # ok(hi); bisect for the smallest passing k above lo
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ok(mid):
                    hi = mid
                else:
                    lo = mid
            return hi, True
        prev = k
    return min(tried, key=lambda k: (tried[k], k)), False
