"""A byte-level BPE in the `tinypython_2k` style, trained with HuggingFace `tokenizers`.

The trainer is HF's `BpeTrainer` over text pre-split by the `tinypython_2k` regex; its merges
are converted to GPT-2's "data gym" files, which tiktoken reads:

- `vocab.bpe`: a `#version` header line, then one merge `a b` per line in rank order, each
  side written in GPT-2's bytes-to-unicode alphabet, then a final newline;
- `encoder.json`: token string (same alphabet) -> id, where ids 0..255 are the single bytes
  in data-gym order, then one id per merge in rank order, then `<|endoftext|>` (the last id).

tiktoken then encodes by merge rank; HF's own encoder is never used after training.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from inference.tokenizer import ENDOFTEXT, PAT_STR, data_gym_bytes  # the released tokenizer's split pattern and end token

VERSION_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in data-gym rank order (the reader's table)."""
    order, char_to_byte = data_gym_bytes()
    char_of = {b: c for c, b in char_to_byte.items()}
    return {b: char_of[b] for b in order}


def data_gym_byte_order() -> list[int]:
    """The byte of each id 0..255 in data-gym / tiktoken rank order (printable bytes first)."""
    return list(bytes_to_unicode())


def train_bpe_merges(texts: Iterable[str], vocab_size: int = 2048) -> list[tuple[bytes, bytes]]:
    """Train a byte-level BPE; return its `vocab_size - 257` merges (pairs of byte strings) in rank order.

    Ids: 256 single bytes + merges + one special token = vocab_size.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_merges = vocab_size - 256 - 1
    if n_merges < 1:
        raise ValueError(f"vocab_size must be > 257, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # HF may record a merge whose result already exists (reached by another pair); those are
    # dropped below, so ask for some slack and cut to exactly n_merges.
    trainer = trainers.BpeTrainer(
        vocab_size=256 + n_merges + 64,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    raw_merges = json.loads(tok.to_str())["model"]["merges"]

    byte_of = {c: b for b, c in bytes_to_unicode().items()}  # HF's ByteLevel uses GPT-2's map

    def to_bytes(s: str) -> bytes:
        return bytes(byte_of[c] for c in s)

    seen = {bytes([b]) for b in range(256)}
    merges: list[tuple[bytes, bytes]] = []
    for m in raw_merges:
        a, b = m.split(" ") if isinstance(m, str) else m
        pair = (to_bytes(a), to_bytes(b))
        if pair[0] + pair[1] in seen:
            continue
        seen.add(pair[0] + pair[1])
        merges.append(pair)
        if len(merges) == n_merges:
            return merges
    raise ValueError(
        f"the BPE corpus is too small: only {len(merges)} distinct merges, {n_merges} needed for vocab_size {vocab_size}"
    )


def data_gym_files(merges: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """(encoder.json text, vocab.bpe text) for these merges."""
    u = bytes_to_unicode()

    def to_str(bs: bytes) -> str:
        return "".join(u[b] for b in bs)

    encoder = {to_str(bytes([b])): i for i, b in enumerate(data_gym_byte_order())}
    lines = [VERSION_HEADER]
    for a, b in merges:
        encoder[to_str(a + b)] = len(encoder)
        lines.append(f"{to_str(a)} {to_str(b)}")
    encoder[ENDOFTEXT] = len(encoder)
    return json.dumps(encoder, ensure_ascii=False) + "\n", "\n".join(lines) + "\n"
