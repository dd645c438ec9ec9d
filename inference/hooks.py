"""Named hook points: one way to record, one way to intervene.

The model calls `hook(name, tensor)` at every hook point (names in
`shared/spec/checkpoint-format.md`, e.g. `0.attn.q`, `3.mlp.post_act`, `final_resid`).
What happens there is decided by the context managers active in the *calling* context:

    with record(r"\\d+\\.mlp\\.post_act") as rec:       # capture tensors by name regex
        model(idx)
    rec["0.mlp.post_act"]                              # (B, T, d_mlp)

    with intervene({"0.mlp.post_act": lambda t: t * mask}):   # replace a tensor
        model(idx)

The active hooks live in a `contextvars.ContextVar`, not on the model or in a module
global: each thread (and each asyncio task) has its own, so two threads can run forward
passes on the same model at once with different recorders. Contexts nest: every active
intervention applies (outermost first), then every active recorder sees the final value,
i.e. what flows on through the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

Intervention = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Hooks:
    interventions: tuple[tuple[re.Pattern[str], Intervention], ...] = ()
    recorders: tuple[tuple[re.Pattern[str], dict[str, torch.Tensor], bool], ...] = ()


_ACTIVE: ContextVar[_Hooks] = ContextVar("circuits_inference_hooks", default=_Hooks())  # noqa: B039 (frozen, never mutated)


def hook(name: str, t: torch.Tensor) -> torch.Tensor:
    """Called by the model at each hook point; returns the (possibly replaced) tensor."""
    active = _ACTIVE.get()
    if not active.interventions and not active.recorders:
        return t
    for rx, fn in active.interventions:
        if rx.fullmatch(name):
            out = fn(t)
            if out.shape != t.shape:
                raise ValueError(f"intervention at {name!r} changed the shape from {tuple(t.shape)} to {tuple(out.shape)}")
            t = out
    for rx, store, detach in active.recorders:
        if rx.fullmatch(name):
            store[name] = t.detach() if detach else t
    return t


def hooks_active() -> bool:
    """True when any recorder or intervention is active in this context (lets fast paths bail out)."""
    active = _ACTIVE.get()
    return bool(active.interventions or active.recorders)


def interventions_active() -> bool:
    """True when any intervention is active in this context."""
    return bool(_ACTIVE.get().interventions)


def recorded(name: str) -> bool:
    """True when an active recorder would capture hook point `name` (lets fast paths that compute
    a tensor piecewise assemble it only when it is asked for)."""
    return any(rx.fullmatch(name) for rx, _, _ in _ACTIVE.get().recorders)


@contextmanager
def record(pattern: str = r".*", *, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record every hook point whose full name matches `pattern` into the yielded dict.

    `detach=False` keeps the autograd graph (for gradients through recorded values).
    """
    rx = re.compile(pattern)
    store: dict[str, torch.Tensor] = {}
    active = _ACTIVE.get()
    token = _ACTIVE.set(_Hooks(active.interventions, active.recorders + ((rx, store, detach),)))
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


@contextmanager
def intervene(fns: Mapping[str, Intervention], *, regex: bool = False) -> Iterator[None]:
    """Replace the tensor at each named hook point by `fn(tensor)` (same shape).

    Keys are exact hook names, or full-match regexes with `regex=True`.
    """
    compiled = tuple((re.compile(k if regex else re.escape(k)), fn) for k, fn in fns.items())
    active = _ACTIVE.get()
    token = _ACTIVE.set(_Hooks(active.interventions + compiled, active.recorders))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
