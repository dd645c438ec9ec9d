"""Model config: every field of `beeg_config.json` and the release's loading rules.

The contract is `shared/spec/checkpoint-format.md`. `GPTConfig.from_dict` is the one place
where a released config dict becomes a config object; it applies the release's rules
(rename `n_mlp`, drop a false `use_tied_aux_matrix`, warn on unknown keys) and checks types,
so that a bad file fails here with its name rather than deep inside the model.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

# Location types at which activation sparsity (AbsTopK) may be applied.
AFRAC_LOCTYPES = (
    "attn_in",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_out",
    "mlp_in",
    "mlp_neuron",
    "mlp_out",
    "resid_post_attn",
    "resid_post_mlp",
)


class ConfigError(ValueError):
    """A model config that cannot be loaded; the message names the source file."""


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    d_head: int | None = None  # None -> d_model // n_head
    d_model: int = 768
    dropout: float = 0.0
    bias: bool = True
    ln_bias: bool = True
    rms_norm: bool = False
    residual_activation_type: str = "identity"  # "identity" | "relu"
    activation_type: str = "gelu"  # "gelu" | "relu"
    afrac: float | None = None
    afrac_loctypes: str = "attn_in,attn_out,mlp_in,mlp_out"
    debug_nans: bool = False
    tied_unembed: bool = True
    tokenizer_name: str = "tinypython_2k"
    grad_checkpointing: bool = False
    d_mlp: int | None = None  # None -> 4 * d_model
    enable_bigram_table: bool = False
    learnable_bigram_table: bool = False
    d_pos_emb: int | None = None
    dropout_cat_pos_emb: bool = False
    sinusoidal_cat_pos_emb: bool = False
    enable_sparse_kernels: bool = False
    flash: bool = True
    sink: bool = False
    # Keys found in a loaded config that this code does not know; kept for display only.
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.d_head is None:
            self.d_head = self.d_model // self.n_head
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        if self.residual_activation_type not in ("identity", "relu"):
            raise ConfigError(f"residual_activation_type must be 'identity' or 'relu', got {self.residual_activation_type!r}")
        if self.activation_type not in ("gelu", "relu"):
            raise ConfigError(f"activation_type must be 'gelu' or 'relu', got {self.activation_type!r}")
        unknown = set(self.loctypes) - set(AFRAC_LOCTYPES)
        if unknown:
            raise ConfigError(f"afrac_loctypes has unknown location types {sorted(unknown)}; known: {AFRAC_LOCTYPES}")
        if self.afrac is not None and not 0.0 < self.afrac <= 1.0:
            raise ConfigError(f"afrac must be in (0, 1], got {self.afrac}")
        if self.sink and not self.flash:
            # The release asserts this too: its non-SDPA attention has no sink slot, so it
            # would silently compute different logits.
            raise ConfigError("sink=True requires the SDPA attention path (flash=True)")

    # ---- derived sizes -------------------------------------------------------------
    @property
    def loctypes(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in (self.afrac_loctypes or "").split(",") if s.strip())

    @property
    def d_attn(self) -> int:
        """Width of q, k, v and of the attention output before c_proj."""
        return self.n_head * self.d_head

    @property
    def d_model_in(self) -> int:
        """Width of the attention and MLP inputs (residual plus concatenated position embedding)."""
        return self.d_model + (self.d_pos_emb or 0)

    def sparsity_at(self, loctype: str) -> float | None:
        """The kept fraction of AbsTopK at a location type, or None where it is off."""
        return self.afrac if self.afrac is not None and loctype in self.loctypes else None

    # ---- (de)serialisation ---------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config>") -> GPTConfig:
        """Build a config from a `beeg_config.json` dict with the release's loading rules."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        d = dict(raw)
        if "n_mlp" in d:
            if "d_mlp" in d and d["d_mlp"] != d["n_mlp"]:
                raise ConfigError(f"{source}: both n_mlp={d['n_mlp']} and d_mlp={d['d_mlp']} are set")
            d["d_mlp"] = d.pop("n_mlp")
        if "use_tied_aux_matrix" in d:
            if d.pop("use_tied_aux_matrix"):
                raise ConfigError(f"{source}: use_tied_aux_matrix=true is not supported by the released models")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: d.pop(k) for k in list(d) if k not in known}
        if extra:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(extra)}", stacklevel=2)
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not _type_ok(value, hints[key]):
                raise ConfigError(
                    f"{source}: config key {key!r} should be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})"
                )
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and _accepts(hints[key], float)
                and not _accepts(hints[key], int)
            ):
                d[key] = float(value)
        try:
            return cls(**d, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<config>") -> GPTConfig:
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source)

    def to_dict(self) -> dict[str, Any]:
        """The config as `beeg_config.json` holds it (known fields only)."""
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _accepts(hint: Any, typ: type) -> bool:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return typ in args


def _type_ok(value: Any, hint: Any) -> bool:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in args:
        if t is type(None) and value is None:
            return True
        if t is bool and isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if a is type(None) else a.__name__ for a in args)
