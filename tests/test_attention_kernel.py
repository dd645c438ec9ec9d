"""The compiled sink attention (`inference.attention_kernel`) and torch's path it falls back to, both
against a float64 softmax written out here: shapes across its tiles and query blocks, head
dimensions below 16, strided inputs and outputs, scores whose maximum moves from tile to tile, the
sink, and when it is used (its build: test_native.py)."""

import math
import shutil
from pathlib import Path

import pytest
import torch

import inference.attention_kernel as ak
from inference.fast import abs_topk_exact, sink_attention


def _has_avx512() -> bool:
    try:
        return " avx512f " in Path("/proc/cpuinfo").read_text().replace("\n", " ") + " "
    except OSError:
        return False


# Where the kernel can be built it must be: a broken build would otherwise pass as "skipped".
CAN_BUILD = _has_avx512() and any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def reference(q, k, v, sink):
    """Causal softmax attention in float64, the sink as an extra key of value zero."""
    q, k, v = (t.double() for t in (q, k, v))
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    if sink is None:
        return torch.softmax(s, -1) @ v
    sink_col = sink.double().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([sink_col, s], -1), -1)[..., 1:] @ v


def heads(x: torch.Tensor, B: int, T: int, H: int, D: int) -> torch.Tensor:
    """(B, T, H*D) rows as (B, H, T, D) heads: a strided view, as the model makes them."""
    return x.view(B, T, H, D).transpose(1, 2)


def qkv(B, T, H, D, gen, drift=0.0):
    """q, k, v after AbsTopK (~3/4 zeros, some query rows all zero), as strided views. `drift`: keys
    gain a component growing with their position, so later tiles hold larger scores."""
    x = torch.randn(3, B, T, H * D, generator=gen) * 2
    x = torch.stack([abs_topk_exact(t, 0.25) for t in x])
    x[0, :, ::7] = 0.0  # queries with no nonzero dimension
    if drift:
        x[1, :, :, ::D] += drift * torch.arange(T, dtype=torch.float32).view(1, T, 1)
        x[0, :, :, ::D] = x[0, :, :, ::D].abs() + 1.0
    return tuple(heads(t, B, T, H, D) for t in x)


def needs_kernel():
    if not CAN_BUILD:
        pytest.skip("no AVX-512 CPU or no C compiler: the compiled kernel cannot exist here")
    assert ak.kernel() is not None, "AVX-512 and a C compiler are here, yet the kernel did not build"


SHAPES = [  # (B, T, H, D): one token; < 16 keys; across 32-query groups; across 128-key tiles; D < 16
    (2, 1, 3, 16),
    (1, 13, 2, 16),
    (2, 70, 3, 16),
    (1, 300, 2, 16),
    (2, 33, 2, 5),
    (1, 290, 1, 8),
]


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("with_sink", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_sink_attention_equals_the_float64_softmax(shape, with_sink, compiled, monkeypatch):
    if compiled:
        needs_kernel()
    monkeypatch.setattr(ak, "ENABLED", compiled)
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(T * 31 + D)
    q, k, v = qkv(B, T, H, D, gen, drift=0.05)
    sink = torch.randn(H, generator=gen) * 3 if with_sink else None
    calls = []
    real_kernel = ak.kernel
    monkeypatch.setattr(ak, "kernel", lambda: calls.append(1) or real_kernel())
    with torch.no_grad():
        got = sink_attention(q, k, v, sink)
    assert bool(calls) == compiled  # the path under test is the one that ran
    want = reference(q, k, v, sink)
    assert got.shape == (B, H, T, D) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


@pytest.mark.parametrize("with_sink", [True, False])
def test_kernel_keeps_the_softmax_exact_when_the_maximum_moves_between_tiles(with_sink):
    """Scores rise by thousands at key 256, a tile boundary (the running maximum and
    the rescale of what came before matter), and some rows' scores are all far below the sink."""
    needs_kernel()
    B, T, H, D = 1, 300, 2, 16
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(B, T, H, D, gen)
    q, k = q.contiguous(), k.contiguous()
    q[..., 0] = 40.0
    k[..., 0] = torch.where(torch.arange(T) < 256, -5.0, 3.0).view(1, 1, T) + 0.01 * torch.randn(T, generator=gen)
    q[0, 1, :50, :] = 0.0
    q[0, 1, :50, 1] = -100.0  # with k's dim 1 positive below, these scores sit far under the sink
    k[0, 1, :, 1] = k[0, 1, :, 1].abs() + 1.0
    sink = torch.tensor([0.5, 2.0]) if with_sink else None
    with torch.no_grad():
        got = ak.attention(q, k, v, sink)
    assert got is not None
    want = reference(q, k, v, sink)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_kernel_propagates_a_nan_only_to_the_queries_that_see_it():
    """A NaN in one key (a corrupt activation) makes exactly the outputs of the queries at and after
    it NaN, as the float64 softmax does; the queries before it are untouched."""
    needs_kernel()
    B, T, H, D = 1, 40, 2, 16
    gen = torch.Generator().manual_seed(12)
    q, k, v = (t.contiguous() for t in qkv(B, T, H, D, gen))
    q[0, 0] = torch.randn(T, D, generator=gen)  # head 0: every query has nonzero dimensions
    k[0, 0, 23, :] = float("nan")
    sink = torch.randn(H, generator=gen)
    with torch.no_grad():
        got = ak.attention(q, k, v, sink)
    want = reference(q, k, v, sink)
    assert torch.equal(got.isnan(), want.isnan()) and bool(got[0, 0, 23:].isnan().all())
    assert not got[0, 0, :23].isnan().any() and not got[0, 1].isnan().any()
    ok = ~want.isnan()
    torch.testing.assert_close(got.double()[ok], want[ok], rtol=2e-5, atol=2e-5 * want[ok].abs().max().item())


def test_kernel_skips_the_dimensions_where_a_key_is_zero():
    """As the kernel's comment says: a NaN in a query at a dimension where every key is 0 does not
    reach any score (torch's product gives 0 * NaN = NaN); the output is the one with that entry 0."""
    needs_kernel()
    B, T, H, D = 1, 40, 2, 16
    gen = torch.Generator().manual_seed(14)
    q, k, v = (t.contiguous() for t in qkv(B, T, H, D, gen))
    k[..., 0] = 0.0
    q[0, :, 10, 0] = 1.5
    sink = torch.randn(H, generator=gen)
    want = reference(q, k, v, sink)
    q[0, :, 10, 0] = float("nan")
    with torch.no_grad():
        got = ak.attention(q, k, v, sink)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_kernel_propagates_a_nan_value_to_the_queries_that_see_it_and_its_own_pass():
    """A NaN in one value (key 50, dimension 3): every query from 50 on has a NaN there and nowhere
    else; the queries of the earlier 32-query passes (0-31) are untouched; those of its own pass
    before it (32-49) may be NaN in that dimension (weight 0 x NaN, as the kernel's comment says;
    torch's product gives it to every query)."""
    needs_kernel()
    B, T, H, D = 1, 80, 1, 16
    gen = torch.Generator().manual_seed(15)
    q, k, v = (t.contiguous() for t in qkv(B, T, H, D, gen))
    sink = torch.randn(H, generator=gen)
    want = reference(q, k, v, sink)
    v[0, 0, 50, 3] = float("nan")
    with torch.no_grad():
        got = ak.attention(q, k, v, sink)[0, 0]
    assert bool(got[50:, 3].isnan().all()) and not got[:, [d for d in range(D) if d != 3]].isnan().any()
    assert not got[:32].isnan().any()
    ok = ~got.isnan()
    torch.testing.assert_close(got.double()[ok], want[0, 0][ok], rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_kernel_gives_the_keys_a_query_must_not_see_no_weight_at_all():
    """A huge value at key 29 (in the block of keys 16-31, which queries 0-28 share a pass with but
    must not see): the causal mask's weights are exactly zero, so the queries before it are as if it
    were not there (a weight of 2^-125 in its place would add ~0.02 to them)."""
    needs_kernel()
    B, T, H, D = 1, 40, 2, 16
    gen = torch.Generator().manual_seed(13)
    q, k, v = (t.contiguous() for t in qkv(B, T, H, D, gen))
    v[0, :, 29, 5] = 1e36
    sink = torch.randn(H, generator=gen)
    with torch.no_grad():
        got = ak.attention(q, k, v, sink)
    want = reference(q, k, v, sink)
    before, after = (slice(None, 29), slice(29, None))
    torch.testing.assert_close(got.double()[:, :, before], want[:, :, before], rtol=2e-5, atol=2e-5 * 8)
    torch.testing.assert_close(got.double()[:, :, after], want[:, :, after], rtol=2e-5, atol=2e-5 * 1e36)


def test_kernel_writes_a_strided_out_and_returns_heads_over_token_rows():
    needs_kernel()
    B, T, H, D = 2, 40, 3, 16
    gen = torch.Generator().manual_seed(8)
    q, k, v = qkv(B, T, H, D, gen)
    sink = torch.randn(H, generator=gen)
    with torch.no_grad():
        free = ak.attention(q, k, v, sink)
        # (B, H, T, D) over (B, T, H, D) memory: the caller's transpose back to rows is a view
        assert free.transpose(1, 2).is_contiguous()
        wide = torch.full((B, T, H * D + 3), 7.0)
        into = ak.attention(q, k, v, sink, out=wide[..., : H * D].view(B, T, H, D).transpose(1, 2))
    assert into.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[..., : H * D].view(B, T, H, D).transpose(1, 2), free)
    assert torch.equal(wide[..., H * D :], torch.full((B, T, 3), 7.0))  # the rest untouched
    with pytest.raises(ValueError, match="out must be"):
        ak.attention(q, k, v, sink, out=torch.empty(B, H, T, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="one logit per head"):
        ak.attention(q, k, v, sink[:2])


@pytest.mark.parametrize("shape", [(4, 37, 5, 16), (1, 50, 80, 12)])
def test_kernel_prepares_heads_in_groups_across_sequences(shape):
    """The kernel prepares up to four heads at a time from one call's range of heads: ranges that
    start mid-sequence, cross into the next sequence (5 heads per sequence, 2 per call) or hold more
    heads than a group (80 heads, calls of 5), each head against the float64 softmax."""
    needs_kernel()
    B, T, H, D = shape
    gen = torch.Generator().manual_seed(H)
    q, k, v = qkv(B, T, H, D, gen)
    sink = torch.randn(H, generator=gen)
    calls = []

    def run_parts(fn, parts):
        calls.extend(parts)
        for s in parts:
            fn(s)

    with torch.no_grad():
        got = ak.attention(q, k, v, sink, run_parts=run_parts)
    sizes = {s.stop - s.start for s in calls}
    assert max(sizes) > 4 or any(s.start // H != (s.stop - 1) // H for s in calls)  # the cases named above
    want = reference(q, k, v, sink)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * want.abs().max().item())


def test_kernel_used_in_no_grad_with_a_parameter_sink_and_not_under_autograd():
    """The model's sink is a parameter (requires_grad) even under no_grad: the kernel must still run
    there; with autograd on, torch's path runs and gradients reach q, k, v and the sink."""
    needs_kernel()
    B, T, H, D = 1, 20, 2, 16
    gen = torch.Generator().manual_seed(9)
    q, k, v = (t.contiguous() for t in qkv(B, T, H, D, gen))
    sink = torch.nn.Parameter(torch.randn(H, generator=gen))
    with torch.no_grad():
        assert ak.attention(q, k, v, sink) is not None
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    assert ak.attention(qg, kg, vg, sink) is None
    out = sink_attention(qg, kg, vg, sink)
    out.square().sum().backward()
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_sink = sink.detach().double().requires_grad_(True)
    reference(*ref_in, ref_sink).square().sum().backward()
    for got, want in zip((qg, kg, vg, sink), (*ref_in, ref_sink), strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5 * want.grad.abs().max().item())


def test_kernel_exponential_is_within_a_few_ulp():
    """The kernel's 2^x (its scores are in units of log2) over the range softmax uses, against
    float64: within 1 ulp (relative 1.2e-7) down to 2^-125; below, 2^-125 (a weight that vanishes
    beside the maximum's 1); -inf clamped the same way (the kernel zeroes masked lanes); NaN stays NaN."""
    needs_kernel()
    lib = ak.library()
    x = torch.cat([torch.linspace(-125.0, 0.0, 400_001), torch.tensor([-1e-30, -0.5, -0.25, 0.5, 1e-3, 5.0, 20.0])])
    x = torch.cat([x, x[:1000] + 0.4999, -torch.rand(10_000, generator=torch.Generator().manual_seed(3)) * 30])
    y = torch.empty_like(x)
    lib.exp2_f32(x.data_ptr(), y.data_ptr(), x.numel())
    want = torch.exp2(x.double())
    assert ((y.double() - want).abs() / want).max().item() < 1.2e-7
    low = torch.tensor([-125.5, -126.0, -200.0, -1e4, float("-inf"), float("nan")])
    y = torch.empty_like(low)
    lib.exp2_f32(low.data_ptr(), y.data_ptr(), low.numel())
    assert (y[:5] == 2.0**-125).all() and y[5].isnan()


def test_kernel_does_not_apply_beyond_16_dimensions_or_float32_cpu():
    x = torch.zeros(1, 2, 5, 32)
    assert not ak.applies(x, x, x)
    y = torch.zeros(1, 2, 5, 16, dtype=torch.float64)
    assert not ak.applies(y, y, y)
    z = torch.zeros(1, 2, 16, 5).transpose(-1, -2)  # last stride not 1
    assert not ak.applies(z, z, z)
    w = torch.zeros(1, 1, 1, 16).expand(1, 1, ak.MAX_TOKENS + 1, 16)  # beyond the kernel's int32 offsets
    assert not ak.applies(w, w, w) and ak.applies(w[:, :, :5], w[:, :, :5], w[:, :, :5])
    assert ak.attention(x, x, x, None) is None
