"""Fixtures: small circuit stores in the released viz_data format, and tables built from them.

`viz_store` (session): a store in the released layout, built in seconds:
- `tinypython/encoder.json`, `vocab.bpe`: a data-gym BPE of 2048 ids (256 bytes, 1791 merges of
  printable byte pairs, `<|endoftext|>` = 2047), the tinypython_2k shape;
- `models/fixture_a/beeg_config.json` + `final_model.pt`: a random 2-layer GPT with mostly-zero
  weights (one unknown config key, as released configs have);
- `train_curves/fixture_a/progress.json`;
- three circuits under `viz/fixture_a/<task>/prune_v4/<k>/`, whose every number comes from REAL
  forward passes of that model (`inference.circuit`, the reference implementation):
  * `quotes/prune_v4/4/viz_data.pt`: stored activations are the circuit model's; pair_data as tensors;
  * `quotes/prune_v4/k_optim/viz_data.pkl`: stored activations are the full model's; pair_data
    nested one level (per worker) and holding numpy arrays; sample channels as 0-d tensors and
    tokens as floats;
  * `brackets/prune_v4/6/viz_data.pt`: pair_data as numpy arrays (needs the numpy allow-list).
  Node means are over the distinct `samples` snippets (pretraining text), as the pipeline's.

`circuits_data` (session): a data dir with `tables/` and `circuits.duckdb` materialized by the
pipeline from `viz_store` (every asset, recompute included). `tables_dir` = its `tables/`.

`FIXTURE_RUNS` describes the circuits for tests (run_id -> facts).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

__all__ = [
    "viz_store",
    "circuits_data",
    "tables_dir",
    "build_viz_store",
    "FIXTURE_RUNS",
    "FIXTURE_MODEL",
    "FIXTURE_CONFIG",
    "release_store",
    "release_data",
    "build_release_store",
    "RELEASE_RUNS",
    "RELEASE_MODEL",
    "PARTIAL_MODEL",
    "UNKNOWN_LOCATION",
]

FIXTURE_MODEL = "fixture_a"
FIXTURE_CONFIG = dict(
    block_size=32, vocab_size=2048, n_layer=2, n_head=2, d_head=4, d_model=16, d_mlp=32,
    bias=True, activation_type="gelu", tokenizer_name="tinypython_2k", pfrac=0.5,
)  # fmt: skip
FIXTURE_RUNS = {
    "fixture_a/quotes/prune_v4/4": dict(file="viz_data.pt", stored_acts="circuit", seed=1, n_nodes=10),
    # A larger k of the same task: its circuit contains the k=4 one (shared nodes, as in the release).
    "fixture_a/quotes/prune_v4/k_optim": dict(
        file="viz_data.pkl", stored_acts="full", seed=2, n_nodes=14, base="fixture_a/quotes/prune_v4/4"
    ),
    "fixture_a/brackets/prune_v4/6": dict(file="viz_data.pt", stored_acts="circuit", seed=3, n_nodes=8, numpy_pairs=True),
}
FRACS = (0.001, 0.01, 0.1, 0.5)


# ---- tokenizer ----------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    bs = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def write_tokenizer(d: Path) -> None:
    """A data-gym BPE with 2048 ids: merges of printable byte pairs (frequent code characters first)."""
    d.mkdir(parents=True, exist_ok=True)
    alpha = _byte_alphabet()
    order = list(alpha)  # id -> byte
    first = b" etaoinsrlhdcu_=()'\"[]:.,xyzp"
    chars = list(dict.fromkeys(first + bytes(range(33, 127))))
    merges = []
    for a in chars:
        for b in chars:
            if len(merges) < 2048 - 257:
                merges.append((a, b))
    encoder = {alpha[b]: i for i, b in enumerate(order)}
    for i, (a, b) in enumerate(merges):
        encoder[alpha[a] + alpha[b]] = 256 + i
    encoder["<|endoftext|>"] = 2047
    (d / "encoder.json").write_text(json.dumps(encoder))
    lines = ["#version: 0.2"] + [f"{alpha[a]} {alpha[b]}" for a, b in merges]
    (d / "vocab.bpe").write_text("\n".join(lines) + "\n")


def fixture_encoding(d: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    pat = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("fixture_bpe", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 2047})


# ---- model --------------------------------------------------------------------------------------


def make_model(seed: int = 0):
    from inference import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(**{k: v for k, v in FIXTURE_CONFIG.items() if k != "pfrac"})
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "wpe" not in name:  # weight-sparse: most entries exactly zero
                p.mul_((torch.rand_like(p) < 0.3).float()).mul_(8.0)
            elif "wpe" in name:
                p.mul_((torch.rand_like(p) < 0.2).float()).mul_(4.0)
    return model.eval()


# ---- circuits -----------------------------------------------------------------------------------


def _task_docs(enc, task: str, rng: np.random.Generator, n_pairs: int = 4) -> torch.Tensor:
    """Pairs of prompts whose last token is the answer: doc j and doc j + n/2 differ in it."""
    firsts, seconds = [], []
    names = ["ab", "cd", "xyz", "foo", "bar", "qux", "spam", "eggs"]
    for j in range(n_pairs):
        name = names[int(rng.integers(len(names)))] + str(j)
        if task == "quotes":
            firsts.append(enc.encode(f'{name} = "hi') + enc.encode('"'))
            seconds.append(enc.encode(f"{name} = 'hi") + enc.encode("'"))
        else:
            firsts.append(enc.encode(f"{name}([x") + enc.encode("]"))
            seconds.append(enc.encode(f"{name}[(x") + enc.encode(")"))
    docs = firsts + seconds
    ctx = max(len(d) for d in docs) + 3
    out = torch.zeros(len(docs), ctx, dtype=torch.long)  # right-padded with 0
    for i, d in enumerate(docs):
        assert 0 not in d[-1:], "a doc may not end in token 0 (the padding id)"
        out[i, : len(d)] = torch.tensor(d)
    return out


def _pick_circuit(cfg, rng: np.random.Generator, n_nodes: int, base: dict | None = None) -> dict[str, torch.Tensor]:
    from inference.circuit import location_width, node_locations

    locs = node_locations(cfg)
    chosen: dict[str, set] = {loc: set() for loc in locs}
    for loc, ch in (base or {}).items():
        chosen[loc] |= set(ch.tolist())
    while sum(len(v) for v in chosen.values()) < n_nodes:
        loc = locs[int(rng.integers(len(locs)))]
        chosen[loc].add(int(rng.integers(location_width(cfg, loc))))
    # File order of channels is not sorted in the release; shuffle to exercise that.
    return {loc: torch.tensor(rng.permutation(sorted(v)).tolist(), dtype=torch.long) for loc, v in chosen.items() if v}


def _pretraining_samples(model, enc, circuit, rng: np.random.Generator, as_tensor_keys: bool, float_tokens: bool, pair=list):
    """Top/bottom snippets per node from random 'pretraining' sequences, activations from the real model."""
    from inference.hooks import record

    text = "def f(x):\n    return x + 'a' * 2\nprint(f(\"b\"))\nfor i in range(3): y = [i, (i)]\n"
    toks = enc.encode(text * 3)
    seqs = torch.tensor([toks[s : s + 20] for s in rng.integers(0, len(toks) - 20, size=6)])
    pattern = "|".join(re.escape(loc) for loc in circuit)
    with torch.no_grad(), record(pattern) as rec:
        model(seqs)
    samples = {}
    for loc, chans in circuit.items():
        samples[loc] = {}
        for ch in chans.tolist():
            a = rec[loc][..., ch]  # (n_seq, T)
            flat = a.flatten().argsort()
            by_frac = {}
            for f_i, frac in enumerate(FRACS):
                lists = []
                for picks in (flat[f_i : f_i + 2], flat.flip(0)[f_i : f_i + 2]):  # bottom, top
                    items = []
                    for p in picks.tolist():
                        s, t = divmod(p, a.shape[1])
                        lo, hi = max(0, t - 4), min(a.shape[1], t + 5)
                        tk = seqs[s, lo:hi].clone()
                        items.append((tk.float() if float_tokens else tk, a[s, lo:hi].clone(), t - lo))
                    lists.append(items)
                by_frac[frac] = pair(lists)  # (bottom, top): a tuple in the released files, a list in some copies
            samples[loc][torch.tensor(ch) if as_tensor_keys else ch] = by_frac
    return samples


def _snippet_means(model, samples, extra_locations=()) -> dict[str, torch.Tensor]:
    """Node means over the distinct snippets (each its own sequence), token-weighted: written here
    independently of the pipeline's implementation."""
    from inference.circuit import node_locations
    from inference.hooks import record

    seen = {}
    for by_ch in samples.values():
        for by_frac in by_ch.values():
            for lists in by_frac.values():
                for items in lists:
                    for tk, _, _ in items:
                        t = tk.long()
                        seen.setdefault(tuple(t.tolist()), t)
    locs = node_locations(model.config) + list(extra_locations)
    sums = {loc: 0.0 for loc in locs}
    n = 0
    by_len: dict[int, list] = {}
    for t in seen.values():
        by_len.setdefault(len(t), []).append(t)
    with torch.no_grad():
        for group in by_len.values():
            with record("|".join(re.escape(x) for x in locs)) as rec:
                model(torch.stack(group))
            for loc in locs:
                sums[loc] = sums[loc] + rec[loc].double().sum((0, 1))
            n += len(group) * len(group[0])
    return {loc: (s / n).float() for loc, s in sums.items()}


def _pairs(model, circuit, scale_seed: int, numpy_pairs: bool, nested: bool):
    """pair_data (strength) and pair_data_connections (weights) between retained nodes, with bias rows."""
    cfg = model.config
    out_s, out_w = [], []
    g = torch.Generator().manual_seed(scale_seed)
    for i in range(cfg.n_layer):
        blk = model.transformer.h[i]
        d = cfg.d_attn
        pairs = [
            (f"{i}.attn.act_in", f"{i}.attn.q", blk.attn.c_attn.weight[:d], blk.attn.c_attn.bias[:d]),
            (f"{i}.attn.act_in", f"{i}.attn.k", blk.attn.c_attn.weight[d : 2 * d], blk.attn.c_attn.bias[d : 2 * d]),
            (f"{i}.attn.act_in", f"{i}.attn.v", blk.attn.c_attn.weight[2 * d :], blk.attn.c_attn.bias[2 * d :]),
            (f"{i}.attn.v", f"{i}.attn.resid_delta", blk.attn.c_proj.weight, blk.attn.c_proj.bias),
            (f"{i}.mlp.act_in", f"{i}.mlp.post_act", blk.mlp.c_fc.weight, blk.mlp.c_fc.bias),
            (f"{i}.mlp.post_act", f"{i}.mlp.resid_delta", blk.mlp.c_proj.weight, blk.mlp.c_proj.bias),
        ]
        for src, tgt, W, bvec in pairs:
            if src not in circuit or tgt not in circuit:
                continue
            s_ch, t_ch = circuit[src].tolist(), circuit[tgt].tolist()
            w = W.detach()[t_ch][:, s_ch].T  # (n_src, n_tgt)
            w = torch.cat([w, bvec.detach()[t_ch][None]], 0)  # bias pseudo-node row
            strength = w * torch.rand(w.shape, generator=g)
            src_names = s_ch + ["bias"]
            conv = (lambda x: x.numpy().copy()) if numpy_pairs else (lambda x: x.clone())
            out_w.append([conv(w), src_names, list(t_ch), (src, tgt)])
            out_s.append([conv(strength), list(src_names), list(t_ch), (src, tgt)])
    if nested:  # one release version: a list per worker
        out_s = [out_s[: len(out_s) // 2], out_s[len(out_s) // 2 :]]
        out_w = [out_w[: len(out_w) // 2], out_w[len(out_w) // 2 :]]
    return out_s, out_w


def plain_final_resid_losses(model, docs, per_layer: dict, final_channels, means, ablate=None, mode: str = "mean"):
    """(raw task loss, final residual) of the circuit model whose `final_resid` is pruned to
    `final_channels`, the final step written out in plain torch rather than through
    `inference.circuit`'s final_resid handling: the per-layer masks through `masked_forward` (no
    final_resid entry: the residual after the last block is recorded untouched), then here: the
    channels outside the circuit set to their mean, `ln_f` at the full model's scale (computed here
    from the full model's own final residual), the unembedding and the two-sided task loss.
    `ablate` = (location, channel) also set to its mean (`mode="zero"`: to 0)."""
    from inference import circuit as C
    from inference.hooks import record

    cfg = model.config
    masks = C.circuit_masks(cfg, per_layer)
    fills = dict(means)
    if ablate is not None and ablate[0] != "final_resid":
        loc, c = ablate
        masks[loc] = masks[loc].clone()
        masks[loc][c] = 0.0
        if mode == "zero":
            fills[loc] = means[loc].clone()
            fills[loc][c] = 0.0
    tr = model.transformer
    with torch.no_grad():
        full = tr.wte(docs) + tr.wpe.weight[: docs.shape[1]]  # the fixture models add wpe (no d_pos_emb)
        for blk in tr.h:
            full = blk(full, None)
        frozen = C.frozen_norm_scales(model, docs)
        with record("final_resid") as rec:
            C.masked_forward(model, docs, masks, fills, frozen)
        x = rec["final_resid"].clone()
        mean = means["final_resid"]
        keep = torch.zeros(cfg.d_model, dtype=torch.bool)
        keep[torch.as_tensor(list(final_channels), dtype=torch.long)] = True
        x[..., ~keep] = mean[~keep]
        if ablate is not None and ablate[0] == "final_resid":
            x[..., ablate[1]] = 0.0 if mode == "zero" else mean[ablate[1]]
        ln = tr.ln_f
        if ln.rms:
            rstd = torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + torch.finfo(full.dtype).eps)
            h = x * rstd * ln.weight
        else:
            rstd = torch.rsqrt((full - full.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5)
            h = (x - x.mean(-1, keepdim=True)) * rstd * ln.weight + (ln.bias if ln.bias is not None else 0.0)
        logits = h @ model.lm_head.weight.T + model.final_logits_bias
        half = docs.shape[0] // 2
        total = 0.0
        for j in range(half):
            a, b = j, j + half
            la, lb = int((docs[a] != 0).nonzero().max()) + 1, int((docs[b] != 0).nonzero().max()) + 1
            tok, alt = int(docs[a, la - 1]), int(docs[b, lb - 1])
            first = logits[a, la - 2, [tok, alt]].double()
            second = logits[b, lb - 2, [tok, alt]].double()
            total += -(first[0] - torch.logsumexp(first, 0)) - (second[1] - torch.logsumexp(second, 0))
    return float(total) / half, x


def make_viz_data(
    model,
    enc,
    task: str,
    seed: int,
    n_nodes: int,
    stored_acts: str,
    pkl: bool,
    numpy_pairs: bool = False,
    base: dict | None = None,
    final_resid: list[int] | None = None,
    unknown: dict[str, list[int]] | None = None,
    pair=list,
) -> dict:
    """`final_resid`: channels of the final residual in the circuit (its stored numbers computed by
    `plain_final_resid_losses`, independently of `inference.circuit`); `unknown`: extra locations
    the code does not know, with made-up numbers; `pair`: the type of each samples (bottom, top)."""
    from inference import circuit as C
    from inference.hooks import record

    rng = np.random.default_rng(seed)
    cfg = model.config
    docs = _task_docs(enc, task, rng)
    circuit = _pick_circuit(cfg, rng, n_nodes, base)
    if final_resid is not None:
        # A residual write of the circuit read again by final_resid (an edge across layers, below).
        writes = [int(ch[0]) for loc, ch in circuit.items() if loc.endswith("resid_delta")]
        final_resid = list(dict.fromkeys(list(final_resid) + writes[:1]))
        circuit[C.FINAL_RESID] = torch.tensor(final_resid, dtype=torch.long)
    samples = _pretraining_samples(model, enc, circuit, rng, as_tensor_keys=pkl, float_tokens=pkl, pair=pair)
    for loc, chans in (unknown or {}).items():  # made-up snippets (pretraining text too: in the means)
        loc_samples = {}
        for c in chans:
            g = torch.Generator().manual_seed(100 + c)
            item = lambda g=g: (torch.randint(1, 2000, (7,), generator=g), torch.randn(7, generator=g), 3)  # noqa: E731
            loc_samples[torch.tensor(c) if pkl else c] = {frac: pair([[item()], [item(), item()]]) for frac in FRACS}
        samples[loc] = loc_samples
    means = _snippet_means(model, samples, [C.FINAL_RESID] if final_resid is not None else [])
    pattern = "|".join(re.escape(loc) for loc in circuit)
    with torch.no_grad():
        with record(pattern) as full_rec:
            loss = C.task_loss(model(docs), docs).item()
        masks = C.circuit_masks(cfg, circuit)
        with record(pattern) as circ_rec:
            interv_loss = C.task_loss(C.masked_forward(model, docs, masks, means), docs).item()
        per_layer = {loc: ch for loc, ch in circuit.items() if loc != C.FINAL_RESID}
        ch_losses = C.ablation_losses(model, docs, circuit, means, mode="mean") if final_resid is None else {}
        if final_resid is not None:  # every node's loss from the plain computation (final mask included)
            interv_loss = plain_final_resid_losses(model, docs, per_layer, final_resid, means)[0]
            for loc, chans in per_layer.items():
                ch_losses[loc] = torch.tensor(
                    [plain_final_resid_losses(model, docs, per_layer, final_resid, means, (loc, c))[0] for c in chans.tolist()]
                )
            ch_losses[C.FINAL_RESID] = torch.tensor(
                [plain_final_resid_losses(model, docs, per_layer, final_resid, means, (C.FINAL_RESID, c))[0] for c in final_resid]
            )
        layer_losses = {}
        frozen = C.frozen_norm_scales(model, docs)
        for i in range(cfg.n_layer):
            for half in ("attn", "mlp"):
                locs = [loc for loc in circuit if loc.startswith(f"{i}.{half}.")]
                if not locs:
                    continue
                m = dict(masks)
                for loc in locs:
                    m[loc] = masks[loc].clone()
                    m[loc][circuit[loc]] = 0.0
                layer_losses[f"{i}.{half}"] = C.task_loss(C.masked_forward(model, docs, m, means, frozen), docs).item()
    rec = circ_rec if stored_acts == "circuit" else full_rec
    acts = {
        loc: {(torch.tensor(c) if pkl else c): rec[loc][..., c].clone() for c in chans.tolist()} for loc, chans in circuit.items()
    }
    pair_s, pair_w = _pairs(model, circuit, seed, numpy_pairs or pkl, nested=pkl)
    writes = [loc for loc in circuit if loc.endswith("resid_delta")]
    if final_resid is not None and writes and not pkl:  # an edge across layers: a residual write read by final_resid
        w = (circuit[writes[0]][:, None] == torch.tensor(final_resid)[None, :]).float()
        pair_s.append([w * 0.5, circuit[writes[0]].tolist(), list(final_resid), (writes[0], C.FINAL_RESID)])
        pair_w.append([w, circuit[writes[0]].tolist(), list(final_resid), (writes[0], C.FINAL_RESID)])
    for loc, chans in (unknown or {}).items():  # a location the code does not know: made-up numbers
        circuit[loc] = torch.tensor(chans, dtype=torch.long)
        ch_losses[loc] = torch.tensor([interv_loss + 0.01 * (i + 1) for i in range(len(chans))])
        acts[loc] = {
            (torch.tensor(c) if pkl else c): torch.rand(docs.shape, generator=torch.Generator().manual_seed(c)) for c in chans
        }
    all_loss = [(s, interv_loss * (1 + 2.0 / (s + 1))) for s in range(0, 50, 7)]
    return {
        "circuit_data": circuit,
        "importances": {
            "beeg_model_config": dict(FIXTURE_CONFIG),
            "loss": loss,
            "interv_loss": interv_loss,
            "ch_interv_losses": {loc: v.tolist() for loc, v in ch_losses.items()},
            "layer_interv_losses": layer_losses,
            "pair_data": pair_s,
            "pair_data_connections": pair_w,
            "task_samples": [docs, acts],
        },
        "samples": samples,
        "all_loss": all_loss,
        "num_total_nodes": C.num_total_nodes(cfg),
        "prune_config": {"k": n_nodes, "lr": 0.01, "task": task, "seed": seed},
    }


def build_viz_store(root: Path) -> Path:
    """Write the fixture store (see module doc) under `root`; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    write_tokenizer(root / "tinypython")
    enc = fixture_encoding(root / "tinypython")
    model = make_model()
    mdir = root / "models" / FIXTURE_MODEL
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "beeg_config.json").write_text(json.dumps(FIXTURE_CONFIG))
    torch.save(model.state_dict(), mdir / "final_model.pt")
    tdir = root / "train_curves" / FIXTURE_MODEL
    tdir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "test_xent": 5.0 - s / 100, "L0": 1000 - s, "note": "x"}) for s in range(0, 300, 50)]
    (tdir / "progress.json").write_text("\n".join(lines) + "\n")
    made = {}
    for run_id, f in FIXTURE_RUNS.items():
        model_name, task, sweep, k = run_id.split("/")
        pkl = f["file"].endswith(".pkl")
        base = made[f["base"]]["circuit_data"] if "base" in f else None
        viz = made[run_id] = make_viz_data(
            model, enc, task, f["seed"], f["n_nodes"], f["stored_acts"], pkl, f.get("numpy_pairs", False), base
        )
        d = root / "viz" / model_name / task / sweep / k
        d.mkdir(parents=True, exist_ok=True)
        if pkl:
            with open(d / f["file"], "wb") as fh:
                pickle.dump(viz, fh)
        else:
            torch.save(viz, d / f["file"])
    return root


# The release's variants, on a store of their own (`release_store`): final_resid nodes, a location
# the code does not know, samples pairs as tuples (.pt, as released) and lists (.pkl), and a second
# model whose checkpoint lacks `transformer.ln_f.weight` (no circuits: its model cannot run).
RELEASE_MODEL, PARTIAL_MODEL = "fixture_r", "fixture_p"
UNKNOWN_LOCATION = "1.resid_post"  # not a location this code knows; its name says layer 1
RELEASE_RUNS = {
    "fixture_r/quotes/prune_v4/6": dict(file="viz_data.pt", seed=11, n_nodes=6, final_resid=[3, 12, 7], pair=tuple),
    "fixture_r/quotes/prune_v4/k_optim": dict(
        file="viz_data.pkl", seed=12, n_nodes=9, final_resid=[5, 3], unknown={UNKNOWN_LOCATION: [2, 6]}, pair=list
    ),
}


def build_release_store(root: Path) -> Path:
    """Write the release-variant store (see RELEASE_RUNS) under `root`; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    write_tokenizer(root / "tinypython")
    enc = fixture_encoding(root / "tinypython")
    model = make_model(seed=5)
    for name in (RELEASE_MODEL, PARTIAL_MODEL):
        mdir = root / "models" / name
        mdir.mkdir(parents=True, exist_ok=True)
        (mdir / "beeg_config.json").write_text(json.dumps(FIXTURE_CONFIG))
        state = model.state_dict()
        if name == PARTIAL_MODEL:
            state = {k: v for k, v in state.items() if k != "transformer.ln_f.weight"}
        torch.save(state, mdir / "final_model.pt")
    for run_id, f in RELEASE_RUNS.items():
        model_name, task, sweep, k = run_id.split("/")
        pkl = f["file"].endswith(".pkl")
        viz = make_viz_data(
            model,
            enc,
            task,
            f["seed"],
            f["n_nodes"],
            "circuit",
            pkl,
            base=None,
            final_resid=f["final_resid"],
            unknown=f.get("unknown"),
            pair=f["pair"],
        )
        d = root / "viz" / model_name / task / sweep / k
        d.mkdir(parents=True, exist_ok=True)
        if pkl:
            with open(d / f["file"], "wb") as fh:
                pickle.dump(viz, fh)
        else:
            torch.save(viz, d / f["file"])
    return root


@pytest.fixture(scope="session")
def release_store(tmp_path_factory) -> Path:
    return build_release_store(tmp_path_factory.mktemp("release_store") / "store")


@pytest.fixture(scope="session")
def release_data(release_store, tmp_path_factory):
    """(data dir, MaterializeSummary) of `circuits materialize` (every asset) on `release_store`."""
    from pipeline.materialize import materialize_store

    data = tmp_path_factory.mktemp("release_data") / "data"
    return data, materialize_store(store=str(release_store), data=str(data), progress=False)


@pytest.fixture(scope="session")
def viz_store(tmp_path_factory) -> Path:
    return build_viz_store(tmp_path_factory.mktemp("viz_store") / "store")


@pytest.fixture(scope="session")
def circuits_data(viz_store, tmp_path_factory) -> Path:
    from pipeline.materialize import materialize_store

    data = tmp_path_factory.mktemp("circuits_data") / "data"
    result = materialize_store(store=str(viz_store), data=str(data), progress=False)
    assert not result.failed, result.failed
    return data


@pytest.fixture(scope="session")
def tables_dir(circuits_data) -> Path:
    return circuits_data / "tables"
