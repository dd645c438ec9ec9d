"""Compare two circuits (another k, task or model): shared and unique nodes, side by side."""

from __future__ import annotations

import html

import panel as pn

from viewer import models
from viewer.views.markup import HtmlBox, heading, table_html


def summary(c: models.Comparison) -> str:
    return (
        f"<div><b>A</b> = {html.escape(c.run_a)} · <b>B</b> = {html.escape(c.run_b)}</div>"
        f"<div>shared <b>{len(c.shared)}</b> · only in A <b>{len(c.only_a)}</b> · only in B <b>{len(c.only_b)}</b> · "
        f"Jaccard {c.jaccard:.3f}</div>"
    )


class CompareView:
    def __init__(self, state):
        self.state = state
        self.pick = pn.widgets.Select(label="compare with", options=[], width=360)
        self.summary = HtmlBox()
        self.shared = HtmlBox(max_height=500)
        self.only_a = HtmlBox(max_height=500)
        self.only_b = HtmlBox(max_height=500)
        pn.bind(self._picked, self.pick, watch=True)
        self.panel = pn.Column(
            self.pick,
            self.summary.panel,
            pn.Row(
                pn.Column(heading("Shared", "(delta in A and B)"), self.shared.panel, sizing_mode="stretch_width"),
                pn.Column(heading("Only in A"), self.only_a.panel, sizing_mode="stretch_width"),
                pn.Column(heading("Only in B"), self.only_b.panel, sizing_mode="stretch_width"),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def _picked(self, run_id):
        self.state.compare = run_id or ""

    def show(self, *_):
        s = self.state
        self.pick.options = [""] + [r for r in models.run_ids() if r != s.run]
        if self.pick.value != s.compare:
            self.pick.value = s.compare if s.compare in self.pick.options else ""
        if not s.compare or s.compare == s.run:
            self.summary.object = "<i>Pick a second circuit to compare with this one.</i>"
            self.shared.object = self.only_a.object = self.only_b.object = ""
            return
        self.draw(models.comparison(s.run, s.compare))

    def draw(self, c: models.Comparison):
        self.summary.object = summary(c)
        self.shared.object = table_html(c.shared)
        self.only_a.object = table_html(c.only_a)
        self.only_b.object = table_html(c.only_b)
