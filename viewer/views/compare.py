"""Compare two circuits (another k, task or model): shared and unique nodes, side by side."""

from __future__ import annotations

import html

import panel as pn

from viewer import queries
from viewer.views.markup import HtmlBox, heading, table_html


def summary(df, run_a: str, run_b: str) -> str:
    counts = df["status"].value_counts()
    shared, only_a, only_b = (int(counts.get(s, 0)) for s in ("shared", "only A", "only B"))
    union = shared + only_a + only_b
    jaccard = shared / union if union else 0.0
    return (f"<div><b>A</b> = {html.escape(run_a)} · <b>B</b> = {html.escape(run_b)}</div>"
            f"<div>shared <b>{shared}</b> · only in A <b>{only_a}</b> · only in B <b>{only_b}</b> · Jaccard {jaccard:.3f}</div>")


class CompareView:
    def __init__(self, state):
        self.state = state
        self.pick = pn.widgets.Select(label="compare with", options=[], width=360)
        self.summary = HtmlBox()
        self.shared = HtmlBox(max_height=500)
        self.only_a = HtmlBox(max_height=500)
        self.only_b = HtmlBox(max_height=500)
        pn.bind(self._picked, self.pick, watch=True)
        self.panel = pn.Column(self.pick, self.summary.panel,
                               pn.Row(pn.Column(heading("Shared", "(delta in A and B)"), self.shared.panel, sizing_mode="stretch_width"),
                                      pn.Column(heading("Only in A"), self.only_a.panel, sizing_mode="stretch_width"),
                                      pn.Column(heading("Only in B"), self.only_b.panel, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
                               sizing_mode="stretch_width")

    def _picked(self, run_id):
        self.state.compare = run_id or ""

    def show(self, *_):
        s = self.state
        runs = queries.runs()["run_id"].tolist()
        self.pick.options = [""] + [r for r in runs if r != s.run]
        if self.pick.value != s.compare:
            self.pick.value = s.compare if s.compare in self.pick.options else ""
        if not s.compare or s.compare == s.run:
            self.summary.object = "<i>Pick a second circuit to compare with this one.</i>"
            self.shared.object = self.only_a.object = self.only_b.object = ""
            return
        df = queries.compare(s.run, s.compare)
        self.summary.object = summary(df, s.run, s.compare)
        self.shared.object = table_html(df[df["status"] == "shared"][["node_id", "delta_a", "delta_b"]])
        self.only_a.object = table_html(df[df["status"] == "only A"][["node_id", "delta_a"]])
        self.only_b.object = table_html(df[df["status"] == "only B"][["node_id", "delta_b"]])
