"""Download the current circuit's nodes (with pin labels) and edges as CSV or Parquet (frames from `models`)."""

from __future__ import annotations

import io

import panel as pn
import polars as pl

from viewer import models
from viewer.views.markup import heading


def to_bytes(df: pl.DataFrame, fmt: str) -> io.BytesIO:
    buf = io.BytesIO()
    if fmt == "csv":
        df.write_csv(buf)
    else:
        df.write_parquet(buf)
    buf.seek(0)
    return buf


class ExportView:
    def __init__(self, state):
        self.state = state

        def button(what, fmt):
            def callback():
                df = models.nodes_export(state.run, state.pins) if what == "nodes" else models.edges_export(state.run)
                return to_bytes(df, fmt)

            return pn.widgets.FileDownload(
                callback=callback, filename=f"{what}.{fmt}", label=f"{what}.{fmt}", color="primary", width=160
            )

        self.buttons = {(w, f): button(w, f) for w in ("nodes", "edges") for f in ("csv", "parquet")}
        self.panel = pn.Column(
            heading("Download the current circuit", "(nodes carry their pin labels):"), pn.Row(*self.buttons.values())
        )

    def show(self, *_):
        stem = self.state.run.replace("/", "_")
        for (what, fmt), b in self.buttons.items():
            b.filename = f"{stem}_{what}.{fmt}"
