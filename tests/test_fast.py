"""The fast forward path (`inference.fast.accelerate`): same logits and hook values as the plain
path and as the independent float64 reference of test_model, on every model variant and at
release-scale widths; state dict unchanged; hooks, in-place weight edits and gradients work."""

import math

import numpy as np
import pytest
import torch
from test_model import BASE, VARIANTS, ref_forward, tiny_model

import inference.fast as fast_module
import inference.topk_select as topk_select
from inference import GPT, GPTConfig, intervene, load_model, record
from inference.fast import FastBlock, FastCausalSelfAttention, SparseLinear, accelerate, decelerate, is_accelerated
from inference.loader import save_model


def sparsify(model: GPT, density: float, seed: int = 0) -> GPT:
    """Zero all but about `density` of every block weight matrix (as in the released models)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name and p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=gen) < density)
    return model


def all_hooks(model, idx):
    with torch.no_grad(), record(r".*") as rec:
        logits = model(idx)
    return logits, dict(rec)


def assert_close_to_scale(got, want, what):
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-4 * scale, what


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_path_matches_plain_path_and_reference(variant, monkeypatch):
    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 5)  # several token chunks per batch
    plain = sparsify(tiny_model(**VARIANTS[variant]), density=0.4)
    fast = sparsify(tiny_model(**VARIANTS[variant]), density=0.4)
    accelerate(fast, max_density=1.0)  # force the sparse kernel on every linear, even these small dense-ish ones
    idx = torch.randint(0, BASE["vocab_size"], (3, BASE["block_size"]), generator=torch.Generator().manual_seed(2))
    want_logits, want = all_hooks(plain, idx)
    got_logits, got = all_hooks(fast, idx)
    assert set(got) == set(want)
    for name in want:
        assert_close_to_scale(got[name], want[name], (variant, name))
    ref = ref_forward(plain.config.to_dict(), plain.state_dict(), idx)
    assert (got_logits.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    with torch.no_grad():  # no hooks active: the fused, chunked block
        fused = fast(idx)
    assert (fused.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    used = [m for m in fast.modules() if isinstance(m, SparseLinear) and m.__dict__["_sparse_cache"][1] is not None]
    assert len(used) == 4 * BASE["n_layer"] + 1  # every block linear and the unembedding ran sparse


def test_release_scale_widths():
    """csp_yolo2 widths (1 layer, weights at 1/1000), a short sequence: logits and every hook."""
    cfg = GPTConfig(n_layer=1, d_model=2048, n_head=128, d_head=16, d_mlp=8192, block_size=64, vocab_size=256,
                    afrac=0.25, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q",
                    d_pos_emb=32, sink=True, rms_norm=True, enable_bigram_table=True, learnable_bigram_table=True,
                    tied_unembed=False)  # fmt: skip
    torch.manual_seed(0)
    model = sparsify(GPT(cfg).eval(), density=1e-3)
    with torch.no_grad():
        model.transformer.h[0].attn.attn_imp.sink_logit.normal_()
        model.bigram_table.normal_(std=0.1)
        for name, p in model.named_parameters():  # bring sparse layers' outputs to O(1)
            if ".h." in name and p.dim() == 2:
                p.mul_(math.sqrt(p.shape[1]) / 6)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want_logits, want = all_hooks(model, idx)
    accelerate(model)
    got_logits, got = all_hooks(model, idx)
    for name in want:
        assert_close_to_scale(got[name], want[name], name)
    assert_close_to_scale(got_logits, want_logits, "logits")
    with torch.no_grad():
        assert_close_to_scale(model(idx), want_logits, "fused logits")
    block = model.transformer.h[0]
    for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
        assert lin.__dict__["_sparse_cache"][1] is not None, "a 1/1000-dense block weight must run sparse"
    assert model.lm_head.__dict__["_sparse_cache"][1] is None, "the dense unembedding must stay dense"
    assert isinstance(block.attn, FastCausalSelfAttention) and isinstance(block, FastBlock)


def test_state_dict_and_saved_checkpoint_unchanged(tmp_path):
    model = sparsify(tiny_model(**VARIANTS["release_like"]), 0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerate(model, max_density=1.0)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))  # builds the caches
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    save_model(model, tmp_path)
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(saved) == set(before) and all(torch.equal(saved[k], before[k]) for k in before)
    assert all(t.layout == torch.strided for t in saved.values())
    reloaded = load_model(tmp_path)
    idx = torch.randint(0, BASE["vocab_size"], (2, 6))
    with torch.no_grad():
        assert torch.allclose(reloaded(idx), model(idx), atol=1e-5)


def test_interventions_on_fast_path():
    plain = sparsify(tiny_model(**VARIANTS["afrac_all"]), 0.4)
    fast = accelerate(sparsify(tiny_model(**VARIANTS["afrac_all"]), 0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, 9))
    fns = {"0.mlp.post_act": lambda t: t * 0.0, "1.attn.v": lambda t: t + 1.0}
    outs = []
    for m in (plain, fast):
        with torch.no_grad(), intervene(fns), record(r"1\.mlp\.act_in") as rec:
            outs.append((m(idx), rec["1.mlp.act_in"]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(outs[1][0], fast(idx), atol=1e-3)  # the intervention did something


def test_intervened_forward_selects_by_threshold_and_equals_the_plain_path(monkeypatch):
    """With an intervention that is not row-local in a layer, the fast path runs `Block.forward`
    there, with `abs_topk_exact` at every AbsTopK: the same output bit for bit as the plain path's
    `abs_topk`, rows where every entry ties included."""
    cfg = VARIANTS["afrac_all"]  # AbsTopK at all ten location types; no sink: the same attention code
    plain = sparsify(tiny_model(**cfg), 0.4)
    fast = accelerate(sparsify(tiny_model(**cfg), 0.4), max_density=0.0)  # dense matmuls: only AbsTopK differs
    for m in (plain, fast):
        m.transformer.h[1].ln_2.weight.data.fill_(1.0)
    calls = []
    real = fast_module.select_rows
    monkeypatch.setattr(fast_module, "select_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    idx = torch.randint(0, BASE["vocab_size"], (2, 9))
    fns = {"1.resid_mid": torch.ones_like}  # layer 1's mlp_in rows: all entries equal, every row a tie
    fns["0.resid_mid"] = lambda t: t  # a plain function (no `at_rows`): layer 0 on Block.forward too
    outs = []
    for m in (plain, fast):
        with torch.no_grad(), intervene(fns), record(r"1\.mlp\.act_in") as rec:
            outs.append((m(idx), rec["1.mlp.act_in"]))
    assert len(calls) == 10 * BASE["n_layer"]  # every AbsTopK of the fast model went through the selection
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert bool(((outs[1][1] != 0).sum(-1) == int(0.25 * BASE["d_model"])).all())  # k of the tied entries kept


@pytest.mark.parametrize("variant", ["release_like", "layernorm_gelu_tied"])
def test_masked_forward_stays_fused_and_equals_the_plain_path(variant, monkeypatch):
    """`masked_forward`'s interventions (masks, frozen norm scales) say how to apply to some tokens
    (`hooks.row_interventions`), so the fused block runs them chunk by chunk: logits and recorded (masked)
    hook points equal the plain model's within float rounding, with no layer on `Block.forward`."""
    from inference import circuit as C
    from inference.model import Block

    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 5)  # several chunks per forward
    cfg = VARIANTS[variant]
    plain = sparsify(tiny_model(**cfg), 0.5)
    fast = accelerate(sparsify(tiny_model(**cfg), 0.5), max_density=1.0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, BASE["vocab_size"], (3, 9), generator=gen)
    locs = C.node_locations(plain.config)
    circuit = {loc: torch.randperm(C.location_width(plain.config, loc), generator=gen)[:3] for loc in locs}
    masks = C.circuit_masks(plain.config, circuit)
    fill = {loc: torch.randn(m.shape, generator=gen) for loc, m in masks.items()}
    frozen = C.frozen_norm_scales(plain, idx[:, :7].repeat(1, 2)[:, :9])  # not idx's own: visibly frozen
    plain_calls = []
    real = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: plain_calls.append(type(self)) or real(self, *a))
    got = {}
    for name, m in (("plain", plain), ("fast", fast)):
        with torch.no_grad(), record(r"\d+\.(mlp\.post_act|attn\.act_in|ln_2\.rstd)") as rec:
            got[name] = (C.masked_forward(m, idx, masks, fill, frozen), dict(rec))
    assert FastBlock not in plain_calls and len(plain_calls) == plain.config.n_layer  # the plain model's only
    assert_close_to_scale(got["fast"][0], got["plain"][0], "logits")
    for key, want in got["plain"][1].items():
        assert_close_to_scale(got["fast"][1][key], want, key)
    # the masks took effect: channels outside the circuit hold their fill, and rstd is the frozen one
    post = got["fast"][1]["0.mlp.post_act"]
    outside = masks["0.mlp.post_act"] == 0
    assert torch.equal(post[..., outside], fill["0.mlp.post_act"][outside].expand(*post.shape[:2], -1))
    assert torch.equal(got["fast"][1]["1.ln_2.rstd"], frozen["1.ln_2.rstd"])


def test_in_place_weight_edit_is_seen():
    model = accelerate(sparsify(tiny_model(), 0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, 7))
    with torch.no_grad():
        model(idx)
        model.transformer.h[1].mlp.c_fc.weight[3].zero_()
        got = model(idx)
        decelerate(model)
        want = model(idx)
    assert torch.allclose(got, want, atol=1e-5)


def test_gradients_use_the_plain_path():
    plain = sparsify(tiny_model(**VARIANTS["release_like"]), 0.4)
    fast = accelerate(sparsify(tiny_model(**VARIANTS["release_like"]), 0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, 8))
    grads = []
    for m in (plain, fast):
        _, loss = m(idx, idx.roll(-1, 1))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_density_threshold_and_decelerate():
    model = sparsify(tiny_model(), 0.4)
    accelerate(model)  # default threshold: 40% dense weights stay on the dense matmul
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long))
    assert all(m.__dict__["_sparse_cache"][1] is None for m in model.modules() if isinstance(m, SparseLinear))
    assert is_accelerated(model)
    decelerate(model)
    assert not is_accelerated(model)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))


SELECT_METHODS = ["native", "radix", "sort", "introselect"]


def needs_native_select() -> None:
    """Skip where the C select cannot exist; where it can (AVX-512 and a C compiler), it must build."""
    from test_attention_kernel import CAN_BUILD

    if not CAN_BUILD:
        pytest.skip("no AVX-512 CPU or no C compiler: the C select cannot exist here")
    assert topk_select.native_kernels() is not None, "AVX-512 and a C compiler are here, yet select_kernel.c did not build"


def force_select_method(monkeypatch, method: str) -> None:
    """Make inference.topk_select use one implementation for every call."""
    if method == "radix":
        pytest.importorskip("numba")
    if method == "native":
        needs_native_select()
    monkeypatch.setattr(topk_select, "METHOD", method if method in ("radix", "native") else "numpy")
    monkeypatch.setattr(topk_select, "SORT_MIN_ZERO_FRACTION", 0.0 if method == "sort" else 2.0)


@pytest.mark.parametrize("method", SELECT_METHODS)
def test_abs_topk_exact_equals_abs_topk_including_ties_and_zeros(method, monkeypatch):
    """Every selection method (compiled radix select; numpy's full sort, used for rows with many
    zeros, and introselect), forced on every row, gives abs_topk's output exactly: ties, zeros,
    -0.0, inf and NaNs included."""
    from inference.fast import abs_topk_exact
    from inference.model import abs_topk

    force_select_method(monkeypatch, method)

    gen = torch.Generator().manual_seed(0)
    n_tied_rows = 0
    for trial in range(300):
        n = int(torch.randint(2, 40, (1,), generator=gen))
        frac = float(torch.rand(1, generator=gen))
        x = torch.randn(2, 5, n, generator=gen) * (torch.rand(2, 5, n, generator=gen) > 0.5)  # many exact zeros
        if trial % 5 == 1:
            x = x.neg()  # -0.0 where zeroed: the output must hold +0.0 there, as topk's scatter does
        if trial % 7 == 2:
            x[0, 0, 0] = float("inf") * (1 if trial % 2 else -1)
        if trial % 3 == 0:
            x = torch.round(x * 2) / 2  # many ties, also at the k-th value
            k = int(frac * n)
            if 0 < k < n:
                srt = x.abs().sort(-1, descending=True).values
                n_tied_rows += int(((srt[..., k - 1] == srt[..., k]) & (srt[..., k] > 0)).sum())
        got, want = abs_topk_exact(x, frac), abs_topk(x, frac)
        assert torch.equal(got, want), (x, frac)
    assert n_tied_rows > 50  # the tie fallback was exercised
    x = torch.tensor([[float("nan"), 1.0, -3.0, 2.0], [0.5, 1.0, -3.0, 2.0]])
    got, want = abs_topk_exact(x, 0.5), abs_topk(x, 0.5)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[1], want[1])


def test_forward_blocks_share_their_buffers_within_one_forward_only(monkeypatch):
    """Without hooks, a fast forward's blocks take q/k/v, the attention output and the residual
    stream from buffers the forward shares (one q/k/v buffer for every layer, two residual buffers
    in turn), the logits still equal the plain path's over 3 layers, and nothing is kept after the
    forward; with a recorder active every layer gets tensors of its own (recordings keep them)."""
    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 5)
    plain = sparsify(tiny_model(**{**VARIANTS["release_like"], "n_layer": 3}), density=0.4)
    fast = accelerate(sparsify(tiny_model(**{**VARIANTS["release_like"], "n_layer": 3}), density=0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["block_size"]), generator=torch.Generator().manual_seed(4))
    seen = []
    attention = fast_module.sink_attention

    def spy(q, k, v, sink, out=None):
        seen.append((q.data_ptr(), None if out is None else out.data_ptr()))
        return attention(q, k, v, sink, out)

    monkeypatch.setattr(fast_module, "sink_attention", spy)
    outs = []
    for block in fast.transformer.h:
        block.register_forward_hook(lambda m, a, y: outs.append(y.data_ptr()))
    with torch.no_grad():
        got, want = fast(idx), plain(idx)
    assert_close_to_scale(got, want, "logits")
    assert len({q for q, _ in seen}) == 1 and len({o for _, o in seen}) == 1  # one q/k/v and one y buffer
    assert outs[0] == outs[2] != outs[1]  # the residual stream: two buffers in turn
    assert getattr(fast_module._WORKERS, "buffers", None) is None
    seen.clear()
    with torch.no_grad(), record(r".*attn\.q$") as rec:
        fast(idx)
    assert len({q for q, _ in seen}) == 3 and len({t.data_ptr() for t in rec.values()}) == 3


def test_native_select_from_the_previous_rows_bracket_or_its_ladder(monkeypatch):
    """The C select first looks for each row's k-th |value| within one ladder step (STEP float
    bits) of the previous row's, and climbs its ladder when it is not there. Rows whose k-th value
    sits at chosen distances from the previous row's (on either edge of that bracket, just outside
    it, far outside the ladder, with ties at the k-th, or with fewer than k nonzeros) all give
    abs_topk's output exactly, and only the tied rows are flagged for a redo."""
    from inference.fast import abs_topk_exact
    from inference.model import abs_topk

    force_select_method(monkeypatch, "native")
    STEP, n, k = 1 << 21, 300, 75  # ~60 entries within a STEP of the k-th: the kernel splits them
    rng = np.random.default_rng(0)
    offsets = [0, -STEP, STEP - 1, STEP, -STEP - 1, -STEP + 1, 3 * STEP, -3 * STEP, 40 * STEP, -40 * STEP, 7, -7]
    rows, guess = [], 0x3F800000  # the kernel's first guess: 1.0
    for i in range(240):
        kth = int(np.clip(guess + offsets[i % len(offsets)] * (1 + (i // len(offsets)) % 2), 0x20000000, 0x5F000000))
        bits = np.concatenate(
            [
                rng.integers(kth + 1, kth + 5 * STEP, k - 1),  # above the k-th
                [kth],
                rng.integers(kth - 5 * STEP, kth, n - k),  # below it
            ]
        ).astype(np.uint32)
        if i % 9 == 4:
            bits[k] = kth  # a tie at the k-th value: flagged and redone by topk
        if i % 13 == 6:
            bits[k - 3 :] = 0  # fewer than k nonzeros: all kept (the guess stays)
        else:
            guess = kth
        row = bits.view(np.float32) * rng.choice([-1.0, 1.0], n).astype(np.float32)
        rows.append(rng.permutation(row))
    x = torch.from_numpy(np.stack(rows))
    assert torch.equal(abs_topk_exact(x, k / n), abs_topk(x, k / n))
    # the kernel itself: exactly the tied rows flagged, every other row right without a redo
    out = np.empty_like(x.numpy())
    flagged = topk_select.select_rows(x.numpy(), out, k)
    srt = x.abs().sort(-1, descending=True).values
    tied = ((srt[:, k - 1] == srt[:, k]) & (srt[:, k] > 0)).numpy()
    assert 10 < tied.sum() < len(rows) and np.array_equal(flagged, tied)
    assert torch.equal(torch.from_numpy(out)[~tied], abs_topk(x, k / n)[~tied])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunks_on_worker_threads_equal_one_thread(threads, monkeypatch):
    """FastBlock runs its token chunks on as many worker threads as torch has: the logits and the
    recorded hook values (assembled from chunks finished in any order) equal the plain path's."""
    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 7)
    plain = sparsify(tiny_model(**VARIANTS["release_like"]), density=0.4)
    fast = accelerate(sparsify(tiny_model(**VARIANTS["release_like"]), density=0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (4, BASE["block_size"]), generator=torch.Generator().manual_seed(5))
    want_logits, want = all_hooks(plain, idx)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got_logits, got = all_hooks(fast, idx)
        with torch.no_grad():
            fused = fast(idx)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    for name in want:
        assert_close_to_scale(got[name], want[name], name)
    assert_close_to_scale(fused, want_logits, "logits")
    if threads > 1:
        assert threads in fast_module._CHUNK_POOLS  # a worker pool of that size ran the chunks


def test_forward_keeps_torch_threads_idle_and_runs_the_head_on_the_workers(monkeypatch):
    """Within a fast forward the calling thread's torch ops run on one thread (torch's OpenMP
    threads would otherwise spin between the workers' chunks), the head runs in one part per
    worker, the logits equal the plain path's, and torch's thread count is restored, also when
    the forward raises."""
    import threading

    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 5)
    plain = sparsify(tiny_model(**VARIANTS["release_like"]), density=0.4)
    fast = accelerate(sparsify(tiny_model(**VARIANTS["release_like"]), density=0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["block_size"]), generator=torch.Generator().manual_seed(3))
    seen = {"block": [], "head": []}
    fast.transformer.h[0].register_forward_pre_hook(lambda m, a: seen["block"].append(torch.get_num_threads()))
    head = GPT.head

    def spy(self, x, ids, out=None):
        seen["head"].append((threading.current_thread().name, x.shape[0]))
        return head(self, x, ids, out=out)

    monkeypatch.setattr(GPT, "head", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            got, want = fast(idx), plain(idx)
        assert torch.get_num_threads() == 2
        assert seen["block"] == [1]
        rows = idx.numel()  # one part per worker
        fast_calls = [c for c in seen["head"] if c[0].startswith("fastblock")]
        assert sorted(n for _, n in fast_calls) == [rows // 2, rows - rows // 2]
        assert len(seen["head"]) == len(fast_calls) + 1  # and the plain model's one call, on this thread
        assert_close_to_scale(got, want, "logits")
        fast.transformer.h[1].register_forward_pre_hook(lambda m, a: 1 / 0)
        with pytest.raises(ZeroDivisionError), torch.no_grad():
            fast(idx)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", SELECT_METHODS + ["auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zeros", [0.0, 0.6, 0.95])
def test_abs_topk_exact_on_wide_rows(method, dtype, zeros, monkeypatch):
    """Release-like row widths and shares of zeros, both float widths (radix: float32 only, float64
    goes to numpy): equal to abs_topk, which keeps exactly k entries per row here (or every nonzero)."""
    from inference.fast import abs_topk_exact
    from inference.model import abs_topk

    if method != "auto":
        force_select_method(monkeypatch, method)
    gen = torch.Generator().manual_seed(1)
    for n in (2048, 2080, 8192):
        x = torch.randn(3, 40, n, generator=gen, dtype=dtype) * (torch.rand(3, 40, n, generator=gen) >= zeros)
        got = abs_topk_exact(x, 0.25)
        assert torch.equal(got, abs_topk(x, 0.25))
        kept = (got != 0).sum(-1)
        assert bool(((kept == n // 4) | (kept == (x != 0).sum(-1))).all())


def test_select_rows_without_numba_falls_back_to_numpy(monkeypatch):
    """Without numba the numpy implementations serve "auto" with the same result; forcing the
    compiled kernel then fails with a message that says what is missing."""
    import numpy as np

    from inference.model import abs_topk

    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(2)).numpy()
    want = np.empty_like(x)
    monkeypatch.setattr(topk_select, "radix_kernel", lambda: None)  # as if numba were not installed
    monkeypatch.setattr(topk_select, "native_kernels", lambda: None)  # ... and no C compiler
    assert not topk_select.select_rows(x, want, 75).any()
    assert torch.equal(torch.from_numpy(want), abs_topk(torch.from_numpy(x), 0.25))
    monkeypatch.setattr(topk_select, "METHOD", "radix")
    with pytest.raises(RuntimeError, match="numba"):
        topk_select.select_rows(x, np.empty_like(x), 75)


def test_kernel_that_cannot_compile_falls_back_with_a_warning(monkeypatch):
    """numba present but unable to compile here: a warning naming the module and the cause, then the
    fallback serves (`inference.numba_kernels`, the one place every kernel is compiled)."""
    numba = pytest.importorskip("numba")
    from inference import numba_kernels

    def broken(*args, **kwargs):
        raise TypeError("no LLVM target for this machine")

    monkeypatch.setattr(numba, "njit", broken)
    with pytest.warns(UserWarning, match="inference.topk_select: numba kernel unavailable.*no LLVM target"):
        assert numba_kernels._build(topk_select._radix_select_rows, topk_select._warm_up, "inference.topk_select") is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("max_density", [1.0, 0.0])
def test_sparse_linear_columns_equal_dense_linear(bias, max_density):
    """`SparseLinear.columns(x)` (the fused block's way: sparse CSR W times x.T, or the dense matmul
    when the weight is too dense) is x @ W.T + b laid out one column per row, as F.linear computes it."""
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(40, 24, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=gen) < 0.1)
        if bias:
            lin.bias.normal_(generator=gen)
    x = torch.randn(13, 40, generator=gen) * (torch.rand(13, 40, generator=gen) < 0.3)
    want = torch.nn.functional.linear(x, lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
    model_like = torch.nn.Sequential(lin)
    accelerate(model_like, max_density=max_density)
    with torch.no_grad():
        got = lin.columns(x)
    assert got.shape == (24, 13)
    assert torch.allclose(got.t(), want, atol=1e-6)
    assert (lin.__dict__["_sparse_cache"][1] is not None) == (max_density == 1.0)


@pytest.mark.parametrize("sink", [True, False])
def test_sink_attention_into_a_strided_out_equals_its_result(sink):
    """`sink_attention(..., out=)` writes into a strided view (the circuit model's slice of a wider
    attention output) exactly what it returns without one, and checks against the plain softmax."""
    from inference.fast import sink_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=gen) for _ in "qkv")
    s = torch.randn(3, generator=gen) if sink else None
    want = sink_attention(q, k, v, s)
    wide = torch.full((2, 9, 3 * 4 + 5), 7.0)  # (B, T, H * d_head + 5 other channels)
    got = sink_attention(q, k, v, s, out=wide[..., :12].view(2, 9, 3, 4).transpose(1, 2))
    assert got.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[..., :12].view(2, 9, 3, 4).transpose(1, 2), want)
    assert torch.equal(wide[..., 12:], torch.full((2, 9, 5), 7.0))  # the rest untouched
    scores = (q @ k.transpose(-2, -1)) / 2.0
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    if sink:
        scores = torch.cat([s.view(1, -1, 1, 1).expand(2, 3, 9, 1), scores], -1)
    ref = torch.softmax(scores, -1)[..., 1:] @ v if sink else torch.softmax(scores, -1) @ v
    torch.testing.assert_close(want, ref, atol=1e-5, rtol=1e-5)


def _awkward_columns(d: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(d, n) columns whose rows (columns) mix every case AbsTopK must get right: shares of exact
    zeros from none to nearly all (so the radix select switches between its two histogram modes),
    -0.0, ties at the k-th value (values rounded to halves), inf, a NaN, fewer nonzeros than k."""
    x = torch.randn(n, d, generator=gen)
    zeros = torch.tensor([0.0, 0.6, 0.95, 0.3])[torch.arange(n) % 4].unsqueeze(1)
    x = x * (torch.rand(n, d, generator=gen) >= zeros)
    x[1::5] = torch.round(x[1::5] * 2) / 2  # ties
    x[2::7] = -x[2::7]  # -0.0 where zeroed
    x[3, 0], x[4, 1], x[6, 2] = float("inf"), float("-inf"), float("nan")
    x[5, : d - 2] = 0.0  # 2 nonzeros only
    return x.t().contiguous()


@pytest.mark.parametrize("impl", ["native", "numba"])
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("frac", [0.25, 0.5, None, 0.01])
def test_topk_columns_kernel_equals_abs_topk(parts, frac, impl, monkeypatch):
    """`inference.topk_columns` (its C kernel and its numba kernel): AbsTopK of each column of (d, n)
    (in `parts` equal parts), written as rows or as columns, is abs_topk's output bit for bit on
    every row it does not flag; the flagged rows are exactly those whose k-th |value| ties with a
    dropped one or that hold a NaN. n = 37 leaves a partial tile of columns; w = 48 is 3 blocks of
    16 features, 40 leaves a remainder."""
    from inference import native, topk_columns
    from inference.model import abs_topk

    if impl == "native":
        needs_native_select()
    else:
        pytest.importorskip("numba")
        monkeypatch.setattr(native, "ENABLED", False)
        monkeypatch.setattr(topk_select, "METHOD", "radix")
    assert (topk_columns.kernel() is topk_select.select_columns_native) == (impl == "native")
    gen = torch.Generator().manual_seed(7)
    w, n = (48, 37) if parts == 3 else (40, 37)
    hc = _awkward_columns(parts * w, n, gen)
    want = torch.stack([abs_topk(hc[s * w : (s + 1) * w].t(), frac) for s in range(parts)])  # (parts, n, w)
    out = torch.full((parts, n + 3, w), 5.0)
    redo = topk_columns.topk_rows(hc, [frac] * parts, out, 2)
    assert redo is not None and redo.shape == (n,)
    ok = torch.from_numpy(~redo)
    exact = dict(rtol=0, atol=0, equal_nan=True)  # (frac None keeps a NaN; +0.0 == -0.0 as in torch.equal)
    torch.testing.assert_close(out[:, 2 : n + 2][:, ok], want[:, ok], **exact)
    untouched = torch.cat([out[:, :2], out[:, n + 2 :]], 1)  # rows outside row0 .. row0 + n
    assert torch.equal(untouched, torch.full((parts, 3, w), 5.0))
    k = w if frac is None else int(frac * w)
    expect = torch.zeros(n, dtype=torch.bool)
    for s in range(parts):
        a = hc[s * w : (s + 1) * w].t().abs()
        if 0 < k < w:
            srt = a.sort(-1, descending=True).values
            expect |= (srt[:, k - 1] == srt[:, k]) & (srt[:, k - 1] > 0)
            expect |= a.isnan().any(-1)
    assert torch.equal(torch.from_numpy(redo), expect)
    if 0 < k < w:
        assert expect.sum() >= 2  # ties and the NaN were exercised
    if parts == 1:  # abs_topk_exact's radix select on the same rows (it redoes the flagged ones itself)
        torch.testing.assert_close(fast_module.abs_topk_exact(hc.t(), frac), want[0], **exact)
        cols, redo_c = topk_columns.topk_columns(hc, frac)
        assert np.array_equal(redo_c, redo)
        torch.testing.assert_close(cols.t()[ok], want[0][ok], **exact)


def test_topk_columns_not_applicable_returns_none(monkeypatch):
    """Switched off, numba missing (no kernel), or not float32: None, nothing written, so the block
    runs its torch code."""
    from inference import topk_columns

    hc = torch.randn(8, 5)
    out = torch.full((1, 5, 8), 3.0)
    assert topk_columns.topk_rows(hc.double(), [0.5], out.double(), 0) is None
    monkeypatch.setattr(topk_columns, "kernel", lambda: None)  # as if numba were not installed
    assert topk_columns.topk_rows(hc, [0.5], out, 0) is None and topk_columns.topk_columns(hc, 0.5) is None
    assert torch.equal(out, torch.full((1, 5, 8), 3.0))
    monkeypatch.undo()
    monkeypatch.setattr(topk_columns, "ENABLED", False)
    assert topk_columns.topk_rows(hc, [0.5], out, 0) is None


@pytest.mark.parametrize("variant", ["release_like", "afrac_all", "rmsnorm_nobias_relu_untied"])
def test_fused_block_with_and_without_the_topk_columns_kernel(variant, monkeypatch):
    """The fused block with its C kernels (norm + select, linear + select), with the column selects
    (C or numba) and the linears in torch, and with its torch fallback (the kernels switched off, or
    none built) gives the plain path's logits and recorded values; on the same inputs (layer 0) the
    column kernel selects exactly what the fallback does."""
    from inference import topk_columns

    monkeypatch.setattr(fast_module, "CHUNK_ROWS", 6)
    plain = sparsify(tiny_model(**VARIANTS[variant]), density=0.4)
    fast = accelerate(sparsify(tiny_model(**VARIANTS[variant]), density=0.4), max_density=1.0)
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["block_size"]), generator=torch.Generator().manual_seed(4))
    want_logits, want = all_hooks(plain, idx)
    calls = []  # (kernel, parts, whether the kernel wrote them)
    real_rows, real_linear, real_norm = topk_columns.topk_rows, topk_columns.linear_topk_rows, topk_columns.norm_topk_rows

    def spy_rows(hc, fracs, out, row0):
        redo = real_rows(hc, fracs, out, row0)
        calls.append(("columns", len(fracs), redo is not None))
        return redo

    def spy_linear(linear, x, fracs, out, row0=0, activation=None):
        redo = real_linear(linear, x, fracs, out, row0, activation) if mode == "C kernels" else None
        calls.append(("linear", len(fracs), redo is not None))
        return redo

    def spy_norm(norm, x, pos, frac, out, rstd=None):
        redo = real_norm(norm, x, pos, frac, out, rstd)
        calls.append(("norm", 1, redo is not None))
        return redo

    monkeypatch.setattr(topk_columns, "topk_rows", spy_rows)
    monkeypatch.setattr(topk_columns, "linear_topk_rows", spy_linear)
    monkeypatch.setattr(topk_columns, "norm_topk_rows", spy_norm)
    runs, hooks = {}, {}
    for mode in ("C kernels", "column kernel", "disabled", "no kernel"):
        if mode == "C kernels":
            needs_native_select()
        monkeypatch.setattr(topk_columns, "ENABLED", mode != "disabled")
        if mode == "no kernel":  # no C compiler, no numba
            monkeypatch.setattr(topk_columns, "kernel", lambda: None)
            monkeypatch.setattr(topk_columns, "native_kernels", lambda: None)
        got_logits, got = hooks[mode] = all_hooks(fast, idx)
        with torch.no_grad():
            runs[mode] = fast(idx)
        assert_close_to_scale(runs[mode], want_logits, (mode, "fused logits"))
        assert_close_to_scale(got_logits, want_logits, (mode, "logits"))
        for name in want:
            assert_close_to_scale(got[name], want[name], (mode, name))
        if mode == "C kernels":  # norms, q/k/v, both deltas and the MLP's neurons: one pass each, no column select
            assert {("norm", 1, True), ("linear", 3, True), ("linear", 1, True)} == set(calls), calls
        if mode == "column kernel":  # the kernel wrote q/k/v and the MLP's delta (not a silent fallback)
            assert {("columns", 3, True), ("columns", 1, True)} <= set(calls), calls
        calls.clear()
    assert torch.equal(runs["disabled"], runs["no kernel"])
    for name in ("0.attn.q", "0.attn.k", "0.attn.v", "0.mlp.post_act"):
        assert torch.equal(hooks["column kernel"][1][name], hooks["disabled"][1][name]), name
