"""A sparse linear, its activation and its AbsTopK in one pass of the C kernel
(`inference.topk_columns.linear_topk_rows`, `select_kernel.c`'s linear_select_rows_f32), checked
against float64 computations; its GELU against float64 erfc; its flagged rows redone as the plain
path chooses among ties (`inference.fast._linear_abs_topk`)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fast import needs_native_select

import inference.fast as fast_module
from inference import topk_columns, topk_select
from inference.fast import SparseLinear
from inference.model import abs_topk


def sparse_linear(in_f: int, out_f: int, bias: bool, density: float, gen: torch.Generator) -> SparseLinear:
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) * (torch.rand(out_f, in_f, generator=gen) < density))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=gen) * 0.3)
    lin.__class__ = SparseLinear
    lin.max_density = 1.0  # always compressed
    return lin


def reference(lin: torch.nn.Linear, x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """activation(x W^T + b) in float64."""
    b = None if lin.bias is None else lin.bias.detach().double()
    y = F.linear(x.double(), lin.weight.detach().double(), b)
    if activation == "gelu":
        return 0.5 * y * torch.special.erfc(-y / math.sqrt(2))
    return y.relu() if activation == "relu" else y


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("parts, bias", [(1, True), (3, True), (3, False)])
def test_linear_topk_rows_equals_float64_reference(activation, parts, bias):
    """Each row's kept features are the float64 linear's top k by |value| (k of each part), with
    values within float rounding of it; everything else is +0.0; rows outside row0 .. row0 + n are
    not touched. n = 37 rows leave a partial tile of 16; 40 input features and parts of 44 (3 x 16
    minus 4) leave partial blocks; x is a strided view (rows of a wider tensor)."""
    needs_native_select()
    gen = torch.Generator().manual_seed(3)
    n, in_f, w = 37, 40, 44
    lin = sparse_linear(in_f, parts * w, bias, 0.3, gen)
    wide = torch.randn(n, in_f + 9, generator=gen)
    x = wide[:, 3 : 3 + in_f]  # row stride 49
    x = x * (torch.rand(n, in_f, generator=gen) < 0.5)  # AbsTopK-like inputs: many exact zeros
    x = wide[:, 3 : 3 + in_f].copy_(x)
    fracs = [0.25, 0.5, None][:parts] if parts == 3 else [0.25]
    out = torch.full((parts, n + 5, w), 7.0)
    with torch.no_grad():
        redo = topk_columns.linear_topk_rows(lin, x, fracs, out, 2, activation)
    assert redo is not None and not redo.any()  # random values: no ties, no NaN
    want = reference(lin, x, activation)
    for s, frac in enumerate(fracs):
        got, ref = out[s, 2 : n + 2], want[:, s * w : (s + 1) * w]
        k = w if frac is None else int(frac * w)
        keep = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ref.abs().topk(k, dim=1).indices, True)
        assert torch.equal(got != 0, keep & (ref != 0)), (s, "kept features")
        torch.testing.assert_close(got.double(), torch.where(keep, ref, 0.0), rtol=2e-6, atol=1e-6)
    assert torch.equal(out[:, :2], torch.full((parts, 2, w), 7.0))
    assert torch.equal(out[:, n + 2 :], torch.full((parts, 3, w), 7.0))


def test_linear_topk_flags_ties_and_nans_and_the_block_redoes_them_as_topk():
    """Integer weights and inputs (exact sums in any order) with every output feature duplicated:
    with an odd k, the k-th value ties with its twin in every row with enough nonzeros, and a NaN in
    an input row reaches its outputs. Exactly those rows are flagged; `_linear_abs_topk` redoes them
    with torch, so its output is abs_topk's (torch.topk's choice among ties) bit for bit."""
    needs_native_select()
    gen = torch.Generator().manual_seed(5)
    n, in_f, w = 21, 24, 22  # 11 distinct features, each twice: k = int(0.5 * 22) = 11 is odd
    half = torch.randint(-3, 4, (w // 2, in_f), generator=gen).float()
    lin = sparse_linear(in_f, w, True, 1.0, gen)
    with torch.no_grad():
        lin.weight.copy_(half.repeat_interleave(2, 0))
        lin.bias.copy_(torch.randint(-2, 3, (w // 2,), generator=gen).float().repeat_interleave(2))
    x = torch.randint(-2, 3, (n, in_f), generator=gen).float()
    x[4] = 0.0  # bias only: 11 distinct values, each twice
    x[9, 5] = float("nan")
    with torch.no_grad():
        y = lin(x)
        out = torch.empty(1, n, w)
        redo = topk_columns.linear_topk_rows(lin, x, [0.5], out, 0, "relu")
        a = y.relu().abs().sort(-1, descending=True).values
        expect = ((a[:, 10] == a[:, 11]) & (a[:, 10] > 0)) | y.isnan().any(-1)
        assert expect[9] and expect.sum() >= 10  # the NaN row and many tied rows
        assert torch.equal(torch.from_numpy(redo), expect)
        ok = ~expect
        torch.testing.assert_close(out[0][ok], abs_topk(y.relu(), 0.5)[ok], rtol=0, atol=0)
        block = torch.full((1, n, w), 7.0)
        assert fast_module._linear_abs_topk(lin, x, [0.5], block, 0, "relu")
        torch.testing.assert_close(block[0], abs_topk(y.relu(), 0.5), rtol=0, atol=0, equal_nan=True)


def test_gelu_kernel_against_float64():
    """The kernel's GELU (erfc by Numerical Recipes' erfcc): within 5 ulp of float64 for x >= 0,
    2e-6 relative for -5 < x < 0 and 2e-5 down to -13 (torch's own GELU is 0 there); -0.0 below -14;
    NaN for NaN and +-inf, as torch."""
    needs_native_select()
    lib = topk_select.native_kernels()

    def gelu(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        y = np.empty_like(x)
        lib.gelu_f32(x.ctypes.data, y.ctypes.data, x.size)
        return y

    for lo, hi, bound in [(1e-3, 20.0, None), (-5.0, -1e-3, 2e-6), (-13.0, -5.0, 2e-5)]:
        x = np.linspace(lo, hi, 20001, dtype=np.float32)
        want = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
        err = np.abs(gelu(x) - want)
        if bound is None:
            assert (err / np.spacing(np.abs(want).astype(np.float32))).max() <= 5.0
        else:
            assert (err / np.abs(want)).max() <= bound
    y = gelu(np.float32([-14.5, -200.0, 0.0, np.nan, np.inf, -np.inf]))
    assert np.array_equal(y[:3], [0.0, 0.0, 0.0]) and np.isnan(y[3:]).all()
    t = np.linspace(-4, 4, 1001, dtype=np.float32)
    assert np.abs(gelu(t) - F.gelu(torch.from_numpy(t)).numpy()).max() <= 2e-6  # torch's, to rounding


def test_linear_topk_not_applicable_returns_none(monkeypatch):
    """A dense weight, float64, a gradient to keep, the kernels switched off: None and nothing
    written, so the block runs its torch path."""
    needs_native_select()
    gen = torch.Generator().manual_seed(1)
    lin = sparse_linear(16, 32, True, 0.3, gen)
    x = torch.randn(5, 16, generator=gen)
    out = torch.full((1, 5, 32), 3.0)
    with torch.no_grad():
        assert topk_columns.linear_topk_rows(lin, x.double(), [0.5], out.double(), 0) is None
        lin.max_density = 0.0  # dense: no CSR
        assert topk_columns.linear_topk_rows(lin, x, [0.5], out, 0) is None
        lin.max_density = 1.0
        monkeypatch.setattr(topk_columns, "ENABLED", False)
        assert topk_columns.linear_topk_rows(lin, x, [0.5], out, 0) is None
    monkeypatch.undo()
    assert topk_columns.linear_topk_rows(lin, x, [0.5], out, 0) is None  # grad mode on, weight requires grad
    assert torch.equal(out, torch.full((1, 5, 32), 3.0))
    with torch.no_grad():
        assert topk_columns.linear_topk_rows(lin, x, [0.5], out, 0) is not None


@pytest.mark.parametrize("with_pos", [True, False])
@pytest.mark.parametrize("given_rstd", [False, True])
def test_norm_topk_rows_equals_float64_reference(with_pos, given_rstd):
    """RMSNorm, the position rows appended, AbsTopK, in one C pass (`norm_topk_rows`): the kept
    entries are the float64 computation's top k with its values to float rounding; a given inverse
    scale (a frozen or recorded one) is used as is; a LayerNorm, or float64, is left to torch (None)."""
    from inference.model import Norm

    needs_native_select()
    gen = torch.Generator().manual_seed(11)
    n, d, dp = 19, 40, 6
    norm = Norm(d, rms=True, bias=False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=gen))
    x = torch.randn(n, d + 3, generator=gen)[:, 1 : d + 1]  # strided rows
    pos = torch.randn(n, dp, generator=gen) if with_pos else None
    rstd = torch.rand(n, 1, generator=gen) + 0.5 if given_rstd else None
    m = d + (dp if with_pos else 0)
    out = torch.full((n, m), 9.0)
    with torch.no_grad():
        redo = topk_columns.norm_topk_rows(norm, x, pos, 0.25, out, rstd)
    assert redo is not None and not redo.any()
    xd = x.double()
    r = rstd.double() if given_rstd else torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    want = xd * r * norm.weight.detach().double()
    if with_pos:
        want = torch.cat([want, pos.double()], -1)
    k = int(0.25 * m)
    keep = torch.zeros_like(want, dtype=torch.bool).scatter_(1, want.abs().topk(k, dim=1).indices, True)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out.double(), torch.where(keep, want, 0.0), rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert topk_columns.norm_topk_rows(Norm(d, rms=False, bias=True), x, pos, 0.25, out, rstd) is None
        assert topk_columns.norm_topk_rows(norm, x.double(), None, 0.25, out.double()[:, :d]) is None
