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

An intervention that acts on each token on its own may say how to apply it to some of the
tokens (a method `at_rows(t, rows)`, as `inference.circuit.masked_forward`'s masks have): the
fast forward (`inference.fast.FastBlock`), which computes most hook points in chunks of tokens,
then keeps its fused path (`row_interventions`); any other intervention sends the layer it
touches to the plain path, with the same result.

A name or pattern that matches no hook point of the model is an error, not an empty result:
the model calls `check_names(its hook names)` at the end of every forward with hooks active,
which raises `HookNameError` listing the closest real names (a typo such as `0.mlp.postact`
would otherwise record nothing, or leave the logits silently unchanged).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import torch

Intervention = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Hooks:
    # (regex, fn, the key as the caller wrote it): the key is what an error names
    interventions: tuple[tuple[re.Pattern[str], Intervention, str], ...] = ()
    # (regex, a dict to store into or a callable `into(name, tensor)`, detach)
    recorders: tuple[tuple[re.Pattern[str], dict[str, torch.Tensor] | Callable[[str, torch.Tensor], None], bool], ...] = ()


_ACTIVE: ContextVar[_Hooks] = ContextVar("circuits_inference_hooks", default=_Hooks())  # noqa: B039 (frozen, never mutated)


def hook(name: str, t: torch.Tensor) -> torch.Tensor:
    """Called by the model at each hook point; returns the (possibly replaced) tensor."""
    active = _ACTIVE.get()
    if not active.interventions and not active.recorders:
        return t
    for rx, fn, _ in active.interventions:
        if rx.fullmatch(name):
            t = _same_shape(name, t, fn(t))
    deliver(name, t)
    return t


def _same_shape(name: str, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An intervention's output `out` for `t` at hook point `name`, refused if it changed the shape."""
    if out.shape != t.shape:
        raise ValueError(f"intervention at {name!r} changed the shape from {tuple(t.shape)} to {tuple(out.shape)}")
    return out


def deliver(name: str, t: torch.Tensor) -> None:
    """Hand hook point `name`'s final value to the active recorders only (its interventions were
    applied piece by piece: `row_interventions`)."""
    for rx, store, detach in _ACTIVE.get().recorders:
        if rx.fullmatch(name):
            value = t.detach() if detach else t
            if callable(store):
                store(name, value)
            else:
                store[name] = value


def row_interventions(names: list[str]) -> Callable[[str, torch.Tensor, slice], torch.Tensor] | None:
    """For a fast path that computes hook points `names` piece by piece (chunks of tokens, maybe
    on worker threads, which do not see this context): `apply(name, t, rows)`, the interventions
    active here at `name` applied to `t`, the tokens `rows` of the tensor flattened to (B * T,
    width) (possibly a strided view); the recorders are the caller's (`deliver` the assembled
    tensor). None when an intervention at one of `names` is not row-local: it acts on each token
    on its own and says how on some of them, with a method `at_rows(t, rows)` equal to the call
    on the whole tensor restricted to those tokens."""
    active = [(rx, fn) for rx, fn, _ in _ACTIVE.get().interventions if any(rx.fullmatch(n) for n in names)]
    if not all(hasattr(fn, "at_rows") for _, fn in active):
        return None

    def apply(name: str, t: torch.Tensor, rows: slice) -> torch.Tensor:
        for rx, fn in active:
            if rx.fullmatch(name):
                t = _same_shape(name, t, fn.at_rows(t, rows))
        return t

    return apply


def hooks_active() -> bool:
    """True when any recorder or intervention is active in this context (lets fast paths bail out)."""
    active = _ACTIVE.get()
    return bool(active.interventions or active.recorders)


def recorded(name: str) -> bool:
    """True when an active recorder would capture hook point `name` (lets fast paths that compute
    a tensor piecewise assemble it only when it is asked for)."""
    return any(rx.fullmatch(name) for rx, _, _ in _ACTIVE.get().recorders)


class HookNameError(KeyError):
    """A recorder pattern or intervention key that matches no hook point of the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@lru_cache(maxsize=1024)
def _matches_any(rx: re.Pattern[str], names: tuple[str, ...]) -> bool:
    return any(rx.fullmatch(n) for n in names)


def check_names(names: tuple[str, ...]) -> None:
    """Raise `HookNameError` if an active recorder pattern or intervention key matches none of
    `names` (the hook points of the model being run). Cached per (pattern, names): one lookup
    per active hook and forward."""
    active = _ACTIVE.get()
    wanted = [(rx, key, "intervention") for rx, _, key in active.interventions]
    wanted += [(rx, rx.pattern, "record pattern") for rx, _, _ in active.recorders]
    for rx, key, what in wanted:
        if not _matches_any(rx, names):
            close = difflib.get_close_matches(key, names, n=5, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else f"; hook points look like {names[0]!r}, {names[-1]!r}"
            raise HookNameError(f"{what} {key!r} matches no hook point of the model{hint}")


@contextmanager
def record(
    pattern: str = r".*", *, detach: bool = True, into: Callable[[str, torch.Tensor], None] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Record every hook point whose full name matches `pattern` into the yielded dict.

    `detach=False` keeps the autograd graph (for gradients through recorded values).
    `into(name, tensor)`: called at each matching hook point instead of keeping the tensor (the
    yielded dict stays empty), so a caller can keep only what it needs, e.g. a few channels, and
    let the whole tensor go (recompute at release scale: whole hook tensors would not fit).
    """
    rx = re.compile(pattern)
    store: dict[str, torch.Tensor] | Callable[[str, torch.Tensor], None] = {} if into is None else into
    active = _ACTIVE.get()
    token = _ACTIVE.set(_Hooks(active.interventions, active.recorders + ((rx, store, detach),)))
    try:
        yield store if into is None else {}
    finally:
        _ACTIVE.reset(token)


@contextmanager
def intervene(fns: Mapping[str, Intervention], *, regex: bool = False) -> Iterator[None]:
    """Replace the tensor at each named hook point by `fn(tensor)` (same shape).

    Keys are exact hook names, or full-match regexes with `regex=True`.
    """
    compiled = tuple((re.compile(k if regex else re.escape(k)), fn, k) for k, fn in fns.items())
    active = _ACTIVE.get()
    token = _ACTIVE.set(_Hooks(active.interventions + compiled, active.recorders))
    try:
        yield
    finally:
        _ACTIVE.reset(token)
