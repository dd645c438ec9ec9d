"""The explorer's state, and the one place where URL values are checked.

`UrlState` holds the URL's query values as plain strings (so syncing with the URL never fails
half-way); `Explorer` holds the checked, typed state that the views read. `Explorer.apply_url`
turns strings into state, replacing unknown values with defaults and recording a note that
the page shows. Changes to the state are written back to the `UrlState` (and so to the URL).
"""

from __future__ import annotations

import json
import math

import param

from viewer import models

DEFAULT_THRESHOLD = 0.1  # fraction of the layer-half's strongest edge below which edges are hidden
URL_KEYS = ("run", "layer", "node", "threshold", "pins", "compare")


def request_args(args: dict) -> dict:
    """The URL's query values as the strings the browser sent (`pn.state.session_args`: name -> [bytes]).

    Read from the request rather than through `pn.state.location.sync`, which JSON-parses values
    first (threshold=0.5 arrives as a float and pins as a dict, and a String parameter then refuses
    them, so a shared link silently lost its threshold and pins). The last value of a repeated key wins."""
    out = {}
    for key in URL_KEYS:
        values = args.get(key) or []
        if values:
            v = values[-1]
            out[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return out


class UrlState(param.Parameterized):
    """The URL's query values, unchecked strings."""

    run = param.String(default="")
    layer = param.String(default="")
    node = param.String(default="")
    threshold = param.String(default="")
    pins = param.String(default="")
    compare = param.String(default="")


class Explorer(param.Parameterized):
    run = param.String(default="", doc="run_id of the circuit shown")
    layer = param.String(default="", doc="layer-half shown in the graph, e.g. '3.attn'")
    node = param.String(default="", doc="selected node_id ('' = none)")
    threshold = param.Number(default=DEFAULT_THRESHOLD, bounds=(0.0, 1.0))
    pins = param.Dict(default={}, doc="pinned node_id -> label")
    compare = param.String(default="", doc="run_id of the circuit compared against ('' = none)")
    doc = param.Integer(default=0, bounds=(0, None), doc="task doc for the attention pattern")
    zero_centred = param.Boolean(default=True, doc="task-doc colours centred on zero")
    notes = param.List(default=[], doc="messages about URL values that were replaced")

    # --- checking -------------------------------------------------------------------------

    def apply_url(self, raw: dict) -> None:
        """Set the state from untrusted strings (URL query values); unknown values -> defaults + a note."""
        notes = []
        runs = models.run_ids()
        run = str(raw.get("run") or "")
        if run and run not in runs:
            notes.append(f"Unknown run {run!r}: showing {runs[0]!r} instead.")
            run = ""
        run = run or runs[0]

        layers = models.layer_halves(run)
        layer = str(raw.get("layer") or "")
        if layer and layer not in set(layers["layer_half"].to_list()):
            notes.append(f"Unknown layer {layer!r} for this run: showing the default layer instead.")
            layer = ""

        node = str(raw.get("node") or "")
        known_nodes = set(models.node_ids(run))
        if node and node not in known_nodes:
            notes.append(f"Unknown node {node!r} in this run: no node selected.")
            node = ""
        if node:  # the graph shows the selected node: its layer-half wins over the link's layer
            row = models.node(run, node)
            layer = f"{row['layer']}.{row['half']}"
        layer = layer or models.default_layer(layers)

        threshold = DEFAULT_THRESHOLD
        if raw.get("threshold") not in (None, ""):
            try:
                threshold = float(raw["threshold"])
                if not (math.isfinite(threshold) and 0 <= threshold <= 1):
                    raise ValueError
            except (TypeError, ValueError):
                notes.append(f"Invalid threshold {raw['threshold']!r}: using {DEFAULT_THRESHOLD}.")
                threshold = DEFAULT_THRESHOLD

        pins = {}
        if raw.get("pins"):
            pins, bad = parse_pins(raw["pins"], known_nodes)
            if bad:
                notes.append(f"Ignored pins not in this run or malformed: {', '.join(map(repr, bad))}.")

        compare = str(raw.get("compare") or "")
        if compare and compare not in runs:
            notes.append(f"Unknown comparison run {compare!r}: ignored.")
            compare = ""

        self.param.update(run=run, layer=layer, node=node, threshold=threshold, pins=pins, compare=compare, notes=notes)

    def set_run(self, run: str) -> None:
        """Switch circuits: keep the layer and node when the new run has them, else fall back to defaults."""
        if run == self.run:
            return
        # The new circuit's tables, concurrently (DuckDB releases the GIL); the views below then hit the cache.
        models.prefetch_run(run, self.layer)
        layers = models.layer_halves(run)
        layer = self.layer if self.layer in set(layers["layer_half"].to_list()) else models.default_layer(layers)
        known = set(models.node_ids(run))
        node = self.node if self.node in known else ""
        pins = {k: v for k, v in self.pins.items() if k in known}
        self.param.update(run=run, layer=layer, node=node, pins=pins, doc=0)

    def to_url(self) -> dict:
        """The state as URL query strings (the inverse of `apply_url`): threshold as `%g`, pins as a JSON object."""
        return {
            "run": self.run,
            "layer": self.layer,
            "node": self.node,
            "threshold": f"{self.threshold:g}",
            "pins": json.dumps(self.pins, sort_keys=True) if self.pins else "",
            "compare": self.compare,
        }


def parse_pins(text: str, known_nodes: set) -> tuple[dict, list]:
    """Pins from the URL: a JSON object node_id -> label. Returns (valid pins, rejected entries)."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError):
        return {}, [str(text)[:80]]
    if not isinstance(obj, dict):
        return {}, [str(text)[:80]]
    pins, bad = {}, []
    for k, v in obj.items():
        if k in known_nodes and isinstance(v, str | int | float):
            pins[k] = str(v)[:200]
        else:
            bad.append(str(k)[:80])
    return pins, bad
