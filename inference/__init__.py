"""inference: the released weight-sparse GPT, read bit-for-bit, with named hook points."""

from inference.config import ConfigError, GPTConfig
from inference.hooks import intervene, record
from inference.model import GPT

__all__ = ["GPT", "GPTConfig", "ConfigError", "intervene", "record", "load_model"]


def __getattr__(name: str):
    # load_model pulls in fsspec; import it on first use so `import inference` stays light.
    if name == "load_model":
        from inference.loader import load_model

        return load_model
    raise AttributeError(name)
