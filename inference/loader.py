"""Load a released model directory (`beeg_config.json` + `final_model.pt`) into a `GPT`, and
save one in the same layout.

    model = load_model("https://openaipublic.blob.core.windows.net/circuit-sparsity/models/csp_yolo1")

`location` is a local directory or any fsspec URL; remote files go through the download
cache of `inference.store`. The weights are read with `torch.load(weights_only=True)` (no
code from the file runs) and memory-mapped from the local copy.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from inference.config import ConfigError, GPTConfig
from inference.memory import release_mapped_pages
from inference.model import GPT
from inference.safe_load import UnsafeFileError, check_torch_zip, explain_torch_error
from inference.store import CheckpointError, Store, open_checkpoint_zip, write_atomic

CONFIG_FILE = "beeg_config.json"
WEIGHTS_FILE = "final_model.pt"
# Causal-mask buffers of the explicit attention path: present or not depending on how the
# checkpoint was saved, and always recomputed, so never required and never refused.
_MASK_KEY = re.compile(r"transformer\.h\.\d+\.attn\.bias")
ATTENTION_PATHS = ("sdpa", "explicit")


def load_config(location: str | os.PathLike, cache_dir: str | os.PathLike | None = None, attention: str = "sdpa") -> GPTConfig:
    """The model config of a model directory, with the release's loading rules.

    `attention="sdpa"` sets `flash=True` (the release's default and the only path that
    computes the attention sink); `"explicit"` sets `flash=False` and refuses sink models.
    """
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
    store = Store(location, cache_dir)
    source = store.path(CONFIG_FILE)
    text = store.local(CONFIG_FILE).read_bytes()
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if attention == "explicit" and raw.get("sink"):
        raise ConfigError(f"{source}: this model has an attention sink, which only the SDPA path computes; use attention='sdpa'")
    raw["flash"] = attention == "sdpa"
    return GPTConfig.from_dict(raw, source=source)


def load_model(
    location: str | os.PathLike,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attention: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> GPT:
    """A `GPT` in eval mode with the weights of a released model directory.

    `dtype=None` keeps the checkpoint's dtype (that of `transformer.wte.weight`).
    """
    config = load_config(location, cache_dir, attention)
    store = Store(location, cache_dir)
    source = store.path(WEIGHTS_FILE)
    state = _load_state_dict(store.local(WEIGHTS_FILE), source)

    model = _empty_model(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _MASK_KEY.fullmatch(k)]
    unexpected = [k for k in state if k not in expected and not _MASK_KEY.fullmatch(k)]
    if "final_logits_bias" in missing:  # the release: a missing final_logits_bias is zeros
        missing.remove("final_logits_bias")
        state["final_logits_bias"] = torch.zeros(config.vocab_size)
    if config.tied_unembed and "lm_head.weight" in missing and "transformer.wte.weight" in state:
        missing.remove("lm_head.weight")  # tied: the embedding is the unembedding
    if missing or unexpected:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else ""]
        raise CheckpointError(f"{source}: does not match {CONFIG_FILE}: " + "; ".join(p for p in parts if p))
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}, but the config needs {tuple(expected[key].shape)}"
            )
    if (
        config.tied_unembed
        and "lm_head.weight" in state
        and not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    ):
        raise CheckpointError(f"{source}: tied_unembed is true but lm_head.weight differs from transformer.wte.weight")

    state = {k: v for k, v in state.items() if k in expected}
    # assign=True: the parameters become the memory-mapped tensors themselves (no second dense
    # copy: peak RSS ~ the checkpoint, not twice it); the empty ones `_empty_model` allocated are
    # freed untouched. A private mapping: in-place edits of a weight copy that page, never the file.
    model.load_state_dict(state, strict=False, assign=True)
    if config.tied_unembed:  # assign replaced the shared Parameter: tie again
        model.lm_head.weight = model.transformer.wte.weight
    del state
    model.to(device=device, dtype=dtype or model.transformer.wte.weight.dtype)
    # The finiteness check read every page of the mapping: give them back (values unchanged;
    # `inference.memory`). At release scale that is ~1.7 GB of RSS, mostly zeros.
    release_mapped_pages(model.parameters())
    return model.eval()


def _empty_model(config: GPTConfig) -> GPT:
    """A GPT with uninitialised weights, every one of which the checkpoint then fills.

    Skips GPT's random init, which costs ~10 s at release scale. Built on the meta device and
    materialised empty, which unties the unembedding and leaves the explicit path's causal
    masks unset: both are restored here (the mask as `CausalSelfAttention` builds it).
    """
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device="cpu")
    if config.tied_unembed:
        model.lm_head.weight = model.transformer.wte.weight
    n = config.block_size
    for block in model.transformer.h:
        if isinstance(getattr(block.attn, "bias", None), torch.Tensor):
            block.attn.bias.copy_(torch.tril(torch.ones(n, n)).view(1, 1, n, n))
    return model


def _load_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """torch.load a local checkpoint file (memory-mapped, on CPU: the model copies it and then
    moves to its device), with errors that name the file.

    The zip's structure is checked first (`inference.safe_load.check_torch_zip`): uncompressed
    storage records whose declared sizes fit them, tensor views inside their storages, no global
    but tensors and containers; so a small hostile file is refused before it can allocate much.
    Every floating tensor must be finite (a NaN weight makes every later number meaningless).
    """
    try:
        with open(path, "rb") as f:
            open_checkpoint_zip(f, source)[0].close()  # a clear message for truncated or foreign files
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{source}: corrupt zip archive ({e})") from None
    try:
        check_torch_zip(path, source)
    except UnsafeFileError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError with its own wording
        raise CheckpointError(explain_torch_error(e, source)) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{source}: not a state dict (name -> tensor)")
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {bad} NaN or infinite values")
    return dict(state)


def save_model(model: GPT, directory: str | os.PathLike) -> None:
    """Write `beeg_config.json` and `final_model.pt` in the released layout.

    Local directories are written atomically (temp file, then rename), so a reader never
    sees a half-written file; other fsspec URLs are written directly.
    """
    config = json.dumps(model.config.to_dict(), indent=2).encode()
    # state_dict() keeps tied tensors shared, so torch.save stores the embedding once.
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    fs, root = fsspec.core.url_to_fs(str(directory))
    if isinstance(fs, LocalFileSystem):
        root_path = Path(root)
        root_path.mkdir(parents=True, exist_ok=True)
        write_atomic(root_path / CONFIG_FILE, lambda f: f.write(config))
        write_atomic(root_path / WEIGHTS_FILE, lambda f: torch.save(state, f))
    else:
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{CONFIG_FILE}", config)
        with fs.open(f"{root}/{WEIGHTS_FILE}", "wb") as f:
            torch.save(state, f)
