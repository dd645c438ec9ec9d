"""`circuits ls`: what a store holds and what a first `circuits materialize` of a selection downloads.

Lists only (no file is fetched): an object store in one flat listing per top directory, whose
entries carry the sizes; a local store by the discovery walk and `stat`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.assets.discovery import discover_models, discover_runs
from pipeline.convert import RunRef
from pipeline.settings import Selection
from pipeline.store_access import TOKENIZER_DIR

TOPS = ("viz", "models", "train_curves", TOKENIZER_DIR)
MODEL_FILES = ("beeg_config.json", "final_model.pt", "node_means.pt")  # node_means: the embedded store's only


@dataclass
class StoreListing:
    url: str
    selection: Selection
    runs: list[RunRef] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    sizes: dict[str, int | None] = field(default_factory=dict)  # store-relative name -> bytes (None: unknown)

    def size(self, rel: str) -> int | None:
        return self.sizes.get(rel)

    def model_files(self, model: str) -> list[str]:
        names = [f"models/{model}/{f}" for f in MODEL_FILES] + [f"train_curves/{model}/progress.json"]
        return [n for n in names if n in self.sizes]

    def tokenizer_files(self) -> list[str]:
        return sorted(n for n in self.sizes if n.startswith(f"{TOKENIZER_DIR}/"))

    def download_bytes(self, recompute: bool = True) -> int:
        """Bytes a first `circuits materialize` of the selection fetches (known sizes only). Without
        recompute the checkpoints are not downloaded (their embedding tensors are read by ranged
        reads, not counted here)."""
        names = [r.path for r in self.runs] + self.tokenizer_files()
        for m in self.models:
            names += [n for n in self.model_files(m) if recompute or not n.endswith(("/final_model.pt", "/node_means.pt"))]
        return sum(self.size(n) or 0 for n in names)


def list_store(store, selection: Selection | None = None) -> StoreListing:
    sel = selection or Selection()
    out = StoreListing(store.path(), sel)
    if not store.is_local:
        for top in TOPS:
            out.sizes |= {rel: info.get("size") for rel, info in store.find(top).items()}
        out.runs = discover_runs(store, sel, files=out.sizes)
        out.models = discover_models(store, sel, out.runs, files=out.sizes)
        return out
    out.runs = discover_runs(store, sel)
    out.models = discover_models(store, sel, out.runs)
    wanted = [r.path for r in out.runs]
    for m in out.models:
        wanted += [f"models/{m}/{f}" for f in MODEL_FILES] + [f"train_curves/{m}/progress.json"]
    wanted += [f"{TOKENIZER_DIR}/{f}" for f in ("encoder.json", "vocab.bpe")]
    for rel in wanted:
        path = store._fspath(rel)
        if os.path.isfile(path):
            out.sizes[rel] = os.path.getsize(path)
    return out


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"


def _k_order(k: str) -> tuple:
    return (0, int(k), "") if k.isdigit() else (1, 0, k)


def format_listing(listing: StoreListing, per_run: bool = False) -> str:
    lines = [f"store: {listing.url}", f"selection: {listing.selection.describe()}"]
    if not listing.runs and not listing.models:
        lines.append("nothing matches" if listing.selection else "no models/ or viz/ found: not a circuit store")
        return "\n".join(lines)
    lines.append("")
    lines.append(f"models ({len(listing.models)}):")
    rows = [("model", "checkpoint", "config", "train curve", "circuits")]
    for m in listing.models:
        size = {n.rsplit("/", 1)[-1]: listing.size(n) for n in listing.model_files(m)}
        n_runs = sum(r.model == m for r in listing.runs)
        rows.append((m, human(size.get("final_model.pt")) if "final_model.pt" in size else "missing",
                     human(size.get("beeg_config.json")), human(size["progress.json"]) if "progress.json" in size else "-", str(n_runs)))  # fmt: skip
    lines += _table(rows)
    groups: dict[tuple[str, str, str], list[RunRef]] = defaultdict(list)
    for r in listing.runs:
        groups[(r.model, r.task, r.sweep)].append(r)
    total = sum(listing.size(r.path) or 0 for r in listing.runs)
    lines += ["", f"circuits ({len(listing.runs)}, {human(total)} of viz_data):"]
    rows = [("model", "task", "sweep", "k", "files", "size")]
    for (m, t, s), runs in sorted(groups.items()):
        ks = ",".join(sorted((r.k_label for r in runs), key=_k_order))
        rows.append((m, t, s, ks, str(len(runs)), human(sum(listing.size(r.path) or 0 for r in runs))))
    lines += _table(rows)
    if per_run:
        lines += ["", "files:"] + [f"  {human(listing.size(r.path)):>9}  {r.path}" for r in listing.runs]
    tok = listing.tokenizer_files()
    lines += ["", f"tokenizer: {len(tok)} files, {human(sum(listing.size(n) or 0 for n in tok))}"]
    lines += [
        "",
        f"a first `circuits materialize` of this selection downloads {human(listing.download_bytes())} "
        f"({human(listing.download_bytes(recompute=False))} with --no-recompute, plus the embedding tensors read by ranged reads)",
    ]
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def ls_cli(args) -> int:
    from pipeline.resources import CircuitsResource

    resource = CircuitsResource.from_env(store_url=args.store, models=args.model, tasks=args.task, sweeps=args.sweep, ks=args.k)
    listing = list_store(resource.store(), resource.selection(args.select))
    print(format_listing(listing, per_run=args.runs))
    return 0 if listing.runs or listing.models else 1
