"""Hook points: names and shapes of the spec, interventions, and thread independence."""

import threading

import torch
from test_model import tiny_model

from inference import intervene, record

B, T = 2, 5
SPEC_POINTS = {
    "resid_in": "d_model",
    "attn.act_in": "d_model_in",
    "attn.q": "d_attn",
    "attn.k": "d_attn",
    "attn.v": "d_attn",
    "attn.y": "d_attn",
    "attn.resid_delta": "d_model",
    "resid_mid": "d_model",
    "mlp.act_in": "d_model_in",
    "mlp.post_act": "d_mlp",
    "mlp.resid_delta": "d_model",
}


def test_hook_names_and_shapes_two_layers():
    model = tiny_model(d_model=12, n_head=3, d_head=2, d_mlp=20)  # d_attn = 6 differs from d_model
    idx = torch.randint(0, 37, (B, T))
    with record(r".*") as rec, torch.no_grad():
        model(idx)
    cfg = model.config
    want = {f"{i}.{p}": (B, T, getattr(cfg, w)) for i in range(2) for p, w in SPEC_POINTS.items()}
    want["final_resid"] = (B, T, cfg.d_model)
    rstd = {f"{i}.ln_{j}.rstd" for i in range(2) for j in (1, 2)} | {"ln_f.rstd"}  # documented extras
    assert set(rec) == set(want) | rstd
    assert {k: tuple(v.shape) for k, v in rec.items() if k in want} == want
    assert all(rec[k].shape == (B, T, 1) for k in rstd)
    with record(r"\d+\.attn\.[qkv]") as rec, torch.no_grad():
        model(idx)
    assert set(rec) == {f"{i}.attn.{x}" for i in range(2) for x in "qkv"}


def test_hook_values_are_what_flows():
    model = tiny_model()
    idx = torch.randint(0, 37, (B, T))
    with record(r"\d+\.(resid_in|resid_mid|attn\.resid_delta|mlp\.resid_delta)|final_resid") as r, torch.no_grad():
        model(idx)
    assert torch.allclose(r["0.resid_mid"], r["0.resid_in"] + r["0.attn.resid_delta"])
    assert torch.allclose(r["1.resid_in"], r["0.resid_mid"] + r["0.mlp.resid_delta"])
    assert torch.allclose(r["final_resid"], r["1.resid_mid"] + r["1.mlp.resid_delta"])


def test_zeroing_neuron_by_intervention_equals_zeroing_weights():
    for activation in ("gelu", "relu"):
        model = tiny_model(activation_type=activation)
        idx = torch.randint(0, 37, (B, T))
        with record("1.mlp.post_act") as rec, torch.no_grad():
            model(idx)
        n = int(rec["1.mlp.post_act"].abs().sum((0, 1)).argmax())  # a neuron that is active here

        def kill(t, n=n):
            t = t.clone()
            t[..., n] = 0
            return t

        with intervene({"1.mlp.post_act": kill}), torch.no_grad():
            ablated = model(idx)
        with torch.no_grad():
            baseline = model(idx)
            model.transformer.h[1].mlp.c_fc.weight[n] = 0
            model.transformer.h[1].mlp.c_fc.bias[n] = 0
            edited = model(idx)
        assert (ablated - baseline).abs().max() > 1e-4  # the neuron mattered
        assert torch.allclose(ablated, edited, atol=1e-6)


def test_interventions_compose_and_recorders_see_result():
    model = tiny_model()
    idx = torch.randint(0, 37, (B, T))
    with (
        intervene({"0.attn.q": lambda t: t * 2}),
        intervene({r"0\.attn\.q": lambda t: t + 1}, regex=True),
        record("0.attn.q") as rec,
    ):
        with torch.no_grad():
            model(idx)
    with record("0.attn.q") as plain, torch.no_grad():
        model(idx)
    assert torch.allclose(rec["0.attn.q"], plain["0.attn.q"] * 2 + 1)


def test_two_threads_record_their_own_tensors():
    model = tiny_model()
    idx = {"a": torch.randint(0, 37, (B, T)), "b": torch.randint(0, 37, (B, T))}
    patterns = {"a": r"0\.mlp\..*", "b": r"1\.attn\.[qk]"}
    expected = {}
    for name in idx:
        with record(patterns[name]) as rec, torch.no_grad():
            model(idx[name])
        expected[name] = rec
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def rendezvous(t):  # both threads wait here, mid-forward, so their passes truly overlap
        barrier.wait()
        return t

    def run(name):
        try:
            with intervene({"0.resid_mid": rendezvous}), record(patterns[name]) as rec, torch.no_grad():
                model(idx[name])
            results[name] = rec
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in idx]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in idx:
        assert set(results[name]) == set(expected[name])
        assert all(torch.equal(results[name][k], expected[name][k]) for k in expected[name])


def test_hook_names_lists_every_hook_point_in_forward_order():
    model = tiny_model()
    with record(r".*") as rec, torch.no_grad():
        model(torch.randint(0, 37, (B, T)))
    assert list(rec) == list(model.hook_names)  # dict insertion order = the order hook() ran


def test_misspelled_names_raise_with_close_names():
    import pytest

    from inference.hooks import HookNameError

    model = tiny_model()
    idx = torch.randint(0, 37, (B, T))
    with pytest.raises(HookNameError, match=r"'0\.mlp\.postact' matches no hook point.*0\.mlp\.post_act"):
        with record("0.mlp.postact"), torch.no_grad():
            model(idx)
    with pytest.raises(HookNameError, match=r"intervention '0\.mlp\.post-act'.*0\.mlp\.post_act"):
        with intervene({"0.mlp.post-act": lambda t: t * 0}), torch.no_grad():
            model(idx)
    with pytest.raises(HookNameError, match=r"'7\.attn\.q'"):  # a layer the 2-layer model lacks
        with intervene({"0.attn.q": lambda t: t, "7.attn.q": lambda t: t}), torch.no_grad():
            model(idx)
    # patterns that match something are fine, also when other hooks of the context match nothing else
    with record(r"\d+\.attn\.q") as rec, intervene({"1.mlp.post_act": lambda t: t}), torch.no_grad():
        model(idx)
    assert set(rec) == {"0.attn.q", "1.attn.q"}


def test_record_into_callback_keeps_what_the_caller_selects():
    """`record(into=...)` hands each matching tensor to the callback and keeps nothing itself;
    keeping two channels gives the same values as a plain recording, on the plain and fast paths."""
    from inference.fast import accelerate

    model = tiny_model(d_model=12, n_head=3, d_head=2, d_mlp=20)
    idx = torch.randint(0, 37, (B, T))
    with record(r"\d+\.mlp\.post_act") as full, torch.no_grad():
        model(idx)
    for m in (model, accelerate(tiny_model(d_model=12, n_head=3, d_head=2, d_mlp=20))):
        m.load_state_dict(model.state_dict())
        kept = {}
        with (
            record(r"\d+\.mlp\.post_act", into=lambda name, t, kept=kept: kept.setdefault(name, t[..., [3, 7]].clone())) as rec,
            torch.no_grad(),
        ):
            m(idx)
        assert rec == {}
        assert sorted(kept) == sorted(full)
        for name, t in kept.items():
            torch.testing.assert_close(t, full[name][..., [3, 7]])
