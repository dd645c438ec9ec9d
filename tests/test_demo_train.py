"""Unit tests of the weight-sparsity step and schedules of pipeline.demo.train (no training)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.demo.profiles import get_profile
from pipeline.demo.train import density_at, sparsify_, unigram_xent


def test_sparsify_keeps_row_minimum_then_global_largest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    w[2] = w[2] * 1e-3  # a row of tiny weights: the global top-k alone would empty it
    original = w.clone()
    sparsify_(w, density=0.2, min_per_row=2)  # 12 kept of 60

    kept = w != 0
    assert int(kept.sum()) == 12
    assert (kept.sum(1) >= 2).all()
    assert torch.equal(w[kept], original[kept])  # kept values unchanged
    # Independent: each row's two largest |w|, then the 0 remaining by global magnitude
    # (12 = 6 rows * 2, so nothing else).
    expect = torch.zeros_like(kept)
    for r in range(6):
        expect[r, original[r].abs().argsort(descending=True)[:2]] = True
    assert torch.equal(kept, expect)

    w = original.clone()
    sparsify_(w, density=0.5, min_per_row=1)  # 30 kept: 6 row maxima + the 24 largest others
    kept = w != 0
    forced = torch.zeros_like(kept)
    forced[torch.arange(6), original.abs().argmax(1)] = True
    rest = original.abs().masked_fill(forced, -1).flatten().argsort(descending=True)[:24]
    expect = forced.clone()
    expect.view(-1)[rest] = True
    assert torch.equal(kept, expect)


def test_density_anneals_linearly_over_the_first_half():
    p = dataclasses.replace(get_profile("tiny"), steps=100, target_density=0.1, anneal_frac=0.5)
    assert density_at(0, p) == 1.0
    assert abs(density_at(25, p) - 0.55) < 1e-12
    assert density_at(50, p) == density_at(100, p) == 0.1


def test_unigram_xent_matches_hand_count():
    train = torch.tensor([0, 0, 1, 2])  # counts + 1: [3, 2, 2, 1] over 4 ids, total 8
    got = unigram_xent(train, torch.tensor([0, 3]), vocab_size=4)
    want = -(math.log(3 / 8) + math.log(1 / 8)) / 2
    assert abs(got - want) < 1e-12


def test_dense_baseline_stops_at_the_matched_loss():
    """`stop_at_xent`: training ends at the first `match_every`-th step whose held-out loss (the
    final windows) is at most the given one, and reports the steps it took."""
    import torch

    from pipeline.demo.train import eval_windows, evaluate, train

    p = dataclasses.replace(
        get_profile("tiny"), steps=60, eval_every=30, match_every=20, vocab_size=64, final_eval_windows=8, eval_windows=4
    )
    g = torch.Generator().manual_seed(0)
    train_stream, test_stream = torch.randint(1, 63, (4000,), generator=g), torch.randint(1, 63, (2000,), generator=g)
    never = train(p, train_stream, test_stream, sparse=False, stop_at_xent=0.0)
    assert never.steps == 60
    at_once = train(p, train_stream, test_stream, sparse=False, stop_at_xent=100.0)
    assert at_once.steps == 20 and at_once.curve[-1]["step"] == 20
    final_w = eval_windows(test_stream, p.block_size, p.final_eval_windows)
    assert at_once.final_test_xent == evaluate(at_once.model, final_w) <= 100.0


def test_paper_knobs_train_with_a_dense_bigram_table_and_cat_pos_emb():
    """The paper's options (bigram table kept dense, concatenated position embedding, Adam eps,
    LR x 1/sqrt(density)) train, and the sparsified matrices end with exactly the expected nonzeros."""
    import torch

    from pipeline.demo.train import expected_nonzeros, lr_at, sparse_param_names, train

    p = dataclasses.replace(get_profile("tiny"), steps=20, eval_every=10, vocab_size=64, final_eval_windows=4, eval_windows=4,
                            d_pos_emb=8, bigram_table=True, adam_eps=0.1, lr_density_scale=True, warmup_steps=2)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    result = train(p, torch.randint(1, 63, (3000,), generator=g), torch.randint(1, 63, (1000,), generator=g), sparse=True)
    names = sparse_param_names(result.model)
    assert "bigram_table" not in names and result.model.config.d_pos_emb == 8
    assert result.nonzero_weights == expected_nonzeros(result.model, p, sparse=True)
    assert torch.count_nonzero(result.model.bigram_table) > 0.5 * result.model.bigram_table.numel()  # learned, dense
    # the LR of the last step: the schedule's value over sqrt(the density then)
    assert result.curve[-1]["lr"] == pytest.approx(lr_at(p.steps - 1, p) / math.sqrt(p.target_density))
