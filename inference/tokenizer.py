"""The `tinypython_2k` tokenizer: a tiktoken BPE read from GPT-2 "data gym" files.

    enc = get_tokenizer()                    # or get_tokenizer("/path/with/encoder.json")
    enc = tiktoken.get_encoding("tinypython_2k")   # the same, through the tiktoken plugin

Files: `encoder.json` (token string -> id) and `vocab.bpe` (merges in rank order), both
written in GPT-2's bytes-to-unicode alphabet. Where they are looked for, in order:

1. the `location` argument: a directory (or store URL) holding the two files, or a store
   whose `tinypython/` holds them;
2. `CIRCUITS_TOKENIZER_DIR`;
3. the store's `tinypython/`: `CIRCUITS_STORE`, else the embedded store
   `$CIRCUITS_DATA/store` (`inference.settings`).

Remote files go through the download cache of `inference.store`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tiktoken

from inference import settings
from inference.store import Store

ENCODING_NAME = "tinypython_2k"
ENDOFTEXT = "<|endoftext|>"
# The split pattern of the released tokenizer (checkpoint-format.md).
PAT_STR = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
FILES = ("encoder.json", "vocab.bpe")
STORE_SUBDIR = "tinypython"


class TokenizerError(ValueError):
    """Tokenizer files that are missing or inconsistent; the message names them."""


def data_gym_bytes() -> tuple[list[int], dict[str, int]]:
    """GPT-2's byte order (printable bytes first) and its character -> byte map.

    Printable Latin-1 bytes stand for themselves; the others (and space) are shifted to
    chr(256 + n) in order, so every byte has a visible character.
    """
    order = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in order}
    n = 0
    for b in range(256):
        if b not in char_to_byte.values():
            order.append(b)
            char_to_byte[chr(256 + n)] = b
            n += 1
    return order, char_to_byte


def mergeable_ranks(encoder_json: Path, vocab_bpe: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Data-gym files -> (tiktoken mergeable ranks, special tokens), checked against each other.

    As tiktoken's `data_gym_to_mergeable_bpe_ranks`: the 256 single bytes in GPT-2 order,
    then one token per merge in file order; `encoder.json` must give exactly those ids.
    `<|endoftext|>` takes its id from `encoder.json`, or the next id when absent.
    """
    order, char_to_byte = data_gym_bytes()

    def decode(token: str, source: Path) -> bytes:
        try:
            return bytes(char_to_byte[c] for c in token)
        except KeyError as e:
            raise TokenizerError(f"{source}: token {token!r} has a character outside the data-gym alphabet: {e}") from None

    ranks = {bytes([b]): i for i, b in enumerate(order)}
    try:
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{vocab_bpe}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{vocab_bpe}:{lineno}: expected a merge 'a b', got {line!r}")
        merged = decode(parts[0], vocab_bpe) + decode(parts[1], vocab_bpe)
        if merged in ranks:
            raise TokenizerError(f"{vocab_bpe}:{lineno}: merge {line!r} repeats token {merged!r}")
        ranks[merged] = len(ranks)

    try:
        encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{encoder_json}: not valid JSON ({e})") from None
    if not isinstance(encoder, dict):
        raise TokenizerError(f"{encoder_json}: expected a JSON object token -> id")
    bad = next(
        ((k, v) for k, v in encoder.items() if not isinstance(k, str) or not isinstance(v, int) or isinstance(v, bool)), None
    )
    if bad is not None:
        raise TokenizerError(f"{encoder_json}: entry {bad[0]!r}: {bad[1]!r} is not token -> integer id")
    special = {ENDOFTEXT: encoder.pop(ENDOFTEXT, len(ranks))}
    encoder.pop("<|startoftext|>", None)
    from_json = {decode(k, encoder_json): v for k, v in encoder.items()}
    if from_json != ranks:
        diff = sorted(set(from_json.items()) ^ set(ranks.items()), key=lambda kv: kv[1])[:3]
        raise TokenizerError(
            f"{encoder_json} does not match the merges of {vocab_bpe}: {len(from_json)} vs {len(ranks)} tokens, "
            f"first differences (token, id) {diff}"
        )
    if special[ENDOFTEXT] in ranks.values():
        raise TokenizerError(f"{encoder_json}: {ENDOFTEXT} id {special[ENDOFTEXT]} is also a BPE token")
    return ranks, special


def candidate_dirs(location: str | os.PathLike | None = None) -> list[str]:
    """Where the tokenizer files are looked for, in order (see the module docstring)."""
    if location is not None:
        loc = str(location).rstrip("/")
        return [loc, f"{loc}/{STORE_SUBDIR}"]
    out = [settings.tokenizer_dir()] if settings.tokenizer_dir() else []
    out.append(f"{settings.store_url().rstrip('/')}/{STORE_SUBDIR}")
    return out


def find_tokenizer_files(
    location: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Local paths of (encoder.json, vocab.bpe) from the first place that has both."""
    looked = []
    for where in candidate_dirs(location):
        looked.append(where)
        store = Store(where, cache_dir)
        try:
            if all(store.exists(name) for name in FILES):
                return store.local(FILES[0]), store.local(FILES[1])
        except OSError as e:  # unreachable URL: say so, and keep looking
            looked[-1] += f" ({e})"
    hint = "pass a directory, set CIRCUITS_TOKENIZER_DIR, or build the store (`circuits build-store`)"
    raise TokenizerError(f"{ENCODING_NAME}: no {' + '.join(FILES)} in any of: {'; '.join(looked)} ({hint})")


def encoding_kwargs(location: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Keyword arguments of `tiktoken.Encoding` (the tiktoken plugin's constructor result)."""
    encoder_json, vocab_bpe = find_tokenizer_files(location, cache_dir)
    ranks, special = mergeable_ranks(encoder_json, vocab_bpe)
    return {"name": ENCODING_NAME, "pat_str": PAT_STR, "mergeable_ranks": ranks, "special_tokens": special}


_CACHE: dict[tuple, tiktoken.Encoding] = {}


def get_tokenizer(location: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The `tinypython_2k` encoding from `location` (or the default places); cached per file version.

    `cache_dir`: the download cache for a remote location (default as `inference.store.cache_dir`)."""
    encoder_json, vocab_bpe = find_tokenizer_files(location, cache_dir)
    key = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in (encoder_json, vocab_bpe))
    if key not in _CACHE:
        ranks, special = mergeable_ranks(encoder_json, vocab_bpe)
        _CACHE[key] = tiktoken.Encoding(ENCODING_NAME, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special)
    return _CACHE[key]
