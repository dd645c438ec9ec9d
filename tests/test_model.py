"""Logits of every model variant against an independent reference forward pass.

The reference below is written from checkpoint-format.md with plain tensor ops in float64,
reading only the state dict (loaded from the saved file, not from the model object).
"""

import math

import pytest
import torch

from inference import GPT, GPTConfig, load_model
from inference.loader import save_model

BASE = dict(block_size=12, vocab_size=37, n_layer=2, n_head=2, d_head=4, d_model=12, d_mlp=20)
ALL_LOCTYPES = "attn_in,attn_q,attn_k,attn_v,attn_out,mlp_in,mlp_neuron,mlp_out,resid_post_attn,resid_post_mlp"

VARIANTS = {
    "layernorm_gelu_tied": {},
    "rmsnorm_nobias_relu_untied": dict(rms_norm=True, bias=False, activation_type="relu", tied_unembed=False),
    "layernorm_no_ln_bias": dict(ln_bias=False),
    "residual_relu": dict(residual_activation_type="relu"),
    **{f"afrac_{loc}": dict(afrac=0.5, afrac_loctypes=loc) for loc in ALL_LOCTYPES.split(",")},
    "afrac_all": dict(afrac=0.25, afrac_loctypes=ALL_LOCTYPES, rms_norm=True),
    "cat_pos_emb_learned": dict(d_pos_emb=4),
    "cat_pos_emb_sinusoidal": dict(d_pos_emb=6, sinusoidal_cat_pos_emb=True, afrac=0.5),
    "sink": dict(sink=True),
    "bigram_learnable": dict(enable_bigram_table=True, learnable_bigram_table=True),
    "bigram_fixed": dict(enable_bigram_table=True),
    "release_like": dict(
        rms_norm=True,
        sink=True,
        d_pos_emb=4,
        enable_bigram_table=True,
        learnable_bigram_table=True,
        tied_unembed=False,
        afrac=0.5,
        afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q",
    ),
}


def tiny_model(seed=0, **overrides) -> GPT:
    """A tiny GPT with every parameter and buffer random (init leaves norms at 1, biases at 0)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**BASE, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "transformer.wpe.weight" and model.config.sinusoidal_cat_pos_emb:
                continue
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 1 / math.sqrt(p.shape[-1])))
        if model.config.enable_bigram_table and not model.config.learnable_bigram_table:
            model.bigram_table.copy_(torch.randn_like(model.bigram_table) * 0.3)
    return model.eval()


# ---- the reference ------------------------------------------------------------------------
def ref_topk(x, frac):
    k = int(frac * x.shape[-1])
    kth = x.abs().topk(k, dim=-1).values[..., -1:]
    return x * (x.abs() >= kth)


def ref_forward(cfg: dict, sd: dict, idx: torch.Tensor) -> torch.Tensor:
    c = {**GPTConfig().to_dict(), **cfg}
    sd = {k: v.double() for k, v in sd.items()}
    L, H, dh = c["n_layer"], c["n_head"], c["d_head"] or c["d_model"] // c["n_head"]
    locs = set(c["afrac_loctypes"].split(",")) if c["afrac"] else set()

    def sparse(x, loc):
        return ref_topk(x, c["afrac"]) if loc in locs else x

    def norm(x, prefix):
        w = sd[prefix + ".weight"]
        if c["rms_norm"]:
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps) * w
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w
        return y + sd[prefix + ".bias"] if c["ln_bias"] else y

    def linear(x, prefix):
        return torch.nn.functional.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx]
    pos = sd["transformer.wpe.weight"][:T]
    if not c["d_pos_emb"]:
        x = x + pos
    for i in range(L):
        p = f"transformer.h.{i}"
        h = norm(x, f"{p}.ln_1")
        if c["d_pos_emb"]:
            h = torch.cat([h, norm(pos, f"{p}.ln_p1").expand(B, T, -1)], -1)
        h = sparse(h, "attn_in")
        qkv = linear(h, f"{p}.attn.c_attn")
        q, k, v = (sparse(t, loc) for t, loc in zip(qkv.chunk(3, -1), ("attn_q", "attn_k", "attn_v"), strict=True))
        heads = []
        for hd in range(H):
            sl = slice(hd * dh, (hd + 1) * dh)
            scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)  # (B, T, T)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            vals = v[..., sl]
            if c["sink"]:
                sink = sd[f"{p}.attn.attn_imp.sink_logit"][hd].expand(B, T, 1)
                scores = torch.cat([sink, scores], -1)
                vals = torch.cat([torch.zeros(B, 1, dh, dtype=vals.dtype), vals], 1)
            heads.append(torch.softmax(scores, -1) @ vals)
        x = x + sparse(linear(torch.cat(heads, -1), f"{p}.attn.c_proj"), "attn_out")
        if c["residual_activation_type"] == "relu":
            x = x.clamp(min=0)
        x = sparse(x, "resid_post_attn")
        h = norm(x, f"{p}.ln_2")
        if c["d_pos_emb"]:
            h = torch.cat([h, norm(pos, f"{p}.ln_p2").expand(B, T, -1)], -1)
        h = linear(sparse(h, "mlp_in"), f"{p}.mlp.c_fc")
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2))) if c["activation_type"] == "gelu" else h.clamp(min=0)
        x = x + sparse(linear(sparse(h, "mlp_neuron"), f"{p}.mlp.c_proj"), "mlp_out")
        if c["residual_activation_type"] == "relu":
            x = x.clamp(min=0)
        x = sparse(x, "resid_post_mlp")
    unembed = sd["transformer.wte.weight"] if c["tied_unembed"] else sd["lm_head.weight"]
    logits = norm(x, "transformer.ln_f") @ unembed.T + sd["final_logits_bias"]
    if c["enable_bigram_table"]:
        logits = logits + sd["bigram_table"][idx]
    return logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference(variant, tmp_path):
    model = tiny_model(**VARIANTS[variant])
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    sd = torch.load(tmp_path / "final_model.pt", weights_only=True)
    cfg = {k: v for k, v in model.config.to_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for T in (1, 7, BASE["block_size"]):
        idx = torch.randint(0, BASE["vocab_size"], (3, T), generator=gen)
        with torch.no_grad():
            got = loaded(idx)
        want = ref_forward(cfg, sd, idx)
        assert got.shape == (3, T, BASE["vocab_size"])
        assert got.dtype == torch.float32
        assert (got.double() - want).abs().max().item() <= 1e-5, (variant, T)


def test_sinusoidal_table_is_fixed_sinusoid():
    model = tiny_model(d_pos_emb=6, sinusoidal_cat_pos_emb=True)
    n, half = BASE["block_size"], 3
    periods = [4 * (n / 4) ** (j / (half - 1)) for j in range(half)]
    want = torch.tensor(
        [[math.sin(2 * math.pi * t / P) for P in periods] + [math.cos(2 * math.pi * t / P) for P in periods] for t in range(n)]
    )
    assert torch.allclose(model.transformer.wpe.weight, want.float(), atol=1e-6)


@pytest.mark.parametrize("variant", ["layernorm_gelu_tied", "rmsnorm_nobias_relu_untied", "afrac_all", "cat_pos_emb_learned"])
def test_sdpa_and_explicit_attention_agree(variant, tmp_path):
    save_model(tiny_model(**VARIANTS[variant]), tmp_path)
    sdpa, explicit = load_model(tmp_path), load_model(tmp_path, attention="explicit")
    assert sdpa.config.flash and not explicit.config.flash
    idx = torch.randint(0, BASE["vocab_size"], (2, BASE["block_size"]))
    with torch.no_grad():
        assert (sdpa(idx) - explicit(idx)).abs().max().item() <= 1e-5


def test_loss_is_cross_entropy_with_ignore_index():
    model = tiny_model()
    idx = torch.randint(0, BASE["vocab_size"], (2, 5))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    logits, loss = model(idx, targets)
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    want = -logp.gather(-1, targets[:, :-1, None]).mean()
    assert abs(loss.item() - want.item()) < 1e-5


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, BASE["block_size"] + 1, dtype=torch.long))


@pytest.mark.parametrize("variant", ["layernorm_gelu_tied", "release_like"])
def test_forward_from_a_recorded_residual_skips_the_blocks_before(variant):
    """`start=(layer, x)`: the forward from the residual entering `layer` gives the full forward's
    logits (the same values through the same ops) and calls no hook point before that layer."""
    from inference import record

    model = tiny_model(**VARIANTS[variant]).eval()
    idx = torch.randint(1, BASE["vocab_size"], (2, BASE["block_size"]))
    with torch.no_grad(), record(r"1\.resid_in") as rec:
        full = model(idx)
    with torch.no_grad(), record(r".*") as seen:
        part = model(idx, start=(1, rec["1.resid_in"]))
    assert torch.equal(part, full)
    assert not any(name.startswith("0.") for name in seen) and "1.resid_in" in seen
    with torch.no_grad():  # a different residual changes the logits: it is really used
        assert not torch.allclose(model(idx, start=(1, torch.randn_like(rec["1.resid_in"]))), full)
    with pytest.raises(ValueError, match="start state"):
        model(idx, start=(1, rec["1.resid_in"][:1]))
