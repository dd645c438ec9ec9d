"""tinypython_2k from data-gym files: ranks, special token, where the files are found, plugin."""

import json
import os
import subprocess
import sys
import uuid

import fsspec
import pytest

from inference.tokenizer import PAT_STR, TokenizerError, get_tokenizer

# GPT-2's printable stand-in for each byte, written out here independently of the code.
_PRINTABLE = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
_SHIFTED = [b for b in range(256) if b not in _PRINTABLE]
_ORDER = _PRINTABLE + _SHIFTED
_CHAR = {**{b: chr(b) for b in _PRINTABLE}, **{b: chr(256 + i) for i, b in enumerate(_SHIFTED)}}
MERGES = [("d", "e"), ("de", "f"), ("Ġ", "def"), ("(", ")")]  # "Ġ" is the space byte


def write_vocab(directory, merges=MERGES, encoder_override=None):
    directory.mkdir(parents=True, exist_ok=True)
    encoder = {_CHAR[b]: i for i, b in enumerate(_ORDER)}
    for a, b in merges:
        encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    encoder.update(encoder_override or {})
    (directory / "encoder.json").write_text(json.dumps(encoder))
    (directory / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return directory


def test_encodes_with_merges_and_endoftext_last(tmp_path):
    enc = get_tokenizer(write_vocab(tmp_path / "tok"))
    assert enc.n_vocab == 256 + len(MERGES) + 1 and enc.eot_token == enc.n_vocab - 1
    assert enc.encode("def def()") == [257, 258, 259]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [enc.eot_token]
    assert enc.encode("x") == [_ORDER.index(ord("x"))]
    text = "héllo wörld\n\tdef  f(x):\r\n    return 1234 / 7 ∑"
    assert enc.decode(enc.encode(text)) == text
    assert enc._pat_str == PAT_STR
    assert PAT_STR == r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def test_store_url_env_and_missing(tmp_path, monkeypatch):
    root = f"memory://tok-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    src = write_vocab(tmp_path / "src")
    for name in ("encoder.json", "vocab.bpe"):
        fs.pipe(f"{root}/tinypython/{name}", (src / name).read_bytes())
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "cache"))
    assert get_tokenizer(root).encode("def") == [257]  # a store URL whose tinypython/ holds the files

    monkeypatch.setenv("CIRCUITS_TOKENIZER_DIR", str(src))
    assert get_tokenizer().encode("def") == [257]

    monkeypatch.setenv("CIRCUITS_TOKENIZER_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("CIRCUITS_STORE", str(tmp_path / "nostore"))
    with pytest.raises(TokenizerError) as err:
        get_tokenizer()
    assert str(tmp_path / "nothing") in str(err.value) and str(tmp_path / "nostore" / "tinypython") in str(err.value)


def test_inconsistent_files_named(tmp_path):
    d = write_vocab(tmp_path / "tok", encoder_override={"de": 300})
    with pytest.raises(TokenizerError, match=r"encoder\.json does not match.*vocab\.bpe"):
        get_tokenizer(d)
    (d / "encoder.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"encoder\.json: not valid JSON"):
        get_tokenizer(d)


def test_tiktoken_plugin_in_fresh_interpreter(tmp_path):
    """`tiktoken.get_encoding("tinypython_2k")` finds the installed plugin (a fresh process:
    tiktoken caches encodings and plugin lists for the life of a process)."""
    d = write_vocab(tmp_path / "tok")
    code = "import tiktoken; e = tiktoken.get_encoding('tinypython_2k'); print(e.name, e.n_vocab, e.encode('def def'))"
    env = {**os.environ, "CIRCUITS_TOKENIZER_DIR": str(d)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["tinypython_2k", "261", "[257,", "258]"]
