"""Build profiles of the embedded store: every knob of a build in one frozen dataclass.

`tiny` is what the test suite and CI build (the whole store in about a minute on 2 cores);
`demo` is the default (the whole store in under 20 minutes on 2 cores; the README has numbers).
A store records the full profile in its `store_manifest.json`, so a directory built with
other knobs is recognised as a different store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    # ---- corpus (pipeline.demo.corpus) ---------------------------------------------------
    test_fraction: float = 0.1  # share of stdlib files held out (by a stable hash of the path)
    corpus_max_files: int | None = None  # evenly spaced sample of the sorted file list
    corpus_max_file_bytes: int | None = None  # drop larger files
    # ---- tokenizer (pipeline.demo.bpe) -----------------------------------------------------
    vocab_size: int = 2048  # 256 bytes + merges + <|endoftext|> (the last id)
    # ---- model shape (beeg_config.json) ----------------------------------------------------
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 8
    d_head: int = 16
    d_mlp: int = 512
    block_size: int = 128
    afrac: float | None = 0.25  # AbsTopK: fraction of activations kept at afrac_loctypes
    afrac_loctypes: str = "attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q"
    bigram_table: bool = False  # a learnable (vocab x vocab) logit table, as csp_yolo2 has
    d_pos_emb: int | None = None  # None: wpe added to the residual; else a "cat pos emb" of this width (csp_yolo2: 32)
    # ---- training (pipeline.demo.train) -----------------------------------------------------
    steps: int = 1500
    batch_size: int = 32  # sequences of block_size tokens per optimizer step
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decay from lr to lr * min_lr_frac
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    target_density: float = 1 / 16  # kept fraction of each weight matrix at the end (sparse model)
    anneal_frac: float = 0.5  # density goes linearly 1 -> target over this share of the steps
    min_nonzero_per_row: int = 4  # every neuron / channel (row) keeps at least this many weights
    eval_every: int = 100
    eval_windows: int = 16  # held-out windows for the periodic test_xent
    final_eval_windows: int = 256  # held-out windows for the final numbers (and the unigram baseline)
    seed: int = 1234
    num_threads: int = 2  # torch threads: fixed, so that builds are byte-for-byte reproducible
    train_dense: bool = True  # also train a dense baseline of the same shape and steps
    # The dense baseline stops as soon as its held-out cross-entropy (the final_eval_windows)
    # is no lower than the sparse model's final one: the paper compares circuit sizes between
    # models matched on pretraining loss. Checked every `match_every` steps.
    dense_match_sparse: bool = False
    match_every: int = 50
    # ---- the paper's optimizer choices (off by default: the demo profile was tuned without
    # them, and turning them on untuned cost the quote task in no trial we could afford) ------
    adam_eps: float = 1e-8  # the paper uses 0.1
    lr_density_scale: bool = False  # multiply the LR by 1/sqrt(kept fraction) of the weights
    # ---- circuits (part 2, pipeline.demo.circuits): free-form knobs that part reads ---------
    prune: dict[str, Any] = field(default_factory=dict)

    @property
    def sparse_model(self) -> str:
        return f"{self.name}_sparse"

    @property
    def dense_model(self) -> str:
        return f"{self.name}_dense"

    @property
    def model_names(self) -> list[str]:
        return [self.sparse_model] + ([self.dense_model] if self.train_dense else [])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of every knob: two stores with equal fingerprints were built alike."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
        corpus_max_files=120,
        corpus_max_file_bytes=40_000,
        vocab_size=512,
        n_layer=2,
        d_model=64,
        n_head=4,
        d_head=16,
        d_mlp=256,
        block_size=64,
        steps=150,
        batch_size=16,
        lr=1e-2,
        warmup_steps=10,
        target_density=1 / 4,
        min_nonzero_per_row=2,
        eval_every=50,
        eval_windows=8,
        final_eval_windows=64,
        train_dense=False,
    ),
    # Sized so that the models learn a task within the demo's budget on 2 cores: a model this
    # small sees 10.2M tokens in about 6.5 minutes and learns single_double_quote (a 4-layer
    # d_model 128 model saw 1.6M tokens in about 5 minutes and learned no task). With 3500 steps
    # the sparse model's quote accuracy plateaued at 83-89% (85% at the end; target 90%); with
    # 5000 (the density annealed over 2500 of them) it ends at 95% (sparse-only trial run).
    # Also tried at 3500 steps: 8 heads (91%), density 1/6 (89%), anneal over 30% (85%).
    "demo": Profile(
        name="demo",
        n_layer=2,
        d_model=64,
        n_head=4,
        d_head=16,
        d_mlp=256,
        block_size=64,
        steps=5000,
        batch_size=32,
        lr=1e-2,
        warmup_steps=30,
        eval_every=250,
        target_density=1 / 8,
        dense_match_sparse=True,
    ),
}


def get_profile(name: str | Profile) -> Profile:
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown store profile {name!r}; known: {sorted(PROFILES)}") from None
