"""Loss at k across the sweep (log-log, unpruned loss as a line), the pruning loss curve, the prune config, training metrics.

hvPlot figures in DynamicMaps (`PipePlot`): a new run sends its frames (`models.curves`) into the existing figures.
"""

from __future__ import annotations

import panel as pn
import polars as pl

from viewer import models
from viewer.views.hvplots import PipePlot
from viewer.views.markup import HtmlBox, heading, plain, table_html

TOOLS = ["pan", "wheel_zoom", "reset", "save"]
LAK_EMPTY = pl.DataFrame(schema={"n_nodes": pl.Int64, "final_loss": pl.Float64, "k_label": pl.String, "run_id": pl.String})


def loss_at_k_plot(data):
    """Loss at k over the sweep (line and points), this circuit circled, the unpruned loss dashed across the sweep
    (a line glyph, not an hline: an hline would not widen the axis range to show it)."""
    lak, run_id, unpruned = data
    opts = {
        "logx": True,
        "logy": True,
        "xlabel": "circuit nodes",
        "ylabel": "task loss (corrected)",
        "responsive": True,
        "height": 300,
    }
    line = lak.hvplot.line(x="n_nodes", y="final_loss", line_width=2, **opts)
    points = lak.hvplot.scatter(x="n_nodes", y="final_loss", hover_cols=["k_label"], size=50, **opts)
    current = lak.filter(pl.col("run_id") == run_id).hvplot.scatter(
        x="n_nodes", y="final_loss", size=160, fill_color=None, line_color="#d6604d", line_width=2, **opts
    )
    n = lak["n_nodes"]
    span = pl.DataFrame(
        {
            "n_nodes": [n.min(), n.max()] if len(n) and unpruned is not None else [],
            "loss": [unpruned, unpruned] if len(n) and unpruned is not None else [],
        },
        schema={"n_nodes": pl.Float64, "loss": pl.Float64},
    )
    dashed = span.hvplot.line(x="n_nodes", y="loss", line_color="#555555", line_dash="dashed", line_width=2, **opts)
    # padding: the first and last points (the circled one often among them) clear of the frame's edges
    return (line * points * current * dashed).opts(title="loss at k", default_tools=TOOLS, padding=0.1)


def pruning_plot(data):
    return data.hvplot.line(
        x="x", y="loss", line_width=2, xlabel="(step + 1) * 8", ylabel="loss (corrected)", responsive=True, height=300
    ).opts(title="pruning loss curve", default_tools=TOOLS)


def metric_plot(data):
    t, name = data
    return t.hvplot.line(x="step", y="value", line_width=2, xlabel="step", responsive=True, height=260).opts(
        title=plain(name or "training metric"), default_tools=TOOLS
    )


PC_EMPTY = pl.DataFrame(schema={"x": pl.Float64, "loss": pl.Float64})
T_EMPTY = pl.DataFrame(schema={"step": pl.Int64, "value": pl.Float64})


class CurvesView:
    def __init__(self, state):
        self.state = state
        self.k_plot = PipePlot(loss_at_k_plot, (LAK_EMPTY, "", None), sizing_mode="stretch_width")
        self.p_plot = PipePlot(pruning_plot, PC_EMPTY, sizing_mode="stretch_width")
        self.t_plot = PipePlot(metric_plot, (T_EMPTY, ""), sizing_mode="stretch_width")
        self.k_note = HtmlBox()
        self.config = pn.pane.JSON({}, depth=2, sizing_mode="stretch_width")
        self.metrics = HtmlBox()
        self.metric_pick = pn.widgets.Select(label="training metric", options=[], width=240)
        self._train = None
        pn.bind(self._show_metric, self.metric_pick, watch=True)
        self.panel = pn.Column(
            pn.Row(
                pn.Column(self.k_plot.panel, self.k_note.panel, sizing_mode="stretch_width"),
                self.p_plot.panel,
                sizing_mode="stretch_width",
            ),
            pn.Row(
                pn.Column(heading("Prune config"), self.config, sizing_mode="stretch_width"),
                pn.Column(
                    heading("Training metrics", "(last value of each)"),
                    self.metrics.panel,
                    self.metric_pick,
                    self.t_plot.panel,
                    sizing_mode="stretch_width",
                ),
                sizing_mode="stretch_width",
            ),
            sizing_mode="stretch_width",
        )

    def show(self, *_):
        self.draw(models.curves(self.state.run))

    def draw(self, c: models.Curves | None):
        if c is None:
            return
        if c.loss_at_k is not None:
            self.k_plot.send((c.loss_at_k, c.run_id, c.unpruned))
            self.k_note.object = f"dashed line: unpruned model's loss {c.unpruned:.4f}; circled: this circuit"
        else:
            self.k_plot.send((LAK_EMPTY, c.run_id, None))
            self.k_note.object = "<i>No loss_at_k table.</i>"
        self.p_plot.send(PC_EMPTY if c.pruning is None else c.pruning)
        self.config.object = c.config
        self._train = c.train
        if c.train is None:
            self.metrics.object = ""
            self.metric_pick.options = []
            return
        self.metrics.object = table_html(c.train_last, digits=6)
        self.metric_pick.options = c.metrics
        if self.metric_pick.value not in c.metrics:
            self.metric_pick.value = models.default_metric(c.metrics)
        self._show_metric()

    def _show_metric(self, *_):
        t = self._train
        if t is None or not self.metric_pick.value:
            return
        self.t_plot.send((t.filter(pl.col("metric") == self.metric_pick.value).select("step", "value"), self.metric_pick.value))
