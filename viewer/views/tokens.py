"""HTML rendering of token sequences coloured by activation (snippets and task docs)."""

from __future__ import annotations

import html

import numpy as np

POS_RGB = (214, 96, 77)  # positive activations: red
NEG_RGB = (67, 147, 195)  # negative: blue
STYLE = """<style>
.toks {font-family: monospace; font-size: 12px; line-height: 1.9; white-space: pre-wrap; word-break: break-all; margin: 2px 0;}
.tok {padding: 1px 0; margin-right: 1px; border-radius: 2px;}
.tok.center, .tok.extreme {outline: 2px solid #111; outline-offset: -1px;}
.snipgroup {margin: 4px 0 10px 0;} .snipgroup h4 {margin: 6px 0 2px 0; font-size: 13px;}
.doclabel {color: #666; font-size: 11px; font-family: sans-serif; margin-top: 6px;}
.scale {color: #666; font-size: 11px; font-family: sans-serif;}
</style>"""


def printable(text: str) -> str:
    """Token text for HTML: escaped, with newlines and tabs made visible."""
    return html.escape(str(text)).replace("\n", "⏎").replace("\t", "⇥")


def colour(value: float, scale: float, lo: float | None = None) -> str:
    """Background for one token. Diverging around zero (scale = max |v|), or sequential from `lo` when given."""
    if not np.isfinite(value) or scale <= 0:
        return "transparent"
    if lo is not None:  # sequential: lo -> transparent, lo + scale -> full red
        a = (value - lo) / scale
        r, g, b = POS_RGB
    else:
        a = abs(value) / scale
        r, g, b = POS_RGB if value >= 0 else NEG_RGB
    return f"rgba({r},{g},{b},{min(max(a, 0.0), 1.0):.3f})"


def token_spans(texts, values, scale: float, boxed=(), lo: float | None = None, label="act") -> str:
    """One line of tokens; `boxed` holds the indices drawn with an outline; hover title shows the value."""
    boxed = set(boxed)
    out = []
    for i, (t, v) in enumerate(zip(texts, values, strict=True)):
        cls = "tok center" if i in boxed else "tok"
        title = f"{label} {v:.4g}" if np.isfinite(v) else "no value"
        out.append(f'<span class="{cls}" style="background:{colour(v, scale, lo)}" title="{html.escape(title)}">{printable(t)}</span>')
    return '<div class="toks">' + "".join(out) + "</div>"


def snippets_html(df) -> str:
    """Pretraining snippets: per frac, bottom then top lists; one colour scale across everything shown."""
    if df is None or df.empty:
        return STYLE + "<p><i>No pretraining snippets for this node.</i></p>"
    scale = float(np.nanmax(np.abs(df["value"].to_numpy(float)))) or 1.0
    parts = [STYLE, f'<div class="scale">one colour scale for all snippets: |activation| {scale:.4g} = full colour; '
                    "the token of interest is boxed; hover a token for its activation</div>"]
    for frac, by_frac in df.groupby("frac", sort=True):
        parts.append(f'<div class="snipgroup"><h4>{frac * 100:g}% fractile</h4>')
        for side in ("bottom", "top"):
            sub = by_frac[by_frac["side"] == side]
            if sub.empty:
                continue
            parts.append(f'<div class="doclabel">{side}</div>')
            for _, snip in sub.groupby("rank", sort=True):
                centre = np.flatnonzero(snip["is_center"].to_numpy())
                parts.append(token_spans(snip["text"].tolist(), snip["value"].to_numpy(float), scale, boxed=centre))
        parts.append("</div>")
    return "".join(parts)


def task_docs_html(docs, acts: np.ndarray | None, zero_centred: bool) -> str:
    """Every task doc of both classes with the node's activation per token, paired (class 1, class 2, difference).

    `acts` is (n_docs, max_len) with NaN past each doc's end. The max and min token of each doc are boxed.
    """
    if docs is None or docs.empty or acts is None:
        return STYLE + "<p><i>No task-doc activations for this node.</i></p>"
    finite = acts[np.isfinite(acts)]
    if finite.size == 0:
        return STYLE + "<p><i>No task-doc activations for this node.</i></p>"
    if zero_centred:
        scale, lo = float(np.abs(finite).max()) or 1.0, None
        legend = f"zero-centred: red positive, blue negative, |activation| {scale:.4g} = full colour"
    else:
        lo, scale = float(finite.min()), float(finite.max() - finite.min()) or 1.0
        legend = f"min {lo:.4g} (clear) to max {lo + scale:.4g} (full red)"
    docs = docs.rename(columns={"class": "cls"})  # "class" cannot be a tuple field
    by_doc = {int(r.doc): r for r in docs.itertuples()}
    parts = [STYLE, f'<div class="scale">{legend}; max and min token of each doc boxed; '
                    "difference = class 2 minus class 1, position by position, on its own zero-centred scale</div>"]
    pairs = sorted({int(r.pair) for r in docs.itertuples()})
    diffs = {}
    for p in pairs:
        d1 = [r for r in by_doc.values() if r.pair == p and r.cls == 1]
        d2 = [r for r in by_doc.values() if r.pair == p and r.cls == 2]
        if d1 and d2:
            n = min(d1[0].length, d2[0].length)
            diffs[p] = acts[d2[0].doc, :n] - acts[d1[0].doc, :n]
    dscale = max([float(np.nanmax(np.abs(d))) for d in diffs.values() if d.size and np.isfinite(d).any()] or [1.0]) or 1.0
    for p in pairs:
        for r in sorted((r for r in by_doc.values() if r.pair == p), key=lambda r: r.cls):
            vals = acts[r.doc, : r.length]
            boxed = [int(np.nanargmax(vals)), int(np.nanargmin(vals))] if np.isfinite(vals).any() else []
            parts.append(f'<div class="doclabel">doc {r.doc} · class {r.cls} · pair {p}</div>')
            parts.append(token_spans(list(r.tokens), vals, scale, boxed=boxed, lo=lo))
        if p in diffs:
            r2 = next(r for r in by_doc.values() if r.pair == p and r.cls == 2)
            parts.append(f'<div class="doclabel">pair {p} · class 2 − class 1</div>')
            parts.append(token_spans(list(r2.tokens)[: len(diffs[p])], diffs[p], dscale, label="diff"))
    return "".join(parts)
