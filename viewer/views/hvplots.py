"""HoloViews/hvPlot figures whose data is replaced in place.

A `PipePlot` is a DynamicMap fed by a Pipe stream: `send(data)` re-runs the element function on the new data
and HoloViews updates the existing Bokeh figure's data sources (no new figure, no new models in the live
document), like the raw-Bokeh views' ColumnDataSource updates.
"""

from __future__ import annotations

import holoviews as hv
import hvplot.polars  # noqa: F401 (registers `.hvplot` on Polars frames)
import panel as pn

hv.extension("bokeh", logo=False)


class PipePlot:
    def __init__(self, element, empty, **pane_kwargs):
        """`element(data) -> HoloViews element/overlay` (the argument must be named `data`); `empty`: the data shown before the first `send`."""
        self.pipe = hv.streams.Pipe(data=empty)
        self.dmap = hv.DynamicMap(element, streams=[self.pipe])
        self.panel = pn.pane.HoloViews(self.dmap, **pane_kwargs)

    @property
    def data(self):
        return self.pipe.data

    def send(self, data) -> None:
        self.pipe.send(data)
