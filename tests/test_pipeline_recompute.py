"""`pipeline.recompute.recompute`: its per-node ablation losses (circuit-only model on the fast
path) against the stored numbers of the fixture circuits (made by the reference per-node loop of
full-size forwards) and, for a model with AbsTopK everywhere, against that loop run here."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from fixtures_viz import FIXTURE_MODEL, FIXTURE_RUNS

from inference import GPT, load_model
from inference import circuit as C
from inference.fast import is_accelerated
from pipeline.formats import read_viz_data
from pipeline.recompute import (
    MIN_ABLATION_PAIRS,
    ablation_pairs,
    means_over_sequences,
    pair_chunks,
    paired_estimate,
    recompute,
    snippet_sequences,
    t_quantile_999,
    within,
)


def _viz(viz_store, run_id):
    return read_viz_data(viz_store / "viz" / run_id / FIXTURE_RUNS[run_id]["file"])


@pytest.mark.parametrize("run_id", list(FIXTURE_RUNS))
def test_recomputed_mean_ablations_equal_the_stored_reference_loop(viz_store, run_id):
    viz = _viz(viz_store, run_id)
    model = load_model(viz_store / "models" / FIXTURE_MODEL)
    r = recompute(model, viz, modes=("mean",))
    assert is_accelerated(model)  # the pipeline ran the fast path
    for loc, stored in viz.ch_interv_losses.items():
        got = r.ablation["mean"][loc]
        assert got.shape == np.shape(stored)
        np.testing.assert_allclose(got, stored, atol=1e-5, rtol=0, err_msg=loc)  # (the issue asks 1e-4)
    spread = np.concatenate([np.asarray(v) for v in viz.ch_interv_losses.values()])
    assert spread.max() - spread.min() > 5e-5  # the nodes' ablations differ (> the tolerance)


def test_recomputed_ablations_with_abs_topk_equal_the_reference_loop(viz_store):
    """The fixture model rebuilt with AbsTopK at every location type: the circuit-only model's
    thresholds at work. Both modes against `inference.circuit.ablation_losses` on a plain model."""
    run_id = "fixture_a/quotes/prune_v4/k_optim"
    viz = _viz(viz_store, run_id)
    fixture = load_model(viz_store / "models" / FIXTURE_MODEL)
    cfg = dataclasses.replace(
        fixture.config, afrac=0.5, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_q,attn_k,attn_v"
    )

    def topk_model():
        m = GPT(cfg).eval()
        m.load_state_dict(fixture.state_dict())
        return m

    r = recompute(topk_model(), viz)
    plain = topk_model()
    docs = torch.from_numpy(viz.docs)
    docs = docs[:, : int(viz.doc_lengths().max())]
    circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items()}
    means, _ = means_over_sequences(plain, snippet_sequences(viz))
    for mode in ("mean", "zero"):
        want = C.ablation_losses(plain, docs, circuit, means, mode=mode)
        for loc in want:
            np.testing.assert_allclose(r.ablation[mode][loc], want[loc].numpy(), atol=1e-5, rtol=0, err_msg=(mode, loc))
    means_all, zeros_all = (np.concatenate(list(r.ablation[mode].values())) for mode in ("mean", "zero"))
    assert np.abs(means_all - zeros_all).max() > 1e-3  # the modes differ (>> the tolerance)
    assert means_all.max() - means_all.min() > 1e-3  # and so do the nodes


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_chunked_recompute_equals_one_pass_of_the_plain_model(viz_store, device):
    """Docs in chunks of one pair, only circuit channels recorded and spilled: activations and
    losses equal those of the plain dense model on the CPU over all docs at once (whole hook
    tensors), and the ablations equal an unchunked recompute. `device`: where the recompute runs
    (CIRCUITS_DEVICE)."""
    run_id = "fixture_a/quotes/prune_v4/k_optim"
    viz = _viz(viz_store, run_id)
    assert viz.docs.shape[0] >= 4  # at least two chunks of one pair
    plain = load_model(viz_store / "models" / FIXTURE_MODEL)
    lines = []
    one_pair = 2 * int(viz.doc_lengths().max())  # tokens: every chunk holds one pair
    r = recompute(load_model(viz_store / "models" / FIXTURE_MODEL, device=device), viz, log=lines.append, chunk_tokens=one_pair)
    n_chunks = len([line for line in lines if line.startswith("chunk of ")])
    left = [line for line in lines if re.fullmatch(r"ablations: \d+ of \d+ chunks in \d+ s, about \d+ min left", line)]
    assert (
        n_chunks == viz.docs.shape[0] // 2 and len(left) == n_chunks - 1
    )  # the time left, after every ablated chunk but the last
    whole = recompute(load_model(viz_store / "models" / FIXTURE_MODEL, device=device), viz, chunk_tokens=10**9)
    ctx = int(viz.doc_lengths().max())
    docs = torch.from_numpy(viz.docs)[:, :ctx]
    circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items()}
    means, _ = means_over_sequences(plain, snippet_sequences(viz), C.circuit_locations(plain.config, circuit))
    with torch.no_grad(), C.record(".*") as full:
        loss = C.task_loss(plain(docs), docs).item()
    masks = C.circuit_masks(plain.config, circuit)
    with torch.no_grad(), C.record(".*") as circ:
        interv = C.task_loss(C.masked_forward(plain, docs, masks, means), docs).item()
    assert r.loss == pytest.approx(loss, abs=1e-6) and r.interv_loss == pytest.approx(interv, abs=1e-6)
    # Each chunk runs up to its own longest doc (the model is causal: padding after it changes
    # nothing before it), so the activations are compared at every doc's own positions.
    real = np.arange(viz.docs.shape[1])[None, :] < viz.doc_lengths()[:, None]
    assert (~real[:, :ctx]).any()  # the fixture has docs shorter than the longest: the cut is exercised
    for loc, ch, _ in viz.nodes():
        for got, want in ((r.full_acts, full), (r.circuit_acts, circ)):
            np.testing.assert_allclose(got[(loc, ch)][real], want[loc][..., ch].numpy()[real[:, :ctx]], atol=1e-5, err_msg=loc)
        assert not r.full_acts[(loc, ch)][:, ctx:].any()  # padding positions past the longest doc
    for mode in ("mean", "zero"):
        for loc in whole.ablation[mode]:
            np.testing.assert_allclose(r.ablation[mode][loc], whole.ablation[mode][loc], atol=1e-6, err_msg=(mode, loc))
    for x in (r, whole):
        x.full_acts.close()
        x.circuit_acts.close()


def test_means_on_a_token_budget_with_standard_errors(viz_store):
    """A budget below the snippets' tokens samples whole snippets (fixed seed); the means and
    standard errors equal a direct numpy computation over those snippets' hook tensors."""
    from pipeline.recompute import sample_sequences

    viz = _viz(viz_store, "fixture_a/quotes/prune_v4/k_optim")
    model = load_model(viz_store / "models" / FIXTURE_MODEL)
    seqs = snippet_sequences(viz)
    total = sum(len(s) for s in seqs)
    budget = total // 3
    sample = sample_sequences(seqs, budget)
    assert 1 < len(sample) < len(seqs) and sum(len(s) for s in sample) <= budget
    assert [s.tolist() for s in sample_sequences(seqs, budget)] == [s.tolist() for s in sample]  # fixed seed
    loc = "0.mlp.post_act"
    means, n, se = means_over_sequences(model, sample, [loc], with_se=True)
    per_seq, w = [], []
    for s in sample:
        with torch.no_grad(), C.record(loc) as rec:
            model(s[None, : model.config.block_size])
        per_seq.append(rec[loc][0].double().mean(0).numpy())
        w.append(min(len(s), model.config.block_size))
    per_seq, w = np.stack(per_seq), np.asarray(w, dtype=np.float64)[:, None]
    mu = (per_seq * w).sum(0) / w.sum()
    want_se = np.sqrt((w**2 * (per_seq - mu) ** 2).sum(0)) / w.sum()
    assert n == int(w.sum())
    np.testing.assert_allclose(means[loc].numpy(), mu, atol=1e-6)
    np.testing.assert_allclose(se[loc].numpy(), want_se, atol=1e-6)
    assert se[loc].max() > 0


def test_ablations_on_a_sample_of_pairs_with_standard_errors(viz_store):
    """A budget below the circuit's work ablates a fixed-seed sample of pairs: each node's loss is
    the circuit loss over every pair plus the mean paired difference over the sampled pairs, its
    standard error that of a simple random sample without replacement, both checked against the
    reference per-node loop of full-size forwards on every pair."""
    run_id = "fixture_a/quotes/prune_v4/k_optim"
    viz = _viz(viz_store, run_id)
    n_pairs = viz.docs.shape[0] // 2
    r = recompute(load_model(viz_store / "models" / FIXTURE_MODEL), viz, ablation_budget=1)
    sample = r.ablated_pairs
    assert len(sample) == MIN_ABLATION_PAIRS < n_pairs == r.task_pairs
    again = recompute(load_model(viz_store / "models" / FIXTURE_MODEL), viz, ablation_budget=1, modes=("mean",))
    assert again.ablated_pairs == sample  # fixed seed: the same pairs every run

    plain = load_model(viz_store / "models" / FIXTURE_MODEL)
    docs = torch.from_numpy(viz.docs)[:, : int(viz.doc_lengths().max())]
    circuit = {loc: torch.from_numpy(ch) for loc, ch in viz.circuit.items()}
    means, _ = means_over_sequences(plain, snippet_sequences(viz), C.circuit_locations(plain.config, circuit))
    masks = C.circuit_masks(plain.config, circuit)
    with torch.no_grad():
        circ = C.task_loss(C.masked_forward(plain, docs, masks, means), docs, per_pair=True).double().numpy()
    assert r.interv_loss == pytest.approx(circ.mean(), abs=1e-6)
    k, fpc = len(sample), 1 - len(sample) / n_pairs
    some_se = False
    for mode in ("mean", "zero"):
        ref = C.ablation_losses(plain, docs, circuit, means, mode=mode, per_pair=True)
        for loc, per_pair in ref.items():
            for i, row in enumerate(per_pair.numpy()):
                d = [row[j] - circ[j] for j in sample]
                mean = sum(d) / k
                se = (sum((x - mean) ** 2 for x in d) / (k - 1) / k * fpc) ** 0.5
                assert r.ablation[mode][loc][i] == pytest.approx(circ.mean() + mean, abs=1e-5), (mode, loc, i)
                assert r.ablation_se[mode][loc][i] == pytest.approx(se, abs=1e-5), (mode, loc, i)
                some_se |= se > 1e-4
    assert some_se  # the pairs disagree somewhere (> the 1e-5 compared at): the standard errors are exercised
    exact = recompute(load_model(viz_store / "models" / FIXTURE_MODEL), viz, modes=("mean",))
    assert exact.ablated_pairs == list(range(n_pairs))
    assert all((se == 0).all() for se in exact.ablation_se["mean"].values())
    for x in (r, again, exact):
        x.full_acts.close()
        x.circuit_acts.close()


def test_pair_sample_is_a_simple_random_sample_sized_by_the_budget():
    lengths = torch.tensor([10, 20, 30, 40, 50, 12, 22, 32, 42, 52])  # 5 pairs: (10, 12), (20, 22), ...
    tokens = [22, 42, 62, 82, 102]  # mean 62
    assert ablation_pairs(lengths, 3, 0) == [0, 1, 2, 3, 4]  # 0: every pair
    assert ablation_pairs(lengths, 3, 3 * sum(tokens)) == [0, 1, 2, 3, 4]  # fits exactly
    picked = ablation_pairs(lengths, 3, 3 * sum(tokens) - 1)
    assert len(picked) == 4  # floor((3 x 310 - 1) / (3 x 62))
    assert picked == sorted(set(picked)) == ablation_pairs(lengths, 3, 3 * sum(tokens) - 1)  # fixed seed
    assert len(ablation_pairs(lengths, 3, 3 * 62 * 2)) == 2  # two pairs' worth of the mean
    assert len(ablation_pairs(lengths, 3, 1)) == MIN_ABLATION_PAIRS  # the minimum, whatever the budget
    # Which pairs: the seed's, whatever their lengths (a cut where the budget runs out would skip the
    # long ones): pairs of very unequal lengths with the same mean give the same sample.
    other = torch.tensor([1, 1, 1, 1, 152, 1, 1, 1, 1, 150])  # tokens 2, 2, 2, 2, 302: mean 62
    assert ablation_pairs(other, 3, 3 * sum(tokens) - 1) == picked
    n = 50
    many = torch.randint(5, 500, (2 * n,), generator=torch.Generator().manual_seed(1))
    per_pair = (many[:n] + many[n:]).double()
    sample = ablation_pairs(many, 10, int(10 * per_pair.sum() * 0.3))
    assert len(sample) == 15  # 30% of the mean work: 15 of 50 pairs


def test_pair_chunks_cover_each_pair_once_within_the_token_bound():
    lengths = torch.tensor([5, 9, 3, 30, 7, 6, 8, 4, 31, 2])  # 5 pairs; pair j's longer doc
    half = 5
    for bound in (1, 20, 40, 64, 10**6):
        chunks = pair_chunks(lengths, range(half), bound)
        firsts = [int(j) for c in chunks for j in c[: len(c) // 2]]
        assert sorted(firsts) == list(range(half))  # every pair once
        for c in chunks:
            n = len(c) // 2
            assert (c[n:] == c[:n] + half).all()  # first docs, then their partners in the same order
            width = int(lengths[c].max())
            assert n == 1 or len(c) * width <= bound  # within the bound unless one pair alone exceeds it
    assert len(pair_chunks(lengths, range(half), 10**6)) == 1
    assert len(pair_chunks(lengths, range(half), 1)) == half
    assert pair_chunks(lengths, [3, 1], 10**6)[0].tolist() == [1, 3, 6, 8]  # by length: pair 1 (9), pair 3 (30)


def test_paired_estimate_and_agreement_with_sampling_error():
    rng = np.random.default_rng(0)
    circuit = rng.normal(1.0, 0.2, 6)
    ablated = circuit[None, :] + rng.normal(0.3, 0.1, (4, 6))
    mean, se = paired_estimate(ablated, circuit, 6)  # every pair: exact
    np.testing.assert_allclose(mean, ablated.mean(axis=1) - circuit.mean(), atol=1e-12)
    assert (se == 0).all()
    mean, se = paired_estimate(ablated, circuit, 60)  # 6 of 60 pairs
    d = ablated - circuit
    np.testing.assert_allclose(se, np.sqrt(d.var(axis=1, ddof=1) / 6 * (1 - 6 / 60)), atol=1e-12)
    assert t_quantile_999(1) == 636.62 and t_quantile_999(11) == t_quantile_999(10) > t_quantile_999(12) > 3.29 == t_quantile_999(
        500
    )
    # tolerance alone; then a sampled estimate: within t(k - 1) standard errors more
    assert within(1.0, 1.0005, 1e-3) and not within(1.0, 1.1, 1e-3)
    assert within(1.0, 1.1, 1e-3, se=0.1 / 5.0, pairs=9)  # t(8) = 5.04 > 5 SEs + tolerance
    assert not within(1.0, 1.1, 1e-3, se=0.1 / 6.0, pairs=9)  # 6 SEs


def test_ablation_modes_side_by_side_equal_one_after_the_other(viz_store, monkeypatch):
    """With a torch thread per mode, a chunk's mean and zero ablations run on threads of their own
    (one torch thread each, half the per-pass batch): the same losses as the modes run in turn."""
    import threading

    from inference import circuit_model as CM
    from pipeline import recompute as R

    viz = _viz(viz_store, "fixture_a/quotes/prune_v4/k_optim")
    model = load_model(viz_store / "models" / FIXTURE_MODEL)
    R.accelerate(model)
    run = R._Run(model, viz, 10**9, 0, None)
    docs = run.docs_of(run.chunks[0])
    means, _ = means_over_sequences(model, snippet_sequences(viz), run.locations)
    frozen = C.frozen_norm_scales(model, docs)
    seen = []
    real = CM.fast_ablation_losses
    monkeypatch.setattr(
        CM, "fast_ablation_losses", lambda *a, **k: seen.append((threading.current_thread().name, k["batch"])) or real(*a, **k)
    )
    got = {}
    for threads in (1, 2):
        monkeypatch.setattr(R.torch, "get_num_threads", lambda n=threads: n)
        with torch.no_grad():
            got[threads] = R._chunk_ablations(run, docs, means, frozen, ("mean", "zero"), first=False)
    (main_mean, batch), (main_zero, _), *side = seen
    assert main_mean == main_zero == threading.current_thread().name  # one torch thread: in turn
    assert len(side) == 2 and all(name.startswith("ablations") and b == max(1, batch // 2) for name, b in side)
    for mode in ("mean", "zero"):
        for loc, v in got[1][mode].items():
            np.testing.assert_allclose(got[2][mode][loc], v, atol=1e-6, err_msg=(mode, loc))
