"""GPTConfig.from_dict: the release's loading rules and type checks."""

import warnings

import pytest

from inference import ConfigError, GPTConfig

SRC = "store/models/x/beeg_config.json"


def test_defaults_and_derived_sizes():
    c = GPTConfig.from_dict({"d_model": 64, "n_head": 4}, source=SRC)
    assert (c.d_head, c.d_mlp, c.d_attn, c.d_model_in) == (16, 256, 64, 64)
    assert GPTConfig.from_dict({"d_model": 64, "d_pos_emb": 8}, source=SRC).d_model_in == 72
    assert c.flash and not c.sink and c.tied_unembed and c.loctypes == ("attn_in", "attn_out", "mlp_in", "mlp_out")


def test_release_rules():
    assert GPTConfig.from_dict({"n_mlp": 99}, source=SRC).d_mlp == 99
    c = GPTConfig.from_dict({"use_tied_aux_matrix": False}, source=SRC)
    assert "use_tied_aux_matrix" not in c.to_dict()
    with pytest.raises(ConfigError, match=f"{SRC}.*use_tied_aux_matrix"):
        GPTConfig.from_dict({"use_tied_aux_matrix": True}, source=SRC)
    with pytest.raises(ConfigError, match=f"{SRC}.*n_mlp"):
        GPTConfig.from_dict({"n_mlp": 10, "d_mlp": 20}, source=SRC)
    with pytest.warns(UserWarning, match=rf"{SRC}.*\['pfrac', 'rtopk'\]"):
        c = GPTConfig.from_dict({"pfrac": 0.5, "rtopk": 1, "n_layer": 2}, source=SRC)
    assert c.n_layer == 2 and c.extra == {"pfrac": 0.5, "rtopk": 1}
    with pytest.raises(ConfigError, match=f"{SRC}.*sink"):
        GPTConfig.from_dict({"sink": True, "flash": False}, source=SRC)


def test_types_checked_with_file_and_key():
    for key, bad in [("n_layer", "2"), ("n_layer", 2.5), ("bias", 1), ("afrac", "0.5"), ("activation_type", None)]:
        with pytest.raises(ConfigError, match=f"{SRC}.*{key}"):
            GPTConfig.from_dict({key: bad}, source=SRC)
    with pytest.raises(ConfigError, match=f"{SRC}.*afrac_loctypes.*bogus"):
        GPTConfig.from_dict({"afrac": 0.5, "afrac_loctypes": "attn_in,bogus"}, source=SRC)
    with pytest.raises(ConfigError, match=f"{SRC}.*activation_type"):
        GPTConfig.from_dict({"activation_type": "swish"}, source=SRC)
    with pytest.raises(ConfigError, match=f"{SRC}.*JSON object"):
        GPTConfig.from_dict([1, 2], source=SRC)
    with pytest.raises(ConfigError, match=f"{SRC}.*not valid JSON"):
        GPTConfig.from_json("{", source=SRC)
    assert isinstance(GPTConfig.from_dict({"afrac": 1}, source=SRC).afrac, float)  # JSON int for a float field


def test_round_trip_without_warnings():
    c = GPTConfig.from_dict({"d_model": 32, "n_head": 2, "sink": True, "afrac": 0.25, "d_pos_emb": 4}, source=SRC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GPTConfig.from_dict(c.to_dict(), source=SRC) == c
