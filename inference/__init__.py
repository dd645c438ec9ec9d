"""inference: the released weight-sparse GPT, read bit-for-bit, with named hook points.

The names below are imported on first use (PEP 562), so `import inference.settings` or
`inference.files` (the viewer's and the pipeline's light imports) does not load torch.
"""

import importlib

__all__ = ["GPT", "GPTConfig", "ConfigError", "intervene", "record", "load_model"]

_HOMES = {
    "GPT": "inference.model",
    "GPTConfig": "inference.config",
    "ConfigError": "inference.config",
    "intervene": "inference.hooks",
    "record": "inference.hooks",
    "load_model": "inference.loader",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
