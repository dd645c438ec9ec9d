"""Faithfulness stress tests of the selected circuit (the `faithfulness` table; embedded demo
store only): its loss alone and without it, mean vs zero ablation, on each prompt set."""

from __future__ import annotations

import html

import panel as pn

from viewer import models
from viewer.views.markup import HtmlBox, table_html

EXPLAIN = (
    "<div>Per-prompt loss ± standard error over prompts (the release's raw loss / 2 when <code>loss_factor</code> is 0.5). "
    "<b>circuit</b>: everything outside the circuit ablated; <b>without_circuit</b>: only the circuit's nodes ablated; "
    "<b>circuit_calibrated</b>: the circuit after its logit scale + shift. Prompt sets: <b>pruning</b> (gates trained on), "
    "<b>selection</b> (k chosen on), <b>evaluation</b> (nothing tuned on).</div>"
)


def verdict(df) -> str:
    if df is None or len(df) == 0:
        return "<i>No faithfulness rows for this circuit (released circuits carry none; the embedded demo store's do).</i>"
    if bool(df["flagged"][0]):
        return "<div style='color:#b00'><b>Flagged:</b> the evaluation loss misses the selection loss by more than the standard error of the difference.</div>"
    return "<div>Evaluation loss within the spread of the selection loss.</div>"


class FaithfulnessView:
    def __init__(self, state):
        self.state = state
        self.verdict = HtmlBox()
        self.table = HtmlBox(max_height=520)
        self.panel = pn.Column(
            pn.pane.HTML(EXPLAIN, sizing_mode="stretch_width"), self.verdict.panel, self.table.panel, sizing_mode="stretch_width"
        )

    def show(self, *_):
        self.draw(self.state.run, models.faithfulness(self.state.run))

    def draw(self, run_id: str, df):
        self.verdict.object = f"<div><b>{html.escape(run_id or '')}</b></div>" + verdict(df)
        self.table.object = "" if df is None or len(df) == 0 else table_html(df.drop("flagged"), digits=3)
