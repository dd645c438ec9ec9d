"""Dagster resources: where the store and the output live, the device, the loss factor.

Every value defaults from its environment variable (read when the definitions load; the
variables, their defaults and parsing: `inference.settings`).

In the Dagster UI the same fields can be overridden per run in the launchpad (resource config).
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from inference import settings as env
from pipeline import settings


class CircuitsResource(ConfigurableResource):
    """The pipeline's settings; `store()` opens the circuit store through the download cache."""

    store_url: str
    data: str
    cache: str | None = None
    device: str = "cpu"
    loss_factor: float = 0.5
    tolerance: float = 1e-3
    # node-tokens of ablation work per mode before the recompute samples task pairs (0: every pair)
    ablation_budget: int = env.DEFAULT_ABLATION_BUDGET
    # For object-store data: the local dir of circuits.duckdb (and Dagster's instance) when not the
    # default (`settings.local_dir`: one under the cache). Local data dirs hold them themselves.
    db_dir: str | None = None
    # The selection (see `pipeline.settings.Selection`): only these circuits and their models become
    # partitions, so only their files are fetched. Empty: everything.
    models: list[str] = []
    tasks: list[str] = []
    sweeps: list[str] = []
    ks: list[str] = []

    @classmethod
    def from_env(cls, **overrides) -> CircuitsResource:
        values = dict(
            store_url=settings.store_url(),
            data=settings.data_dir(),
            cache=env.cache_env(),
            device=env.device(),
            loss_factor=env.loss_factor(),
            tolerance=env.tolerance(),
            ablation_budget=env.ablation_budget(),
            db_dir=env.db_dir(),
        )
        selection = settings.Selection.from_env(**{f: overrides.pop(f, None) for f in settings.SELECTION_ENV})
        values |= {f: list(getattr(selection, f)) for f in settings.SELECTION_ENV}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def selection(self, text: str | None = None) -> settings.Selection:
        """The circuits and models to fetch; `text`: also only run ids containing it."""
        fields = {f: settings.split_names(getattr(self, f)) for f in settings.SELECTION_ENV}
        return settings.Selection(**fields, text=text or None)

    def store(self):
        from pipeline.store_access import open_store

        return open_store(self.store_url, self.cache)

    def local_dir(self) -> str:
        """Where circuits.duckdb and Dagster's instance live (local even for object-store data)."""
        return settings.local_dir(self.data_url(), self.db_dir)

    def data_url(self) -> str:
        """The output location; a relative local path is made absolute (views hold absolute paths)."""
        if "://" in self.data and not self.data.startswith("file://"):
            return self.data.rstrip("/")
        return str(Path(self.data.removeprefix("file://")).resolve())
