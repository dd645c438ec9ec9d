"""The circuit model over the circuit's nodes only (`CircuitModel`, `fast_ablation_losses`)
against the reference full-size masked forwards of `inference.circuit`, on every model variant."""

import pytest
import torch
from test_fast import sparsify
from test_model import BASE, VARIANTS, tiny_model

from inference import circuit as C
from inference import circuit_model as CM
from inference import kth_pair as KP
from inference import separable_attention as SA
from inference import sparse_rows as SR
from inference.kth_pair import kth_pair
from inference.model import abs_topk

SUPPORTED = {
    name: v for name, v in VARIANTS.items() if name not in ("afrac_resid_post_attn", "afrac_resid_post_mlp", "afrac_all")
}


def make_case(variant: str, density: float = 0.5, node_frac: float = 0.3, seed: int = 0):
    model = sparsify(tiny_model(seed=seed, **VARIANTS[variant]), density, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n_docs, ctx = 6, BASE["block_size"]
    docs = torch.zeros(n_docs, ctx, dtype=torch.long)
    for j in range(n_docs):
        length = int(torch.randint(4, ctx + 1, (1,), generator=gen))
        docs[j, :length] = torch.randint(1, BASE["vocab_size"], (length,), generator=gen)
    pretrain = torch.randint(0, BASE["vocab_size"], (8, ctx), generator=gen)
    means = C.node_means(model, pretrain)
    circuit = {}
    for loc in C.node_locations(model.config):
        width = C.location_width(model.config, loc)
        chosen = torch.randperm(width, generator=gen)[: max(1, int(node_frac * width))]
        circuit[loc] = chosen  # unsorted on purpose: results must follow this order
    return model, docs, circuit, means


@pytest.mark.parametrize("variant", list(SUPPORTED))
def test_circuit_model_logits_equal_masked_forward(variant):
    model, docs, circuit, means = make_case(variant)
    want = C.masked_forward(model, docs, C.circuit_masks(model.config, circuit), means)
    cm = CM.CircuitModel(model, docs, circuit, means)
    got = cm.logits()
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-4 * scale
    full = model(docs)
    assert (full - want).abs().max().item() > 1e-2 * scale  # the circuit model differs from the full one


@pytest.mark.parametrize(
    "variant", ["layernorm_gelu_tied", "rmsnorm_nobias_relu_untied", "release_like", "residual_relu", "cat_pos_emb_learned"]
)
@pytest.mark.parametrize("mode", ["mean", "zero"])
@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_fast_ablation_losses_equal_reference(variant, mode, compiled, monkeypatch):
    """Compiled: the kernels (kth_pair, sparse_rows) with every linear stage taken as sparse, so the
    compiled sparse product runs at each; torch: no kernel, the stages as their density decides."""
    monkeypatch.setattr(KP, "ENABLED", compiled)
    monkeypatch.setattr(SR, "ENABLED", compiled)
    if compiled:
        monkeypatch.setattr(CM, "SPARSE_MAX_DENSITY", 1.0)
    model, docs, circuit, means = make_case(variant, node_frac=0.2)
    want = C.ablation_losses(model, docs, circuit, means, mode)
    cm = CM.CircuitModel(model, docs, circuit, means)
    sparse = [L[n].csr is not None for L in cm.layers for n in ("qkv", "proj", "fc", "mlp_proj")]
    assert all(sparse) if compiled else not any(sparse)
    got = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=7, circuit_model=cm)
    assert set(got) == set(want)
    for loc in want:
        assert got[loc].shape == want[loc].shape
        assert torch.allclose(got[loc], want[loc], atol=1e-4, rtol=1e-4), loc
    spread = torch.cat(list(want.values()))
    assert spread.max() - spread.min() > 3e-4  # ablations changed the loss, differently per node (>> the tolerance)


def test_position_channels_crossing_the_threshold():
    """act_in's position channels are kept by the mask (they are not nodes) but pass only if they
    survive AbsTopK, whose threshold an ablation moves: the circuit model must follow them. (This
    case, where several ablations move the threshold across one, was off by 1e-2 before it did.)"""
    from inference.hooks import record

    model, docs, circuit, means = make_case("release_like", node_frac=0.4, seed=0)
    cfg = model.config
    masks, frozen = C.circuit_masks(cfg, circuit), C.frozen_norm_scales(model, docs)
    acts = r"\d+\.(attn|mlp)\.act_in"
    with torch.no_grad(), record(acts) as base:
        C.masked_forward(model, docs, masks, means, frozen)
    last = C.docs_lengths(docs) - 2  # rows after a doc's answer position never reach the loss
    crossing = 0
    for loc, chans in circuit.items():
        for c in chans.tolist():
            m = dict(masks)
            m[loc] = masks[loc].clone()
            m[loc][c] = 0.0
            with torch.no_grad(), record(acts) as rec:
                C.masked_forward(model, docs, m, means, frozen)
            for name in rec:
                kept, was = rec[name][..., cfg.d_model :] != 0, base[name][..., cfg.d_model :] != 0
                doc, pos, _ = torch.nonzero(kept != was).unbind(1)
                crossing += int((pos <= last[doc]).sum())
    assert crossing > 0  # the case exercises it
    want = C.ablation_losses(model, docs, circuit, means)
    got = CM.fast_ablation_losses(model, docs, circuit, means)
    for loc in want:
        assert torch.allclose(got[loc], want[loc], atol=1e-4, rtol=1e-4), loc


def test_unsupported_variant_falls_back_to_reference():
    model, docs, circuit, means = make_case("afrac_resid_post_attn", node_frac=0.1)
    with pytest.raises(NotImplementedError):
        CM.CircuitModel(model, docs, circuit, means)
    want = C.ablation_losses(model, docs, circuit, means)
    got = CM.fast_ablation_losses(model, docs, circuit, means)
    assert all(torch.allclose(got[loc], want[loc]) for loc in want)


def _brute_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.sort(dim=-1, descending=True).values[..., k - 1 : k]


def test_rank_window_and_kth_largest_pair_against_sorting():
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(4, 60, (1,), generator=gen))
        m = int(torch.randint(0, n, (1,), generator=gen))
        k = int(torch.randint(1, n, (1,), generator=gen))
        rows = 5
        vals = (torch.randn(rows, n, generator=gen) * (torch.rand(rows, n, generator=gen) > 0.4)).abs()
        if trial % 2:
            vals = torch.round(vals * 2) / 2  # ties
        const, changing = vals[:, m:], vals[:, :m]
        window = CM._rank_window(const, k, m)
        full = torch.cat(
            [
                torch.full((rows, m + 1), float("inf")),
                const.sort(-1, descending=True).values,
                torch.full((rows, k + 2), float("-inf")),
            ],
            -1,
        )
        assert torch.equal(window, full[:, k - m + m : k + 2 + m]), (n, m, k)  # ranks k-m .. k+1 (index rank + m)
        changed = (changing.unsqueeze(0) + torch.rand(3, rows, m, generator=gen) * (trial % 3)).round(decimals=1)
        kth, kth1 = CM._kth_largest_pair(changed, window)
        compiled = kth_pair(changed, window)  # the numba kernel (None without numba)
        if compiled is not None:
            assert torch.equal(compiled[0], kth) and torch.equal(compiled[1], kth1), (n, m, k)
        union = torch.cat([changed, const.expand(3, -1, -1)], -1)
        if compiled is not None:  # with the un-ablated rows' thresholds: rows answered without a selection
            base_union = torch.cat([changing.round(decimals=1), const], -1).unsqueeze(0)
            base = (changing.round(decimals=1).abs(), _brute_kth(base_union, k)[0, :, 0], _brute_kth(base_union, k + 1)[0, :, 0])
            inc = kth_pair(changed, window, base)
            assert torch.equal(inc[0], _brute_kth(union, k)) and torch.equal(inc[1], _brute_kth(union, k + 1)), (n, m, k)
        assert torch.equal(kth, _brute_kth(union, k)) and torch.equal(kth1, _brute_kth(union, k + 1)), (n, m, k)
        # the general path alone, on every row (also those the fast path answers without it)
        flat, win = changed.reshape(3 * rows, m), window.expand(3, -1, -1).reshape(3 * rows, m + 2)
        kth, kth1 = CM._kth_largest_pair_sorted(flat, win, (flat > win[:, :1]).sum(-1, keepdim=True))
        assert torch.equal(kth.view(3, rows, 1), _brute_kth(union, k)), (n, m, k)
        assert torch.equal(kth1.view(3, rows, 1), _brute_kth(union, k + 1)), (n, m, k)


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_ablations_that_reach_nothing_leave_the_loss(mode):
    """A circuit whose last layer keeps attention inputs but no q/k/v or MLP node: ablating those
    inputs changes nothing downstream. (Found on the demo store, where the fast path crashed.)"""
    model, docs, circuit, means = make_case("release_like", node_frac=0.2)
    last = model.config.n_layer - 1
    for loc in C.node_locations(model.config):
        if loc.startswith(f"{last}.") and loc != f"{last}.attn.act_in":
            circuit[loc] = torch.zeros(0, dtype=torch.long)
    want = C.ablation_losses(model, docs, circuit, means, mode)
    got = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=7)
    for loc in want:
        assert torch.allclose(got[loc], want[loc], atol=1e-4, rtol=1e-4), loc
    inert = want[f"{last}.attn.act_in"]
    assert len(inert) > 1 and torch.allclose(inert, inert[0].expand_as(inert))  # all equal: they reach nothing
    others = torch.cat([v for loc, v in want.items() if loc != f"{last}.attn.act_in"])
    assert (others - inert[0]).abs().max() > 3e-4  # while other ablations do change it


def test_linear_stage_from_compressed_weights_equals_dense():
    """An accelerated model's `_LinearStage` reads the nonzeros of the compressed copy instead of
    the dense (memory-mapped) weight: the same rows, weights and constants, bit for bit."""
    from inference.fast import accelerate

    model, docs, circuit, means = make_case("release_like", density=0.1)
    lin = model.transformer.h[0].mlp.c_fc
    x = torch.randn(5, lin.in_features)
    cols = torch.tensor([1, 3, 4, 9])
    plain = CM._LinearStage(lin, x, cols)
    assert CM._weight_entries(lin) is None
    accelerate(model, max_density=1.0)
    assert CM._weight_entries(lin) is not None
    fast = CM._LinearStage(lin, x, cols)
    assert len(plain.rows) > 0 and torch.equal(plain.rows, fast.rows)
    dense = lambda w: w.to_dense() if w.layout != torch.strided else w  # noqa: E731
    assert torch.equal(dense(plain.w_t), dense(fast.w_t))
    assert torch.equal(plain.k, fast.k)
    with torch.no_grad():
        want = C.masked_forward(model, docs, C.circuit_masks(model.config, circuit), means)
        got = CM.CircuitModel(model, docs, circuit, means).logits()
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(
    "const, before, after, k",
    [
        ([5.0, 3.0, 1.0], 4.0, 6.0, 2),  # the base k-th value itself moves up: the k-th becomes 5
        ([5.0, 3.0, 1.0], 3.0, 0.0, 2),  # a value tied with the (k+1)-th moves down: the (k+1)-th becomes 1
        ([5.0, 3.0, 1.0], 0.5, 0.25, 2),  # stays below both thresholds: unchanged
        ([5.0, 3.0, 1.0], 6.0, 7.0, 2),  # stays above both: unchanged
    ],
)
def test_kth_pair_from_the_base_thresholds_at_their_edges(const, before, after, k):
    """A changed value at (not strictly beyond) a base threshold must be selected again."""
    if KP.kernel() is None:
        pytest.skip("numba not available")
    m = 1
    window = CM._rank_window(torch.tensor([const]), k, m)
    base_union = torch.tensor([[const + [before]]])
    base = (torch.tensor([[before]]), _brute_kth(base_union, k)[0, :, 0], _brute_kth(base_union, k + 1)[0, :, 0])
    got = kth_pair(torch.tensor([[[after]]]), window, base)
    union = torch.tensor([[const + [after]]])
    assert got[0].item() == _brute_kth(union, k).item() and got[1].item() == _brute_kth(union, k + 1).item()


def test_kth_pair_kernel_compiles_where_numba_is_installed():
    """The compiled kernels must not fall back to torch silently (the other tests pass either way)."""
    pytest.importorskip("numba")
    assert KP.kernel() is not None and SR.kernel() is not None


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_sparse_linear_stage_equals_a_float64_product(compiled, monkeypatch):
    """`_LinearStage.run` on a sparse W[rows, circuit] (compiled: `inference.sparse_rows`; torch:
    dense-times-CSC) is x_circuit @ W[rows, circuit].T + (the rest of the row's input) @ W[rows].T + b,
    computed here in float64 from the dense weight, over ablations x tokens rows."""
    monkeypatch.setattr(SR, "ENABLED", compiled)
    gen = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(300, 200)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=gen) < 0.01)
    tokens, circuit = 7, torch.randperm(300, generator=gen)[:150]  # wide enough for W[rows, circuit] to stay sparse
    x_full = torch.randn(tokens, 300, generator=gen)
    stage = CM._LinearStage(lin, x_full, circuit)
    assert stage.csr is not None and len(stage.rows) > 0  # sparse: the path under test
    x_circuit = torch.randn(4, tokens, len(circuit), generator=gen)  # 4 ablations
    got = stage.run(x_circuit)
    if compiled:
        assert SR.sparse_rows(x_circuit, stage.csr, stage.k) is not None  # the kernel answered
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    rest = x_full.double().clone()
    rest[:, circuit] = 0
    want = x_circuit.double() @ w[stage.rows][:, circuit].T + (rest @ w[stage.rows].T + b[stage.rows])
    assert got.shape == (4, tokens, len(stage.rows)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    reads = (w[:, circuit] != 0).any(1).nonzero().flatten()
    assert torch.equal(stage.rows, reads)  # exactly the rows that read a circuit channel


def test_kth_pair_kernel_against_sorting_on_many_small_rows():
    """The compiled selection (a binary search over the sorted window, then the values between two
    of its entries) against a full sort of the union: many sizes, k below and above m (the window's
    +inf padding), ties and runs of zeros."""
    if KP.kernel() is None:
        pytest.skip("numba not installed")
    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        n = int(torch.randint(3, 60, (1,), generator=gen))
        m, k = int(torch.randint(1, n, (1,), generator=gen)), int(torch.randint(1, n, (1,), generator=gen))
        vals = torch.randn(3, n, generator=gen)
        if trial % 3 == 0:
            vals = torch.round(vals * 2) / 2  # ties
        if trial % 5 == 0:
            vals[vals.abs() < 0.7] = 0  # runs of zeros, as after AbsTopK
        const, changing = vals[:, m:].abs(), vals[:, :m]
        changed = changing + (torch.randn(2, 3, m, generator=gen) * (trial % 4)).round(decimals=1)
        kth, kth1 = kth_pair(changed, CM._rank_window(const, k, m))
        union = torch.cat([changed.abs(), const.expand(2, -1, -1)], -1)
        assert torch.equal(kth, _brute_kth(union, k)), (trial, n, m, k)
        want1 = _brute_kth(union, k + 1) if k < n else torch.full_like(kth, float("-inf"))
        assert torch.equal(kth1, want1), (trial, n, m, k)


def test_kth_pair_from_the_base_thresholds_against_sorting():
    """The compiled path from the un-ablated rows' thresholds (counts around the base k-th value,
    then the nearest values on one side, the general selection when the threshold moved further)
    against a full sort of the union: changes of a few values (the threshold moves by a rank or
    two) up to whole rows redrawn, ties with the base value, zeros, +inf padding (k < m)."""
    if KP.kernel() is None:
        pytest.skip("numba not installed")
    gen = torch.Generator().manual_seed(1)
    for trial in range(300):
        n = int(torch.randint(4, 80, (1,), generator=gen))
        m, k = int(torch.randint(1, n, (1,), generator=gen)), int(torch.randint(1, n - 1, (1,), generator=gen))
        vals = torch.randn(4, n, generator=gen)
        if trial % 3 == 0:
            vals = torch.round(vals * 2) / 2  # ties, also with the base thresholds
        if trial % 4 == 0:
            vals[vals.abs() < 0.5] = 0
        const, before = vals[:, m:].abs(), vals[:, :m]
        window = CM._rank_window(const, k, m)
        base_union = torch.cat([before.abs(), const], -1).unsqueeze(0)
        base = (before.abs(), _brute_kth(base_union, k)[0, :, 0], _brute_kth(base_union, k + 1)[0, :, 0])
        # 5 ablations: 1, 2, 3 values moved (by little or much), a quarter of the row, all of it
        after = before.expand(5, -1, -1).clone()
        for a, moved in enumerate([1, 2, 3, max(1, m // 4), m]):
            cols = torch.randperm(m, generator=gen)[:moved]
            step = torch.randn(4, len(cols), generator=gen) * (0.05 if trial % 2 else 1.0)
            after[a][:, cols] += step if trial % 3 else torch.round(step * 2) / 2
        if trial % 7 == 0:
            after[0, 0, 0] = -0.0
        got = kth_pair(after, window, base)
        union = torch.cat([after.abs(), const.expand(5, -1, -1)], -1)
        assert torch.equal(got[0], _brute_kth(union, k)), (trial, n, m, k)
        assert torch.equal(got[1], _brute_kth(union, k + 1)), (trial, n, m, k)
        plain = kth_pair(after, window)  # the general path, bit for bit the same
        assert torch.equal(plain[0], got[0]) and torch.equal(plain[1], got[1])


@pytest.mark.parametrize("with_base", [False, True])
def test_topk_stage_kernel_equals_torch(with_base, monkeypatch):
    """`_TopkStage.run` with the compiled stage (thresholds, circuit values, tie flags in one pass:
    `kth_pair_stage`) against its torch code, bit for bit: values from the changing channels and
    from constants, ties at the threshold (values rounded to halves), zeros, -0.0."""
    if KP.kernel() is None:
        pytest.skip("numba not installed")
    gen = torch.Generator().manual_seed(2)
    for trial in range(40):
        n, rows, A = int(torch.randint(8, 60, (1,), generator=gen)), 6, 5
        z = torch.round(torch.randn(rows, n, generator=gen) * 2) / 2
        changing = torch.randperm(n, generator=gen)[: int(torch.randint(1, n, (1,), generator=gen))].sort().values
        circuit = torch.randperm(n, generator=gen)[: int(torch.randint(1, n, (1,), generator=gen))].sort().values
        stage = CM._TopkStage(z, changing, circuit, float(torch.rand(1, generator=gen)) * 0.8 + 0.1)
        if stage.window is None:
            continue
        stage.run(z[:, changing].unsqueeze(0), (torch.zeros(1, rows, dtype=torch.bool), None), keep_base=with_base)
        vals = z[:, changing].expand(A, -1, -1) + torch.round(torch.randn(A, rows, len(changing), generator=gen)) / 2
        vals[0, 0, 0] = -0.0
        got = {}
        for compiled in (True, False):
            monkeypatch.setattr(KP, "ENABLED", compiled)
            flags = torch.zeros(A, rows, dtype=torch.bool)  # without `relevant`, each row is a doc's
            got[compiled] = (stage.run(vals, (flags, None)), flags)
        assert torch.equal(got[True][0], got[False][0]), trial
        assert torch.equal(got[True][0].signbit(), got[False][0].signbit()), trial
        assert torch.equal(got[True][1], got[False][1]), trial


def _tied_token_case():
    """A case whose docs hold, in some pairs only, a token whose layer-0 AbsTopK input has every
    entry of one magnitude, all of them circuit channels: a tie between constants (layer 0's input
    depends on no circuit value)."""
    model, docs, circuit, means = make_case("release_like", node_frac=0.3, seed=0)
    docs = torch.cat([docs, docs.roll(1, dims=0)])  # 6 pairs
    tok = int(docs[0, 1])
    with torch.no_grad():
        model.transformer.wte.weight[tok] = 0.5 * torch.sign(torch.randn(model.config.d_model))
        model.transformer.h[0].ln_1.weight.fill_(1.0)
    lengths = C.docs_lengths(docs)
    holds = [bool((docs[j, : lengths[j] - 1] == tok).any()) for j in range(len(docs))]
    half = len(docs) // 2
    tied_pairs = {j % half for j in range(len(docs)) if holds[j]}
    assert 0 < len(tied_pairs) < half  # some pairs tie, others do not
    circuit["0.attn.act_in"] = torch.arange(model.config.d_model)  # every tied entry: those topk drops differ
    return model, docs, circuit, means, holds, tied_pairs


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_ties_between_constants_decided_by_topk_on_the_whole_row(mode, monkeypatch):
    """A tie between constants (`_tied_token_case`) is decided by topk on the un-ablated row with
    the pass's changing values put in (`_TopkStage._decide_ties`), as the reference's redo of a
    tied row does: no node is sent to the reference, and the circuit model's own losses equal the
    reference's on every pair, the tied ones included."""
    model, docs, circuit, means, holds, tied_pairs = _tied_token_case()
    cm = CM.CircuitModel(model, docs, circuit, means)
    assert not any(t.any() for t in cm.tied_before)  # the un-ablated run: decided, not flagged
    raw, tied = cm.ablation_losses(mode, 7)
    assert tied == []
    monkeypatch.setattr(CM, "masked_forward", lambda *a, **k: pytest.fail("the reference was called"))
    got = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=7, circuit_model=cm, per_pair=True)
    monkeypatch.undo()
    want = C.ablation_losses(model, docs, circuit, means, mode, per_pair=True)
    raw = CM._aligned(circuit, raw, cm.circuit)
    for loc in want:
        assert torch.allclose(raw[loc], want[loc], atol=1e-4, rtol=1e-4), loc
        assert torch.allclose(got[loc], want[loc], atol=1e-4, rtol=1e-4), loc


@pytest.mark.parametrize("mode", ["mean", "zero"])
def test_ties_recomputed_by_the_reference_on_their_docs_only(mode, monkeypatch):
    """With the ties between constants left undecided (`_decide_ties` switched off, as for a tie
    a changing value takes part in), the tied token's docs (`_tied_token_case`) tie in the
    un-ablated circuit run (it keeps every tied entry, topk only k), and so does every ablation
    after it. `fast_ablation_losses` must recompute exactly those docs with the reference (the
    circuit model's own values there are off), and only those, each node from its own layer."""
    monkeypatch.setattr(CM._TopkStage, "_decide_ties", lambda self, *a: None)
    model, docs, circuit, means, holds, tied_pairs = _tied_token_case()
    half = len(docs) // 2
    cm = CM.CircuitModel(model, docs, circuit, means)
    raw, tied = cm.ablation_losses(mode, 7)
    assert {int(p) for _, _, d in tied for p in d % half} == tied_pairs
    calls = []  # (docs, the layer it starts at) of each reference forward
    real = CM.masked_forward

    def counted(m, d, *a, start=None, **k):
        calls.append((len(d), None if start is None else start[0]))
        return real(m, d, *a, start=start, **k)

    monkeypatch.setattr(CM, "masked_forward", counted)
    got = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=7, circuit_model=cm, per_pair=True)
    want = C.ablation_losses(model, docs, circuit, means, mode, per_pair=True)
    tied_docs = {int(d) for _, _, ds in tied for d in ds}
    assert {j for j in range(len(docs)) if holds[j]} == tied_docs  # a tie in a doc flags that doc only
    # one doc at a time: per tied doc, one un-ablated forward from the embedding, then each of its
    # tied nodes from the node's own layer (final_resid's: the last block)
    assert {n for n, _ in calls} == {1}
    layer = {loc: model.config.n_layer - 1 if loc == C.FINAL_RESID else int(loc.split(".")[0]) for loc in want}
    wanted = sorted([None] * len(tied_docs) + [layer[loc] for loc, _, ds in tied for _ in ds], key=str)
    assert sorted((s for _, s in calls), key=str) == wanted
    assert any(s for _, s in calls)  # some start past the embedding
    raw = CM._aligned(circuit, raw, cm.circuit)
    pairs = sorted(tied_pairs)
    off = max(float((raw[loc][:, pairs] - want[loc][:, pairs]).abs().max()) for loc in want if len(want[loc]))
    assert off > 1e-3  # the circuit model's own values on the tied pairs are wrong: the recompute matters
    for loc in want:
        assert torch.allclose(got[loc], want[loc], atol=1e-4, rtol=1e-4), loc
    mean = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=7, circuit_model=cm)
    for loc in want:  # without per_pair: the mean over pairs, float32 as the reference's
        assert mean[loc].dtype == torch.float32
        assert torch.allclose(mean[loc].double(), want[loc].mean(dim=1), atol=1e-5), loc


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_separable_heads_attend_by_running_sums_and_equal_the_reference(compiled, monkeypatch):
    """Four heads per layer, one of each kind: q only, k only, q and k on different dimensions
    (the three separable: `inference.separable_attention`), q and k sharing a dimension (flash).
    Logits and per-pair ablation losses equal the reference's, through both attention paths at
    once (the last layer only at the answer rows)."""
    monkeypatch.setattr(SA, "ENABLED", compiled)
    variant = {**VARIANTS["release_like"], "n_head": 4, "d_head": 4, "d_model": 16}
    model = sparsify(tiny_model(seed=3, **variant), 0.6, seed=3)
    _, docs, circuit, _ = make_case("release_like", node_frac=0.3, seed=3)
    means = C.node_means(model, torch.randint(0, BASE["vocab_size"], (8, BASE["block_size"])))
    for loc in C.node_locations(model.config):
        circuit[loc] = torch.randperm(C.location_width(model.config, loc))[:4]
    for i in range(model.config.n_layer):  # heads 0-3 of 4 dimensions each
        circuit[f"{i}.attn.q"] = torch.tensor([1, 9, 13])  # head 0: q only; 2: dim 1; 3: dim 1 (shared)
        circuit[f"{i}.attn.k"] = torch.tensor([6, 10, 13])  # head 1: k only; 2: dim 2; 3: dim 1
    cm = CM.CircuitModel(model, docs, circuit, means)
    for L in cm.layers:
        assert L["dyn_heads"].tolist() == [3]  # flash
        assert L["sep"].heads.tolist() == [0, 1, 2]  # running sums
    want = C.masked_forward(model, docs, C.circuit_masks(model.config, circuit), means)
    assert (cm.logits() - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    for mode in ("mean", "zero"):
        ref = C.ablation_losses(model, docs, circuit, means, mode, per_pair=True)
        got = CM.fast_ablation_losses(model, docs, circuit, means, mode, batch=5, circuit_model=cm, per_pair=True)
        for loc in ref:
            assert torch.allclose(got[loc], ref[loc], atol=1e-4, rtol=1e-4), (mode, loc)
        qk = torch.cat([ref[f"{i}.attn.{kind}"] for i in range(model.config.n_layer) for kind in "qk"])
        assert (qk - qk.mean()).abs().max() > 1e-3  # the q and k ablations move the loss


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
def test_topk_stage_decides_ties_between_constants_on_the_rows_it_keeps(compiled, monkeypatch):
    """`_TopkStage` keeps the whole rows where constants tie near rank k (and only those), renumbers
    them when it is cut to some rows (`take_rows`, the last layer's answer rows), and there decides
    such a tie as topk does on the row, without a flag; a tie a changing value takes part in stays
    flagged for the reference."""
    if compiled and KP.kernel() is None:
        pytest.skip("numba not installed")
    monkeypatch.setattr(KP, "ENABLED", compiled)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(6, 10, generator=gen)
    z[2] = 0.5 * torch.sign(torch.randn(10, generator=gen))  # every constant of one magnitude
    z[4] = 0.25 * torch.sign(torch.randn(10, generator=gen))
    z[2, :2], z[4, :2] = torch.tensor([2.0, -0.1]), torch.tensor([-0.05, 1.0])  # the changing channels: off the tie
    changing, circuit = torch.tensor([0, 1]), torch.arange(10)
    stage = CM._TopkStage(z, changing, circuit, 0.5)
    assert stage.tie_rows.tolist() == [2, 4] and torch.equal(stage.tie_z, z[[2, 4]])
    sub = stage.take_rows(torch.tensor([4, 0, 2]))
    assert sub.tie_rows.tolist() == [0, 2] and torch.equal(sub.tie_z, z[[4, 2]])
    rows = z[[4, 0, 2]]
    vals = rows[:, changing].unsqueeze(0).repeat(2, 1, 1)
    vals[1, 2, 1] = -0.5  # a changing value moved onto the constants' tie
    vals[1, 0, 0], vals[1, 0, 1] = 3.0, -3.0  # both above it: the constants still tied among themselves
    flags = torch.zeros(2, 3, dtype=torch.bool)
    out = sub.run(vals, (flags, None))
    full = rows.unsqueeze(0).repeat(2, 1, 1)
    full[..., changing] = vals
    want = abs_topk(full, 0.5)[..., circuit]
    assert flags.tolist() == [[False, False, False], [False, False, True]]  # a changing value at the tie
    assert torch.equal(out[0], want[0]) and torch.equal(out[1, :2], want[1, :2])


def test_topk_stage_decides_a_tie_of_the_unablated_row_where_the_row_is_unchanged():
    """A row whose un-ablated values tie at the k-th with a changing value among the tied: the
    un-ablated run and every pass that leaves the row's changing values as they were are decided
    by topk on the row (no flag); a pass that moves another changing value onto the tie is flagged."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(3, 12, generator=gen)
    z[1] = torch.tensor([0.7, -0.1, 0.7, -0.5, 0.05, 2.0, -3.0, 0.01, 0.02, 0.03, 0.04, -0.06])
    changing, circuit = torch.tensor([0, 1]), torch.arange(12)  # z[1, 0] = 0.7: changing, at the tie
    stage = CM._TopkStage(z, changing, circuit, 0.25)  # k = 3: 3.0, 2.0, then one of two 0.7s
    assert stage.tie_rows.tolist() == [1]
    flags = torch.zeros(1, 3, dtype=torch.bool)
    base_out = stage.run(z[:, changing].unsqueeze(0), (flags, None), keep_base=True)
    assert not flags.any() and torch.equal(base_out[0], abs_topk(z, 0.25))
    vals = z[:, changing].unsqueeze(0).repeat(3, 1, 1)
    vals[1, 0, 0] += 1.0  # another row moved: row 1 as it was
    vals[2, 1, 1] = 0.7  # row 1's other changing value moved onto the tie
    flags = torch.zeros(3, 3, dtype=torch.bool)
    out = stage.run(vals, (flags, None))
    full = z.unsqueeze(0).repeat(3, 1, 1)
    full[..., changing] = vals
    assert flags.tolist() == [[False, False, False], [False, False, False], [False, True, False]]
    assert torch.equal(out[:2], abs_topk(full[:2], 0.25))
