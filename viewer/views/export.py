"""Download the current circuit's nodes (with pin labels) and edges as CSV or Parquet."""

from __future__ import annotations

import io

import pandas as pd
import panel as pn

from viewer import queries
from viewer.views.markup import heading


def nodes_export(run_id: str, pins: dict) -> pd.DataFrame:
    df = queries.nodes(run_id).copy()
    df["pin_label"] = df["node_id"].map(pins)
    ab = queries.ablations(run_id)
    if ab is not None and len(ab):
        df = df.merge(ab[["node_id", "recomputed_delta", "agrees"]], on="node_id", how="left")
    return df


def edges_export(run_id: str) -> pd.DataFrame:
    df = queries.edges(run_id)
    return pd.DataFrame() if df is None else df.copy()


def to_bytes(df: pd.DataFrame, fmt: str) -> io.BytesIO:
    buf = io.BytesIO()
    if fmt == "csv":
        buf.write(df.to_csv(index=False).encode())
    else:
        df.to_parquet(buf, index=False)
    buf.seek(0)
    return buf


class ExportView:
    def __init__(self, state):
        self.state = state

        def button(what, fmt):
            def callback():
                df = nodes_export(state.run, state.pins) if what == "nodes" else edges_export(state.run)
                return to_bytes(df, fmt)

            return pn.widgets.FileDownload(callback=callback, filename=f"{what}.{fmt}", label=f"{what}.{fmt}", color="primary",
                                           width=160)

        self.buttons = {(w, f): button(w, f) for w in ("nodes", "edges") for f in ("csv", "parquet")}
        self.panel = pn.Column(heading("Download the current circuit", "(nodes carry their pin labels):"), pn.Row(*self.buttons.values()))

    def show(self, *_):
        stem = self.state.run.replace("/", "_")
        for (what, fmt), b in self.buttons.items():
            b.filename = f"{stem}_{what}.{fmt}"
