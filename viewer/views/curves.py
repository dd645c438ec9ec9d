"""Loss at k across the sweep (log-log, unpruned loss as a line), the pruning loss curve, the prune config, training metrics."""

from __future__ import annotations

import json

import panel as pn
from bokeh.models import ColumnDataSource, HoverTool
from bokeh.plotting import figure

from viewer import queries
from viewer.views.markup import HtmlBox, heading, plain, table_html


class CurvesView:
    def __init__(self, state):
        self.state = state
        self.k_source = ColumnDataSource({"n_nodes": [], "final_loss": [], "k_label": [], "run_id": []})
        self.k_current = ColumnDataSource({"n_nodes": [], "final_loss": []})
        kfig = figure(height=300, sizing_mode="stretch_width", x_axis_type="log", y_axis_type="log", title="loss at k",
                      x_axis_label="circuit nodes", y_axis_label="task loss (corrected)", tools="pan,wheel_zoom,reset,save")
        kfig.line("n_nodes", "final_loss", source=self.k_source, line_width=2)
        kfig.scatter("n_nodes", "final_loss", source=self.k_source, size=7)
        kfig.scatter("n_nodes", "final_loss", source=self.k_current, size=13, fill_color=None, line_color="#d6604d", line_width=2)
        kfig.add_tools(HoverTool(tooltips=[("k", "@k_label"), ("nodes", "@n_nodes"), ("loss", "@final_loss{0.0000}")]))
        # The unpruned loss as a dashed line glyph across the sweep (a Span would not widen the axis range to show it).
        self.unpruned = ColumnDataSource({"n_nodes": [], "loss": []})
        kfig.line("n_nodes", "loss", source=self.unpruned, line_color="#555555", line_dash="dashed", line_width=2)
        self.kfig = kfig
        self.p_source = ColumnDataSource({"x": [], "loss": []})
        pfig = figure(height=300, sizing_mode="stretch_width", title="pruning loss curve", x_axis_label="(step + 1) * 8",
                      y_axis_label="loss (corrected)", tools="pan,wheel_zoom,reset,save")
        pfig.line("x", "loss", source=self.p_source, line_width=2)
        self.pfig = pfig
        self.k_note = HtmlBox()
        self.config = pn.pane.JSON({}, depth=2, sizing_mode="stretch_width")
        self.metrics = HtmlBox()
        self.metric_pick = pn.widgets.Select(label="training metric", options=[], width=240)
        self.t_source = ColumnDataSource({"step": [], "value": []})
        tfig = figure(height=260, sizing_mode="stretch_width", title="training metric", x_axis_label="step", tools="pan,wheel_zoom,reset,save")
        tfig.line("step", "value", source=self.t_source, line_width=2)
        self.tfig = tfig
        self._train = None
        pn.bind(self._show_metric, self.metric_pick, watch=True)
        self.panel = pn.Column(
            pn.Row(pn.Column(pn.pane.Bokeh(kfig, sizing_mode="stretch_width"), self.k_note.panel, sizing_mode="stretch_width"),
                   pn.pane.Bokeh(pfig, sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            pn.Row(pn.Column(heading("Prune config"), self.config, sizing_mode="stretch_width"),
                   pn.Column(heading("Training metrics", "(last value of each)"), self.metrics.panel, self.metric_pick,
                             pn.pane.Bokeh(tfig, sizing_mode="stretch_width"), sizing_mode="stretch_width"), sizing_mode="stretch_width"),
            sizing_mode="stretch_width")

    def show(self, *_):
        r = queries.run(self.state.run)
        if r is None:
            return
        lak = queries.loss_at_k(r["model"], r["task"], r["sweep"])
        if lak is not None and len(lak):
            self.k_source.data = {c: lak[c].tolist() for c in ("n_nodes", "final_loss", "k_label", "run_id")}
            cur = lak[lak["run_id"] == r["run_id"]]
            self.k_current.data = {"n_nodes": cur["n_nodes"].tolist(), "final_loss": cur["final_loss"].tolist()}
            unpruned = float(lak["unpruned_loss"].iloc[0])
            self.unpruned.data = {"n_nodes": [float(lak["n_nodes"].min()), float(lak["n_nodes"].max())], "loss": [unpruned, unpruned]}
            self.k_note.object = f"dashed line: unpruned model's loss {unpruned:.4f}; circled: this circuit"
        else:
            self.k_note.object = "<i>No loss_at_k table.</i>"
        pc = queries.pruning_curve(r["run_id"])
        self.p_source.data = {"x": [], "loss": []} if pc is None else {"x": pc["x"].tolist(), "loss": pc["loss"].tolist()}
        try:
            self.config.object = json.loads(r["prune_config"]) if r.get("prune_config") else {}
        except ValueError:
            self.config.object = {"prune_config (not JSON)": str(r["prune_config"])}
        train = queries.train_curves(r["model"])
        self._train = train
        if train is None or train.empty:
            self.metrics.object = ""
            self.metric_pick.options = []
            return
        self.metrics.object = table_html(train.groupby("metric", as_index=False).last()[["metric", "step", "value"]], digits=6)
        names = sorted(train["metric"].unique())
        self.metric_pick.options = names
        if self.metric_pick.value not in names:
            self.metric_pick.value = next((m for m in names if "loss" in m), names[0])
        self._show_metric()

    def _show_metric(self, *_):
        t = self._train
        if t is None or not self.metric_pick.value:
            return
        sub = t[t["metric"] == self.metric_pick.value]
        self.t_source.data = {"step": sub["step"].tolist(), "value": sub["value"].tolist()}
        self.tfig.title.text = plain(self.metric_pick.value or "")
