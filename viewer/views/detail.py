"""The selected node: name, connections, pretraining snippets, task-doc activations, attention pattern (q/k/v)."""

from __future__ import annotations

import html

import panel as pn
import polars as pl

from viewer import models
from viewer.views import attention, tokens
from viewer.views.markup import HtmlBox, HtmlPart, LiveHtmlBox, table_html


def connections_frame(df) -> dict | None:
    """The columns shown for a node's inputs or outputs (from, to, strength, weight)."""
    if df is None or df.is_empty():
        return None
    return {
        "from": models.objects(df, "src_node_id"),
        "to": models.objects(df, "tgt_node_id"),
        "strength": models.floats(df, "strength"),
        "weight": models.floats(df, "weight"),
    }


LOGIT_TOKENS_SHOWN = 8  # per side, of the pipeline's 20


LOGIT_EFFECT_MISSING = (
    '<div class="logit-effect"><i>direct effect on the logits: not available (the tables hold no '
    "unembed_extremes for this model: its checkpoint lacks the unembedding or final-norm weight; "
    "see the pipeline's warning)</i></div>"
)


def logit_effect_html(extremes, available: bool = True) -> str:
    """A residual channel's direct effect on the logits (`models.unembed_extremes`): the tokens whose
    logits a positive value in it raises and lowers most (a negative value does the reverse).
    `available=False`: the model has no such table (skipped by the pipeline): say so."""
    if not available:
        return LOGIT_EFFECT_MISSING
    if extremes is None or extremes.is_empty():
        return ""
    lines = []
    for side, verb in (("top", "raises"), ("bottom", "lowers")):
        rows = extremes.filter(pl.col("side") == side).head(LOGIT_TOKENS_SHOWN)
        cells = " ".join(
            f"<code>{tokens.token_label(t)}</code>&nbsp;{v:+.3f}" for t, v in zip(rows["text"], rows["value"], strict=True)
        )
        lines.append(f"<div>{verb}: {cells or '<i>none</i>'}</div>")
    return (
        '<div class="logit-effect"><i>direct effect on the logits, per unit of the normalized channel '
        "(unembedding × final-norm weight); a positive value</i>" + "".join(lines) + "</div>"
    )


def outputs_html(node: dict, outputs, links, logit_effect=None) -> str:
    """The Outputs column: the node's outgoing edges; for a residual write without stored edges, the
    later circuit nodes that read its channel (`links`: `queries.residual_links` of the run); and for
    one that no later circuit node reads, what that means: in the circuit model every other reader is
    held at its mean, so the channel reaches the answer only through the final norm and the unembedding.
    For every residual write, and for a final_resid node, `logit_effect` (`models.unembed_extremes` of
    its channel, or that already rendered by `logit_effect_html`) adds the tokens its channel pushes up
    and down directly."""
    frame = connections_frame(outputs)
    if node.get("kind") == "final_resid":
        return (
            (table_html(frame) if frame is not None else "")
            + f"<i>the final residual: channel {int(node['channel'])} is read by the final norm and the unembedding only</i>"
            + (logit_effect if isinstance(logit_effect, str) else logit_effect_html(logit_effect))
        )
    if node.get("kind") != "resid_delta":
        return table_html(frame) if frame is not None else "<i>none</i>"
    direct = logit_effect if isinstance(logit_effect, str) else logit_effect_html(logit_effect)
    if frame is not None:
        return table_html(frame) + direct
    mine = links.filter(pl.col("src_node_id") == node["node_id"]) if links is not None and len(links) else None
    if mine is not None and len(mine):
        return (
            "<i>later reads of the same residual channel</i>"
            + table_html({"from": models.objects(mine, "src_node_id"), "to": models.objects(mine, "tgt_node_id")})
            + direct
        )
    return (
        f"<i>no later node of this circuit reads residual channel {int(node['channel'])}: "
        "it acts on the logits directly, through the final norm and the unembedding</i>" + direct
    )


def inputs_html(node: dict, inputs, links) -> str:
    """The Inputs column: the node's incoming edges; for a final_resid node without stored edges, the
    circuit's residual writes (resid_delta) of the same channel (`links`: `queries.residual_links`)."""
    frame = connections_frame(inputs)
    if frame is not None or node.get("kind") != "final_resid":
        return table_html(frame)
    mine = links.filter(pl.col("tgt_node_id") == node["node_id"]) if links is not None and len(links) else None
    if mine is None or not len(mine):
        return f"<i>no residual write of this circuit into channel {int(node['channel'])}</i>"
    return "<i>the circuit's writes into the same residual channel</i>" + table_html(
        {"from": models.objects(mine, "src_node_id"), "to": models.objects(mine, "tgt_node_id")}
    )


WHERE = {
    "final_resid": "the residual stream after the last block, read by the final norm and the unembedding",
    "other": "a location this viewer does not know (kept as stored, in the 'other' group)",
}


def _num(x, fmt: str) -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def header_html(node: dict, ablation: dict | None, pin_label: str | None) -> str:
    nid = html.escape(node["node_id"])
    head = ""
    if node.get("kind") in ("q", "k", "v"):
        head = f" · head {int(node['head'])}, head channel {int(node['head_channel'])}"
    where = WHERE.get(node.get("kind"))
    layer_delta, released = node.get("layer_delta"), node.get("layer_delta_released")
    layer_part = ""
    if layer_delta is not None and layer_delta == layer_delta:  # corrected; the release's reading beside it when stored
        layer_part = f" · layer-half delta {layer_delta:.4f}" + (
            f" (released reading {released:.4f})" if released is not None and released == released else ""
        )
    parts = [
        f'<h3 class="node-title">{nid}</h3>',
        f"<div>{html.escape(node['location'])} · channel {int(node['channel'])}{head}</div>",
        *([f"<div><i>{html.escape(where)}</i></div>"] if where else []),
        f"<div>ablation delta (stored): <b>{_num(node['delta'], '.4f')}</b>{layer_part}</div>",
    ]
    if ablation is not None:
        flag = "agrees" if ablation["agrees"] else '<b style="color:#b2182b">DISAGREES</b>'
        se = ablation.get("recomputed_delta_se")
        # a delta from a sample of task pairs carries its standard error (0: every pair, exact)
        pm = f" ± {_num(se, '.4f')} (s.e., sampled pairs)" if se is not None and se == se and se > 0 else ""
        parts.append(
            f"<div>recomputed by the pipeline: {_num(ablation['recomputed_delta'], '.4f')}{pm} "
            f"(|diff| {_num(ablation['abs_diff'], '.2g')}, {flag})</div>"
        )
    if pin_label is not None:
        parts.append(f"<div>pinned: <i>{html.escape(pin_label) or '(no label)'}</i></div>")
    return "".join(parts)


COLOUR_MODES = (("zero-centred colours", True), ("min to max", False))  # task-doc colour scales (labels -> zero_centred)
PAIRS_PER_PAGE = 4  # task-doc pairs rendered at once (a release task has 32 pairs of up to 1024 tokens)
INNER_TABS = ("Pretraining snippets", "Task docs", "Attention (q/k/v)")
NO_NODE = "<i>Click a node in the graph to see its details.</i>"
CONNECTIONS_MAX_HEIGHT = 260  # px; each column scrolls beyond
NODE_STYLE = f"""<style>
.conn {{display: flex; gap: 10px; width: 100%; font-family: sans-serif; font-size: 13px;}}
.conn > div {{flex: 1 1 0; min-width: 0;}}
.conn .scroll {{max-height: {CONNECTIONS_MAX_HEIGHT}px; overflow-y: auto;}}
</style>"""


def node_html(header: str, inputs: str, outputs: str) -> str:
    """The Node tab's top: the header, then the Inputs and Outputs columns side by side (each scrolls).

    One HTML box rather than a Bokeh layout of five (a header, two headings, two tables): in the browser each
    Bokeh text box whose text changes re-lays out the whole page (BokehJS: a Div's `rerender` computes the
    layout from the root, plots included), so a click cost that three times over."""
    return (
        f'{NODE_STYLE}<div class="node-head">{header}</div><div class="conn">'
        f'<div><b>Inputs</b><div class="scroll">{inputs}</div></div>'
        f'<div><b>Outputs</b><div class="scroll">{outputs}</div></div></div>'
    )


class DetailView:
    """The Node tab. A click renders the header, connections and snippets; the task docs and the attention
    pattern (which read the node's task activations) render when their inner tab is open."""

    def __init__(self, state):
        self.state = state
        # The header and the connections: parts of one box (`node_html`), drawn once per node.
        self.header, self.inputs, self.outputs = HtmlPart(NO_NODE), HtmlPart(), HtmlPart()
        self.node_box = LiveHtmlBox(self._node_html())
        self.snippets = LiveHtmlBox()
        self.task = LiveHtmlBox()
        self.task_page = pn.widgets.Select(label="task-doc pairs shown", options={"pairs 0-3": 0}, width=220)
        # Two buttons rather than a checkbox: the checkbox's label text is not part of its click target, so a
        # click on "zero-centred" changed nothing; each button is a target of its own and shows the mode.
        self.zero = pn.widgets.RadioButtonGroup(options=dict(COLOUR_MODES), value=state.zero_centred, color="default", width=260)
        self.zero.param.watch(lambda e: setattr(state, "zero_centred", bool(e.new)), "value")
        state.param.watch(lambda e: setattr(self.zero, "value", e.new), "zero_centred")
        self.doc = pn.widgets.IntInput.from_param(state.param.doc, label="task doc for the attention pattern", width=200)
        self.head_plot = self.channel_plot = None  # built on the first q/k/v node shown (two figures less per page)
        self.attn_note = HtmlBox()
        self.attn_plots = pn.Row()
        # The Task docs and Attention tabs are filled by `fill_tabs` (after the page has loaded, or when opened):
        # their widgets' models are not needed for the page's first paint.
        self.task_tab = pn.Column(sizing_mode="stretch_width")
        self.attn = pn.Column(sizing_mode="stretch_width")
        self.inner_tabs = pn.Tabs(
            (INNER_TABS[0], self.snippets.panel),
            (INNER_TABS[1], self.task_tab),
            (INNER_TABS[2], self.attn),
            sizing_mode="stretch_width",
            dynamic=False,
        )
        self.stale = set()  # inner tabs whose content is out of date
        self.inner_tabs.param.watch(lambda e: self._refresh_inner(), "active")
        pn.bind(self.show_task, self.task_page, watch=True)  # another page: render it (its tab is the one open)
        self.panel = pn.Column(
            self.node_box.panel,
            self.inner_tabs,
            sizing_mode="stretch_width",
        )

    def show(self, *_):
        s = self.state
        self.draw(models.node_detail(s.run, s.node) if s.node else None, s.pins)

    def draw(self, detail: models.NodeDetail | None, pins: dict):
        """The header, connections and snippets of a node (None: no node selected); the inner tabs follow."""
        if detail is None:
            self.header.object = NO_NODE
            self.inputs.object = self.outputs.object = ""
            self.node_box.object = self._node_html()
            self.snippets.object = self.task.object = self.attn_note.object = ""
            self._no_pattern()
            return
        node = detail.node
        self.header.object = header_html(node, detail.ablation, pins.get(node["node_id"]))
        self.inputs.object = inputs_html(node, detail.inputs, detail.links)
        logit = None
        if node.get("kind") in ("resid_delta", "final_resid"):
            logit = logit_effect_html(detail.logit, detail.logit_available)
        self.outputs.object = outputs_html(node, detail.outputs, detail.links, logit)
        self.node_box.object = self._node_html()
        self.snippets.object = tokens.snippets_html(detail.snippets)
        self.stale = {INNER_TABS[1], INNER_TABS[2]}
        self._refresh_inner()

    def _node_html(self) -> str:
        return node_html(self.header.object, self.inputs.object, self.outputs.object)

    def fill_tabs(self):
        """Put the Task docs and Attention tabs' widgets and boxes in place (once)."""
        if not len(self.task_tab):
            self.task_tab.extend([pn.Row(self.zero, self.task_page), self.task.panel])
            self.attn.extend([self.doc, self.attn_note.panel, self.attn_plots])

    def _refresh_inner(self):
        tab = INNER_TABS[self.inner_tabs.active]
        if tab != INNER_TABS[0]:
            self.fill_tabs()
        if tab in self.stale:
            self.stale.discard(tab)
            (self.show_task if tab == INNER_TABS[1] else self.show_attention)(force=True)

    def show_task(self, page=None, force=False):
        """Render the task docs when their tab is open (tens of thousands of tokens per page otherwise wasted).
        `page`: set when the page picker changed (only shown in the open tab), which forces the render."""
        s = self.state
        force = force or page is not None
        if not force and INNER_TABS[self.inner_tabs.active] != INNER_TABS[1]:
            self.stale.add(INNER_TABS[1])
            return
        if not s.node:
            return
        docs = models.task_docs(s.run)
        pages = models.task_doc_pages(docs, PAIRS_PER_PAGE)
        if pages and self.task_page.options != pages:
            self.task_page.options = pages
        first = self.task_page.value or 0
        self.task.object = tokens.task_docs_html(
            docs, models.activation_matrix(s.run, s.node), s.zero_centred, pairs_shown=range(first, first + PAIRS_PER_PAGE)
        )

    def _no_pattern(self):
        if self.head_plot is not None:
            self.head_plot.show(None, "head pattern")
            self.channel_plot.show(None, "channel pattern")

    def show_attention(self, force=False):
        s = self.state
        if not force and INNER_TABS[self.inner_tabs.active] != INNER_TABS[2]:
            self.stale.add(INNER_TABS[2])
            return
        self.draw_attention(models.attention(s.run, s.node, s.doc))

    def draw_attention(self, att: models.Attention | str):
        if isinstance(att, str):  # no pattern: why
            self.attn_note.object = f"<i>{html.escape(att)}</i>"
            self._no_pattern()
            return
        if self.head_plot is None:  # built on the first q/k/v node shown (two figures less per page)
            self.head_plot = attention.PatternPlot("head pattern")
            self.channel_plot = attention.PatternPlot("channel pattern")
            self.attn_plots.extend([pn.pane.Bokeh(self.head_plot.figure), pn.pane.Bokeh(self.channel_plot.figure)])
        self.head_plot.show(att.head, att.head_title)
        self.channel_plot.show(att.channel, att.channel_title)
        self.attn_note.object = "<div>" + html.escape("; ".join(att.note)) + "</div>"
