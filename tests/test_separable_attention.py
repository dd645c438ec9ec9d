"""`inference.separable_attention.SeparableHeads` (the circuit model's O(T) attention for heads
whose circuit q and k channels share no dimension) against the general `sink_attention` over the
heads' full q, k and v: the fills everywhere, the circuit's values on its channels."""

import pytest
import torch

from inference import separable_attention as SA
from inference.fast import sink_attention

H, DH, DOCS, T = 5, 4, 3, 30
# head 0: q only; 1: k only; 2: q and k on different dimensions; 3: v only (not a q/k head);
# 4: q and k sharing a dimension (not separable: flash's)
Q_CH = torch.tensor([1, 2, 8, 17])
K_CH = torch.tensor([6, 11, 17])
V_CH = torch.tensor([0, 3, 5, 9, 10, 13, 18])
SEP = torch.tensor([0, 1, 2])


def case(ablations=2, spread=1.0, seed=0):
    """Fills, circuit values (ablations, docs * T, channels), and the full tensors they make."""
    g = torch.Generator().manual_seed(seed)
    fills = [torch.randn(H * DH, generator=g) for _ in "qkv"]
    vals = [spread * torch.randn(ablations, DOCS * T, len(ch), generator=g) for ch in (Q_CH, K_CH, V_CH)]
    vals[2] = vals[2] / spread
    full = []
    for fill, ch, x in zip(fills, (Q_CH, K_CH, V_CH), vals, strict=True):
        t = fill.expand(ablations, DOCS * T, -1).clone()
        t[..., ch] = x
        full.append(t.view(ablations * DOCS, T, H, DH).transpose(1, 2))  # (A * docs, H, T, dh)
    return fills, vals, full, torch.randn(H, generator=g)


def reference(full, sink, ablations):
    """sink_attention of the separable heads, in float64, as (A, docs * T, |SEP| * dh)."""
    q, k, v = (t[:, SEP].double() for t in full)
    y = sink_attention(q, k, v, None if sink is None else sink[SEP].double())
    return y.transpose(1, 2).reshape(ablations, DOCS * T, len(SEP) * DH)


@pytest.mark.parametrize("with_sink", [True, False], ids=["sink", "no_sink"])
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_separable_heads_equal_sink_attention(with_sink, compiled, monkeypatch):
    monkeypatch.setattr(SA, "ENABLED", compiled)
    fills, vals, full, sink = case()
    sink = sink if with_sink else None
    heads = SA.SeparableHeads(SEP, Q_CH, K_CH, V_CH, *fills, sink, DH)
    got = heads.run(*vals, T)
    assert got.dtype == torch.float32 and got.shape == (2, DOCS * T, len(SEP) * DH)
    assert (got.double() - reference(full, sink, 2)).abs().max() < 2e-6
    # the query's own term matters only against the sink: without one, other q values change nothing
    other = heads.run(vals[0] + 1, *vals[1:], T)
    assert ((other - got).abs().max() > 1e-3) == with_sink


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_shared_values_rows_and_a_strided_output(compiled, monkeypatch):
    """Values with a leading size of 1 serve every ablation; `rows` gives those rows only, written
    into a strided slice of a wider output, as the circuit model passes them."""
    monkeypatch.setattr(SA, "ENABLED", compiled)
    fills, vals, full, sink = case(ablations=3)
    heads = SA.SeparableHeads(SEP, Q_CH, K_CH, V_CH, *fills, sink, DH)
    vals[1] = vals[1][:1]  # k shared by the three ablations
    want = heads.run(vals[0], vals[1].expand(3, -1, -1).clone(), vals[2], T)
    rows = torch.tensor([T - 1, T + 4, 2 * T + 17])
    wide = torch.zeros(3, len(rows), len(SEP) * DH + 5)
    heads.run(*vals, T, rows, out=wide[..., 2 : 2 + len(SEP) * DH])
    assert torch.allclose(wide[..., 2 : 2 + len(SEP) * DH], want[:, rows], atol=1e-6)
    assert not wide[..., :2].any() and not wide[..., -3:].any()  # nothing written outside the slice


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_key_weights_far_apart(compiled, monkeypatch):
    """Scores thousands apart: the kernel's running maximum rescales its sums, the torch formula is
    in log space; a single shift by the largest weight would underflow to 0 / 0."""
    monkeypatch.setattr(SA, "ENABLED", compiled)
    fills, vals, full, sink = case(spread=3000.0)
    heads = SA.SeparableHeads(SEP, Q_CH, K_CH, V_CH, *fills, sink, DH)
    want = reference(full, sink, 2)
    got = heads.run(*vals, T)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() < 1e-5


def test_separable_attention_compiles_where_numba_is_installed():
    pytest.importorskip("numba")
    assert SA.kernel() is not None
