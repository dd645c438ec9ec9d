"""`inference.separable_attention` (the circuit model's O(T) attention for heads whose q and k vary
on disjoint dimensions) against the general `sink_attention` on the same inputs."""

import pytest
import torch

from inference import separable_attention as SA
from inference.fast import sink_attention


def separable_case(n=3, heads=4, T=40, dh=8, spread=2.0, seed=0):
    """q varies from its reference row on dims 0-2, k on dims 3-5; the other dims hold the references."""
    g = torch.Generator().manual_seed(seed)
    qref, kref = torch.randn(heads, dh, generator=g), torch.randn(heads, dh, generator=g)
    q = qref[:, None].expand(n, heads, T, dh).clone()
    k = kref[:, None].expand(n, heads, T, dh).clone()
    q[..., 0:3] += spread * torch.randn(n, heads, T, 3, generator=g)
    k[..., 3:6] += spread * torch.randn(n, heads, T, 3, generator=g)
    v = torch.randn(n, heads, T, dh, generator=g)
    return q, k, v, qref, kref, torch.randn(heads, generator=g)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_separable_heads_equal_sink_attention(with_sink, compiled, monkeypatch):
    monkeypatch.setattr(SA, "ENABLED", compiled)
    q, k, v, qref, kref, sink = separable_case()
    sink = sink if with_sink else None
    want = sink_attention(q.double(), k.double(), v.double(), None if sink is None else sink.double())
    got = SA.separable_attention(q, k, v, sink, qref, kref)
    assert got.dtype == torch.float32
    assert (got.double() - want).abs().max() < 2e-6
    # the query's own term matters only against the sink: without one, any q gives the same output
    other = SA.separable_attention(q + torch.randn_like(q), k, v, sink, qref, kref)
    assert ((other - got).abs().max() > 1e-3) == with_sink


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_separable_attention_into_a_strided_output_and_from_strided_inputs(compiled, monkeypatch):
    """The circuit model passes (docs, heads, T, d) views of (docs, T, heads, d) memory."""
    monkeypatch.setattr(SA, "ENABLED", compiled)
    q, k, v, qref, kref, sink = separable_case()
    want = sink_attention(q, k, v, sink)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
    got = SA.separable_attention(*strided, sink, qref, kref, out=out)
    assert got.data_ptr() == out.data_ptr() and not out.is_contiguous()
    assert (out - want).abs().max() < 2e-6


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_separable_attention_with_key_weights_far_apart(compiled, monkeypatch):
    """Scores ~1,000 apart (e.g. a late key far above the early ones): the kernel's running maximum
    rescales its sums, the torch formula hands such sequences to sink_attention; both stay finite
    and exact where a single shift by the largest weight would underflow to 0 / 0."""
    monkeypatch.setattr(SA, "ENABLED", compiled)
    q, k, v, qref, kref, sink = separable_case(spread=400.0)
    want = sink_attention(q.double(), k.double(), v.double(), sink.double())
    got = SA.separable_attention(q, k, v, sink, qref, kref)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 1e-5


def test_separable_attention_compiles_where_numba_is_installed():
    pytest.importorskip("numba")
    assert SA.kernel() is not None
