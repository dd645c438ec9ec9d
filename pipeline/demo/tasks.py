"""Contrast tasks built from real code in the demo corpus (Gao et al. 2025's task style).

A task is a set of paired prompts. Each pair differs in what must come next: the first
prompt's correct next token is `tokid`, the second's is `alt_tokid`. As stored in
`task_samples` (viz-data-format.md), every doc ENDS with its correct answer token, docs are
right-padded with 0, the first half of the docs is the first class and the second half the
other class, paired by index (doc j <-> doc j + n/2). `inference.circuit.task_loss` reads the
answers off the docs.

Tasks (all from real code; pairs from the train split are used for pruning, pairs from the
held-out test split are stored and evaluated):

- `single_double_quote`: a real single-line string literal (found with `tokenize`), the prompt
  ends after its content; class 1 opens it with `"`, class 2 with `'`. The answer is the first
  token of the real continuation (closing quote + the rest of the line, e.g. `")`) and the
  alternative is the same text with the other quote (both must be single tokens).
- `bracket_counting`: `name = [[e1, e2]` (one list still open) vs `name = [e1, e2]` (closed), at
  a real line position of the file, with a real assignment target and real literal elements
  of that file. Answer: the first token of `]\\n` (another `]` is needed) vs of `\\n`.
  (The tokenizers have no `]]` token, so the `]` vs `]]` contrast is posed one token later.)
- `var_swap`: `a, b = b,` -> ` a` vs `b, a = a,` -> ` b`, with two real names of the file that
  are single tokens, inserted at a real line position of the file.
- `for_while`: a real `for NAME in` loop header cut after `for NAME` (answer ` in`) vs the same
  with `while` (answer: first token of `:\\n`).

Every prompt is one line of code (from the start of the line, indentation included, up to
the point of the contrast; `_doc`), like the paper's short task prompts: the contrast is
decided within the line, not by which quote style or names the rest of the file favours.

A pair is skipped when an answer is not a single token, the two answers coincide, or an answer
is token id 0 (the padding id: a doc ending in 0 would look shorter than it is).
"""

from __future__ import annotations

import io
import keyword
import re
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

TASK_NAMES = ("single_double_quote", "bracket_counting", "var_swap", "for_while")


@dataclass(frozen=True)
class Pair:
    first: list[int]  # prompt tokens + tokid
    second: list[int]  # prompt tokens + alt_tokid


def _single(enc, text: str) -> int | None:
    ids = enc.encode_ordinary(text)
    return ids[0] if len(ids) == 1 else None


def _first_token(enc, text: str) -> int:
    return enc.encode_ordinary(text)[0]


def _doc(enc, prefix: str, answer: int, ctx: int) -> list[int]:
    """The prompt is the prefix's last line (its indentation included), at most ctx - 1 tokens."""
    line = prefix[prefix.rfind("\n") + 1 :]
    ids = enc.encode_ordinary(line)[-(ctx - 1) :]
    return ids + [answer]


def _py_tokens(text: str) -> list[tokenize.TokenInfo]:
    try:
        return list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []


def _line_offsets(text: str) -> list[int]:
    offs, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offs.append(pos)
    return offs


_SIMPLE_STRING = re.compile(r"""(["'])([A-Za-z0-9_ .,:;%/=+*<>()\-]{1,30})\1""")


def quote_pairs(text: str, enc, ctx: int) -> Iterable[Pair]:
    offs = _line_offsets(text)
    dq, sq = _single(enc, '"'), _single(enc, "'")
    if dq is None or sq is None:
        return
    for tok in _py_tokens(text):
        if tok.type != tokenize.STRING or tok.start[0] != tok.end[0] or not _SIMPLE_STRING.fullmatch(tok.string):
            continue
        content = tok.string[1:-1]
        start = offs[tok.start[0] - 1] + tok.start[1]
        end = offs[tok.end[0] - 1] + tok.end[1]
        rest = text[end : offs[tok.end[0]]].rstrip("\n")
        answers = []
        for q in ('"', "'"):
            a = _first_token(enc, q + rest + "\n")
            if not enc.decode([a]).startswith(q):
                break
            answers.append(a)
        if len(answers) != 2:
            continue
        # the alternative must be the same continuation with the other quote, as one token
        t_dq, t_sq = enc.decode([answers[0]]), enc.decode([answers[1]])
        if t_dq[1:] != t_sq[1:]:
            continue
        head = text[:start]
        yield Pair(_doc(enc, head + '"' + content, answers[0], ctx), _doc(enc, head + "'" + content, answers[1], ctx))


def _names_and_literals(toks: list[tokenize.TokenInfo], enc) -> tuple[list[str], list[str]]:
    names, lits = [], []
    for t in toks:
        if t.type == tokenize.NAME and not keyword.iskeyword(t.string) and _single(enc, " " + t.string) is not None:
            names.append(t.string)
        elif t.type == tokenize.NUMBER or (t.type == tokenize.STRING and _SIMPLE_STRING.fullmatch(t.string)):
            lits.append(t.string)
    return sorted(set(names)), sorted(set(lits))


def _statement_starts(toks: list[tokenize.TokenInfo]) -> list[tuple[int, str]]:
    """(line number, indentation) of real logical-line starts (after NEWLINE tokens)."""
    out, prev_newline = [], True
    for t in toks:
        if t.type in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            continue
        if prev_newline and t.type == tokenize.NAME:
            out.append((t.start[0], t.line[: t.start[1]]))
        prev_newline = t.type == tokenize.NEWLINE
    return out


def bracket_pairs(text: str, enc, ctx: int) -> Iterable[Pair]:
    toks = _py_tokens(text)
    names, lits = _names_and_literals(toks, enc)
    if not names or len(lits) < 2:
        return
    offs = _line_offsets(text)
    more, done = _first_token(enc, "]\n"), _first_token(enc, "\n")
    for n, (line, indent) in enumerate(_statement_starts(toks)[::7]):
        name, e1, e2 = names[n % len(names)], lits[n % len(lits)], lits[(n * 3 + 1) % len(lits)]
        head = text[: offs[line - 1]]
        yield Pair(
            _doc(enc, f"{head}{indent}{name} = [[{e1}, {e2}]", more, ctx),
            _doc(enc, f"{head}{indent}{name} = [{e1}, {e2}]", done, ctx),
        )


def swap_pairs(text: str, enc, ctx: int) -> Iterable[Pair]:
    toks = _py_tokens(text)
    names, _ = _names_and_literals(toks, enc)
    if len(names) < 2:
        return
    offs = _line_offsets(text)
    for n, (line, indent) in enumerate(_statement_starts(toks)[::7]):
        a, b = names[n % len(names)], names[(n * 5 + 1) % len(names)]
        if a == b:
            continue
        head = text[: offs[line - 1]]
        yield Pair(
            _doc(enc, f"{head}{indent}{a}, {b} = {b},", _single(enc, " " + a), ctx),
            _doc(enc, f"{head}{indent}{b}, {a} = {a},", _single(enc, " " + b), ctx),
        )


def for_while_pairs(text: str, enc, ctx: int) -> Iterable[Pair]:
    offs = _line_offsets(text)
    ans_in, ans_colon = _single(enc, " in"), _first_token(enc, ":\n")
    if ans_in is None:
        return
    toks = _py_tokens(text)
    for i, t in enumerate(toks[:-2]):
        if t.type == tokenize.NAME and t.string == "for" and toks[i + 1].type == tokenize.NAME and toks[i + 2].string == "in":
            var = toks[i + 1]
            start = offs[t.start[0] - 1] + t.start[1]
            head = text[:start]
            yield Pair(_doc(enc, f"{head}for {var.string}", ans_in, ctx), _doc(enc, f"{head}while {var.string}", ans_colon, ctx))


TASK_BUILDERS: dict[str, Callable[[str, object, int], Iterable[Pair]]] = {
    "single_double_quote": quote_pairs,
    "bracket_counting": bracket_pairs,
    "var_swap": swap_pairs,
    "for_while": for_while_pairs,
}


def _valid(p: Pair) -> bool:
    a, b = p.first[-1], p.second[-1]
    return a is not None and b is not None and a != b and a != 0 and b != 0 and len(p.first) >= 2 and len(p.second) >= 2


def task_pairs(task: str, texts: Iterable[str], enc, ctx: int, max_pairs: int) -> list[Pair]:
    """Up to `max_pairs` valid pairs of a task, spread evenly over all candidates (deterministic)."""
    if task not in TASK_BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASK_BUILDERS)}")
    pairs = [p for text in texts for p in TASK_BUILDERS[task](text, enc, ctx) if _valid(p)]
    if len(pairs) > max_pairs:
        step = len(pairs) / max_pairs
        pairs = [pairs[int(i * step)] for i in range(max_pairs)]
    return pairs


def pairs_to_docs(pairs: list[Pair], ctx: int) -> torch.Tensor:
    """(2 * n_pairs, ctx) int64: first prompts, then second prompts; right-padded with 0."""
    docs = torch.zeros(2 * len(pairs), ctx, dtype=torch.int64)
    for j, p in enumerate(pairs):
        for row, ids in ((j, p.first), (j + len(pairs), p.second)):
            docs[row, : len(ids)] = torch.tensor(ids)
    return docs


def held_out_task_docs(corpus, enc, ctx: int, pairs: int) -> dict[str, torch.Tensor]:
    """Every task's docs from the corpus's test split (tasks with fewer than 4 pairs left out)."""
    texts = [f.text for f in corpus.split("test")]
    out = {}
    for task in TASK_NAMES:
        found = task_pairs(task, texts, enc, ctx, pairs)
        if len(found) >= 4:
            out[task] = pairs_to_docs(found, ctx)
    return out


def task_metrics(logits: torch.Tensor, docs: torch.Tensor) -> dict[str, float]:
    """Accuracy per prompt (the correct answer outscores the alternative), per pair (both
    prompts right) and the task loss per prompt (raw / 2) of a model's logits on task docs."""
    from inference.circuit import answer_logits, task_loss

    pair, half = answer_logits(logits, docs), docs.shape[0] // 2
    right1, right2 = pair[:half, 0] > pair[:half, 1], pair[half:, 1] > pair[half:, 0]
    return {
        "accuracy": float(torch.cat([right1, right2]).float().mean()),
        "pair_accuracy": float((right1 & right2).float().mean()),
        "loss": float(task_loss(logits, docs)) / 2,
    }


# ---- three disjoint prompt sets -------------------------------------------------------------
#
# Circuits are pruned on one set of prompts, their size k is chosen on a second, and every
# reported loss and accuracy is measured on a third that nothing was tuned on:
#
# - `pruning`: pairs from the train split (the text the model was trained on);
# - `selection` / `evaluation`: pairs from the test split, divided by file (a stable hash of the
#   file's path), so that no evaluation prompt comes from a file a selection prompt came from.
#
# Every prompt occurs once over the three sets (a pair is dropped when either of its prompts
# already occurred, in pruning first, then selection, then evaluation). A test-split pair is
# "seen in pretraining" when either prompt, with its answer, starts a line of the train split
# verbatim (the prompts are line prefixes); such pairs are removed from selection and
# evaluation and counted.

PROMPT_SETS = ("pruning", "selection", "evaluation")


def _line_index(texts: Iterable[str]) -> tuple[list[str], str]:
    """Sorted unique lines of the texts (for prefix look-ups) and the texts joined (for the rest)."""
    texts = list(texts)
    return sorted({line for t in texts for line in t.split("\n")}), "\n".join(texts)


def _seen_in(index: tuple[list[str], str], enc, ids: list[int], ctx: int) -> bool:
    """Does prompt + answer occur verbatim in the indexed text (as a line prefix when the prompt
    is a whole line prefix, anywhere when it was cut to ctx tokens)?"""
    import bisect

    lines, joined = index
    text = enc.decode(ids)
    if len(ids) >= ctx:  # the prompt's line was cut on the left: not anchored at a line start
        return text in joined
    head, nl, _ = text.partition("\n")
    if nl:  # the answer ends the line: an exact line
        i = bisect.bisect_left(lines, head)
        return i < len(lines) and lines[i] == head
    i = bisect.bisect_left(lines, head)
    return i < len(lines) and lines[i].startswith(head)


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


@dataclass
class PromptSets:
    task: str
    pruning: list[Pair]
    selection: list[Pair]
    evaluation: list[Pair]
    stats: dict  # candidates, duplicates dropped, pairs seen in pretraining dropped, per set

    def docs(self, name: str, ctx: int) -> torch.Tensor:
        return pairs_to_docs(getattr(self, name), ctx)


def _file_half(relpath: str) -> str:
    import hashlib

    return "selection" if hashlib.sha256(("select:" + relpath).encode()).digest()[0] % 2 == 0 else "evaluation"


def prompt_sets(task: str, corpus, enc, ctx: int, sizes: dict[str, int], pretrain_index=None) -> PromptSets:
    """The task's pruning / selection / evaluation pairs (sizes: at most that many pairs each),
    disjoint and deduplicated, with test pairs seen verbatim in pretraining text removed."""
    if task not in TASK_BUILDERS:
        raise ValueError(f"unknown task {task!r}; known: {list(TASK_BUILDERS)}")
    train_files = corpus.split("train")
    index = pretrain_index or _line_index(f.text for f in train_files)
    seen: set[tuple[int, ...]] = set()  # every prompt of an earlier candidate (any set)
    pruning_prompts: set[tuple[int, ...]] = set()
    stats: dict = {}

    def take(pairs: list[Pair], name: str, check_leak: bool) -> list[Pair]:
        kept, dup, same_as_pruning, leaked = [], 0, 0, 0
        for p in pairs:
            a, b = tuple(p.first), tuple(p.second)
            if check_leak and (a in pruning_prompts or b in pruning_prompts):
                same_as_pruning += 1  # a train-split line: seen in pretraining, and a pruning candidate
            elif a in seen or b in seen or a == b:
                dup += 1
            elif check_leak and (_seen_in(index, enc, p.first, ctx) or _seen_in(index, enc, p.second, ctx)):
                leaked += 1
            else:
                kept.append(p)
            seen.update((a, b))
        chosen = _spread(kept, sizes[name])
        # the candidates not chosen stay in `seen`: a later set never repeats any candidate of an earlier one
        stats[name] = {
            "candidates": len(pairs), "duplicates_dropped": dup, "equal_to_pruning_dropped": same_as_pruning,
            "seen_in_pretraining_dropped": leaked, "unique": len(kept), "pairs": len(chosen),
        }  # fmt: skip
        if not check_leak:
            pruning_prompts.update(x for q in pairs for x in (tuple(q.first), tuple(q.second)))
        return chosen

    def candidates(files, enough: int | None = None) -> list[Pair]:
        out = []
        for f in files:
            out.extend(p for p in TASK_BUILDERS[task](f.text, enc, ctx) if _valid(p))
            if enough is not None and len(out) >= enough:
                break
        return out

    # The pruning pool: train files in a stable pseudo-random order until 3x the pool size of
    # candidates are found (scanning all 649 files costs minutes; the pool needs a sample).
    import hashlib

    shuffled = sorted(train_files, key=lambda f: hashlib.sha256(("prune:" + f.relpath).encode()).digest())
    pruning = take(candidates(shuffled, 3 * sizes["pruning"]), "pruning", check_leak=False)
    test_files = corpus.split("test")
    selection = take(candidates([f for f in test_files if _file_half(f.relpath) == "selection"]), "selection", check_leak=True)
    evaluation = take(candidates([f for f in test_files if _file_half(f.relpath) == "evaluation"]), "evaluation", check_leak=True)
    return PromptSets(task, pruning, selection, evaluation, stats)
