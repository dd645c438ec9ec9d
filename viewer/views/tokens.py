"""HTML rendering of token sequences coloured by activation (snippets and task docs)."""

from __future__ import annotations

import functools
import html

import numpy as np
import polars as pl

POS_RGB = (214, 96, 77)  # positive activations: red
NEG_RGB = (67, 147, 195)  # negative: blue
# Every token is a <span>: tens of thousands per page of task docs, so each is kept short (the browser's
# parsing and layout of this HTML was most of a click's time): the colour is a class (`p37` = red at 0.37,
# `n5` = blue at 0.05) defined once per box, the boxed token has class `c`, the hover title is bare; a token
# whose value is exactly 0 is plain text (no span). `content-visibility: auto`: the browser styles, lays out and
# paints only the lines on screen (a click rendered all ~4,000 snippet tokens; most are below the fold).
STYLE = """<style>
.toks {font-family: monospace; font-size: 12px; line-height: 1.9; white-space: pre-wrap; word-break: break-all; margin: 2px 0;
       content-visibility: auto; contain-intrinsic-size: auto 90px;}
.toks span {padding: 1px 0; margin-right: 1px; border-radius: 2px;}
.toks span.c {outline: 2px solid #111; outline-offset: -1px;}
.snipgroup {margin: 4px 0 10px 0;} .snipgroup h4 {margin: 6px 0 2px 0; font-size: 13px;}
.doclabel {color: #666; font-size: 11px; font-family: sans-serif; margin-top: 6px;}
.scale {color: #666; font-size: 11px; font-family: sans-serif;}
</style>"""


@functools.lru_cache(maxsize=65536)
def printable(text: str) -> str:
    """Token text for HTML: escaped, with newlines and tabs made visible (memoized: vocabularies are small)."""
    return html.escape(str(text)).replace("\n", "⏎").replace("\t", "⇥")


def token_label(text: str) -> str:
    """A token shown on its own (not in running text): `printable`, with spaces shown as ␣ so that
    ' in' and 'in' differ at a glance."""
    return printable(text).replace(" ", "␣")


ALPHA_STEPS = 100  # background opacity is quantized to 1/100: a class per step, a lookup table instead of a format per token
# Class per step; step 0 of either sign (no colour) has none. The last entry is for tokens without a value.
_CLASS = np.array(
    [""] + [f"p{i}" for i in range(1, ALPHA_STEPS + 1)] + [""] + [f"n{i}" for i in range(1, ALPHA_STEPS + 1)] + [""], dtype=object
)


def _rule(c: str) -> str:
    r, g, b = POS_RGB if c[0] == "p" else NEG_RGB
    return f".toks .{c}{{background:rgba({r},{g},{b},{int(c[1:]) / ALPHA_STEPS:.2f})}}"


_RULE = {c: _rule(c) for c in _CLASS if c}


def colour_steps(values: np.ndarray, scale: float, lo: float | None = None) -> np.ndarray:
    """Index into `_CLASS` per token. Diverging around zero (scale = max |v|: red positive, blue negative), or
    sequential from `lo` (lo clear, lo + scale full red) when given. Non-finite values get no colour."""
    v = np.asarray(values, np.float64)
    scale = scale if scale > 0 else 1.0
    a = (v - lo) / scale if lo is not None else np.abs(v) / scale
    idx = np.clip(np.round(np.nan_to_num(a) * ALPHA_STEPS), 0, ALPHA_STEPS).astype(np.int64)
    if lo is None:
        idx += (v < 0) * (ALPHA_STEPS + 1)
    idx[~np.isfinite(v)] = len(_CLASS) - 1
    return idx


def backgrounds(values: np.ndarray, scale: float, lo: float | None = None) -> list[str]:
    """Background colour per token (CSS), as the classes of `span_list` draw it; 'transparent' for no value."""
    rules = {c: r.split("background:")[1][:-1] for c, r in _RULE.items()}
    return [rules.get(c, "transparent") for c in _CLASS[colour_steps(values, scale, lo)].tolist()]


def colour_style(*class_lists) -> str:
    """The <style> rules of the colour classes used in `class_lists` (only those: a box defines a few dozen)."""
    used = set()
    for classes in class_lists:
        used.update(classes)
    return "<style>" + "".join(_RULE[c] for c in sorted(used) if c) + "</style>"


def span_list(texts, values, scale: float, boxed: np.ndarray | None = None, lo: float | None = None) -> tuple[list[str], set]:
    """One <span> per token (colour class by value, hover title with the value); `boxed`: bool mask outlined.
    Returns the spans and the colour classes they use (for `colour_style`)."""
    values = np.asarray(values, np.float64)
    colour = _CLASS[colour_steps(values, scale, lo)]
    classes = np.where(boxed, colour + " c", colour) if boxed is not None else colour
    heads = [f'<span class="{c}" ' if " " in c else (f"<span class={c} " if c else "<span ") for c in classes.tolist()]
    titles = [f"title={v:.4g}>" if v == v else 'title="no value">' for v in values.tolist()]
    # A token whose value is exactly 0 (most of them: the models are sparse), uncoloured and not boxed is bare text:
    # no colour to show, and a third of the bytes and DOM nodes of the page otherwise.
    bare = (values == 0) & (colour == "")  # uncoloured zeros (not on a min-to-max scale)
    if boxed is not None:
        bare &= ~np.asarray(boxed, bool)
    spans = [
        printable(x) if b else f"{h}{t}{printable(x)}</span>"
        for h, t, x, b in zip(heads, titles, texts, bare.tolist(), strict=True)
    ]
    return spans, {c.split(" ")[0] for c in classes.tolist()}


def token_spans(texts, values, scale: float, boxed=(), lo: float | None = None) -> tuple[str, set]:
    """One line of tokens; `boxed` holds the indices drawn with an outline; hover title shows the value.
    Returns the HTML and the colour classes used."""
    mask = np.zeros(len(values), bool)
    mask[np.asarray(list(boxed), int)] = True
    spans, used = span_list(texts, values, scale, mask, lo)
    return '<div class="toks">' + "".join(spans) + "</div>", used


def snippets_html(df: pl.DataFrame | None) -> str:
    """Pretraining snippets (`models.snippets`: ordered by frac, side, rank, pos, with token texts): per frac,
    bottom then top lists; one colour scale across everything shown."""
    if df is None or df.is_empty():
        return STYLE + "<p><i>No pretraining snippets for this node.</i></p>"
    values = df["value"].cast(pl.Float64).to_numpy()
    scale = float(np.nanmax(np.abs(values))) or 1.0
    parts = [
        STYLE,
        f'<div class="scale">one colour scale for all snippets: |activation| {scale:.4g} = full colour; '
        "the token of interest is boxed; hover a token for its activation (uncoloured plain text: exactly 0)</div>",
    ]
    # Rows arrive ordered by (frac, side, rank, pos): cut them into snippets with numpy (a group-by costs more).
    frac, side, rank = df["frac"].to_numpy(), df["side"].to_numpy(), df["rank"].to_numpy()
    texts, centre = df["text"].to_numpy(), df["is_center"].fill_null(False).to_numpy()
    starts = np.r_[0, np.flatnonzero((frac[1:] != frac[:-1]) | (side[1:] != side[:-1]) | (rank[1:] != rank[:-1])) + 1, len(df)]
    spans, used = span_list(texts, values, scale, centre)  # every token at once: one colour scale, one pass
    last_frac = last_side = None
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        if frac[a] != last_frac:
            if last_frac is not None:
                parts.append("</div>")
            parts.append(f'<div class="snipgroup"><h4>{frac[a] * 100:g}% fractile</h4>')
            last_frac, last_side = frac[a], None
        if side[a] != last_side:
            parts.append(f'<div class="doclabel">{side[a]}</div>')
            last_side = side[a]
        parts.append('<div class="toks">' + "".join(spans[a:b]) + "</div>")
    parts.append("</div>")
    parts.insert(1, colour_style(used))
    return "".join(parts)


NO_TASK_DOCS = STYLE + "<p><i>No task-doc activations for this node.</i></p>"


def colour_scale(acts: np.ndarray, zero_centred: bool) -> tuple[float, float | None, str] | None:
    """(scale, lo, legend) of the task docs' colours over every finite activation; None if there is none.
    Zero-centred: |activation| `scale` = full colour (lo None); else lo (clear) to lo + scale (full red)."""
    finite = acts[np.isfinite(acts)]
    if finite.size == 0:
        return None
    if zero_centred:
        scale = float(np.abs(finite).max()) or 1.0
        return scale, None, f"zero-centred: red positive, blue negative, |activation| {scale:.4g} = full colour"
    lo, scale = float(finite.min()), float(finite.max() - finite.min()) or 1.0
    return scale, lo, f"min {lo:.4g} (clear) to max {lo + scale:.4g} (full red)"


def pair_differences(docs, acts: np.ndarray) -> dict:
    """pair -> class 2 minus class 1 activations, position by position over the shorter doc (pairs with both classes)."""
    diffs = {}
    for p in sorted({d.pair for d in docs}):
        d1 = [d for d in docs if d.pair == p and d.cls == 1]
        d2 = [d for d in docs if d.pair == p and d.cls == 2]
        if d1 and d2:
            n = min(d1[0].length, d2[0].length)
            diffs[p] = acts[d2[0].doc, :n] - acts[d1[0].doc, :n]
    return diffs


def doc_html(doc, acts: np.ndarray, scale: float, lo: float | None) -> tuple[str, set]:
    """One task doc's label and tokens, its max and min token boxed; returns the HTML and the colour classes used."""
    vals = acts[doc.doc, : doc.length]
    boxed = [int(np.nanargmax(vals)), int(np.nanargmin(vals))] if np.isfinite(vals).any() else []
    line, used = token_spans(list(doc.tokens), vals, scale, boxed=boxed, lo=lo)
    return f'<div class="doclabel">doc {doc.doc} · class {doc.cls} · pair {doc.pair}</div>' + line, used


def task_docs_html(docs, acts: np.ndarray | None, zero_centred: bool, pairs_shown=None) -> str:
    """The task docs of both classes with the node's activation per token, paired (class 1, class 2, difference).

    `docs`: `models.TaskDoc`s (doc order); `acts` is (n_docs, max_len) with NaN past each doc's end. The max
    and min token of each doc are boxed. `pairs_shown`: the pair indices to render (a page); the colour
    scales always span every doc.
    """
    scaled = colour_scale(acts, zero_centred) if docs and acts is not None else None
    if scaled is None:
        return NO_TASK_DOCS
    scale, lo, legend = scaled
    parts = [
        STYLE,
        f'<div class="scale">{legend}; max and min token of each doc boxed; plain text: exactly 0; '
        "difference = class 2 minus class 1, position by position, on its own zero-centred scale</div>",
    ]
    diffs = pair_differences(docs, acts)
    dscale = max([float(np.nanmax(np.abs(d))) for d in diffs.values() if d.size and np.isfinite(d).any()] or [1.0]) or 1.0
    shown = None if pairs_shown is None else set(pairs_shown)
    used = set()
    for p in sorted({d.pair for d in docs}):
        if shown is not None and p not in shown:
            continue
        for d in sorted((d for d in docs if d.pair == p), key=lambda d: d.cls):
            line, u = doc_html(d, acts, scale, lo)
            parts.append(line)
            used |= u
        if p in diffs:
            d2 = next(d for d in docs if d.pair == p and d.cls == 2)
            line, u = token_spans(list(d2.tokens)[: len(diffs[p])], diffs[p], dscale)
            parts.append(f'<div class="doclabel">pair {p} · class 2 − class 1</div>' + line)
            used |= u
    parts.insert(1, colour_style(used))
    return "".join(parts)
