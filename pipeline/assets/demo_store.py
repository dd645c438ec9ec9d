"""Dagster assets of the embedded demo store (group `demo_store`).

corpus -> tokenizer -> sparse_model -> dense_model -> circuits, each one stage of
`pipeline.demo.build.StoreBuilder`, so the CLI (`circuits build-store`) and Dagster build the
same files, resume the same way and refuse a foreign directory the same way. Every asset
takes the same run config (`DemoStoreConfig`): the profile (default `demo`) and the output
directory (default `pipeline.settings.embedded_store_dir()`, i.e. `$CIRCUITS_DATA/store`).

The dense model depends on the sparse one only to keep the two trainings sequential: on
2 cores, running them in parallel is no faster, and the store's manifest is shared.
"""

from pathlib import Path

import dagster as dg

from pipeline.demo.build import StoreBuilder
from pipeline.settings import embedded_store_dir

GROUP = "demo_store"
PREFIX = ["demo_store"]


class DemoStoreConfig(dg.Config):
    profile: str = "demo"
    out: str = ""  # empty: $CIRCUITS_DATA/store
    force: bool = False  # replace a directory that holds a different store


def _builder(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> StoreBuilder:
    out = config.out or embedded_store_dir()
    context.log.info(f"demo store {config.profile!r} at {out}")
    return StoreBuilder(out, config.profile, force=config.force, progress=context.log.info)


def _files_metadata(builder: StoreBuilder, entry: dict) -> dict:
    files = sorted(entry["files"])
    size = sum((builder.out / f).stat().st_size for f in files)
    return {
        "store": dg.MetadataValue.path(str(builder.out)),
        "files": dg.MetadataValue.json(files),
        "bytes": size,
    }


@dg.asset(key_prefix=PREFIX, group_name=GROUP, description="The running interpreter's stdlib .py files, split train/test by file")
def corpus(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> dg.MaterializeResult:
    b = _builder(context, config)
    info = b.build_corpus()["info"]
    return dg.MaterializeResult(
        metadata={k: v for k, v in info.items() if k != "root"} | {"stdlib": dg.MetadataValue.path(info["root"])}
    )


@dg.asset(
    key_prefix=PREFIX,
    group_name=GROUP,
    deps=[corpus],
    description="tinypython/encoder.json + vocab.bpe: byte-level BPE trained on the train split",
)
def tokenizer(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> dg.MaterializeResult:
    b = _builder(context, config)
    entry = b.build_tokenizer()
    return dg.MaterializeResult(metadata=entry["info"] | _files_metadata(b, entry))


def _model_result(b: StoreBuilder, entry: dict) -> dg.MaterializeResult:
    info = entry["info"]
    meta = {
        "num_params": info["num_params"],
        "nonzero_weights": info["nonzero_weights"],
        "weight_density": dg.MetadataValue.float(info["weight_density"]),
        "heldout_xent": dg.MetadataValue.float(info["final_test_xent"]),
        "unigram_xent": dg.MetadataValue.float(info["unigram_xent"]),
        "nats_below_unigram": dg.MetadataValue.float(info["nats_below_unigram"]),
        "steps": info.get("steps", 0),
    }
    if info.get("matched_to_xent") is not None:
        meta["matched_to_xent"] = dg.MetadataValue.float(info["matched_to_xent"])
    return dg.MaterializeResult(metadata=meta | _files_metadata(b, entry))


@dg.asset(key_prefix=PREFIX, group_name=GROUP, deps=[tokenizer], description="The weight-sparse GPT and its training curve")
def sparse_model(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> dg.MaterializeResult:
    b = _builder(context, config)
    return _model_result(b, b.build_model("sparse"))


@dg.asset(
    key_prefix=PREFIX,
    group_name=GROUP,
    deps=[sparse_model],
    description="The dense baseline (same shape; stops at the sparse model's held-out loss)",
)
def dense_model(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> dg.MaterializeResult:
    b = _builder(context, config)
    if not b.profile.train_dense:
        context.log.info(f"profile {b.profile.name!r} trains no dense baseline")
        return dg.MaterializeResult(metadata={"skipped": True})
    return _model_result(b, b.build_model("dense"))


def _prompt_sets_disjoint(out: Path) -> dg.AssetCheckResult:
    import torch

    bad = []
    for f in sorted(out.glob("models/*/prompt_sets/*.pt")):
        sets = torch.load(f, map_location="cpu", weights_only=True)
        rows = [tuple(r[r != 0].tolist()) for name in ("pool", "selection", "evaluation") for r in sets[name]]
        if len(set(rows)) != len(rows):
            bad.append(f.relative_to(out).as_posix())
    return dg.AssetCheckResult(
        check_name="prompt_sets_disjoint", passed=not bad, metadata={"repeated_prompts_in": ", ".join(bad) or "none"}
    )


def _targets_above_full(out: Path) -> dg.AssetCheckResult:
    import torch

    bad = []
    for f in sorted(out.glob("viz/*/*/*/k_optim/viz_data.pt")):
        pc = torch.load(f, map_location="cpu", weights_only=True).get("prune_config", {})
        if "target_loss" in pc and "full_loss_selection" in pc and not pc["target_loss"] > pc["full_loss_selection"]:
            bad.append(f.relative_to(out).as_posix())
    return dg.AssetCheckResult(
        check_name="targets_above_full_loss", passed=not bad, metadata={"violations": ", ".join(bad) or "none"}
    )


@dg.asset(
    key_prefix=PREFIX,
    group_name=GROUP,
    deps=[sparse_model, dense_model],
    description="viz/<model>/<task>/<sweep>/<k>/viz_data.pt: circuits found by pruning (pipeline.demo.circuits)",
    check_specs=[
        dg.AssetCheckSpec(
            "prompt_sets_disjoint",
            asset=dg.AssetKey([*PREFIX, "circuits"]),
            description="No prompt repeats within or across the pruning, selection and evaluation sets",
        ),
        dg.AssetCheckSpec(
            "targets_above_full_loss",
            asset=dg.AssetKey([*PREFIX, "circuits"]),
            description="Every k_optim target lies above the full model's selection loss",
        ),
    ],
)
def circuits(context: dg.AssetExecutionContext, config: DemoStoreConfig) -> dg.MaterializeResult:
    b = _builder(context, config)
    entry = b.build_circuits()
    checks = [_prompt_sets_disjoint(b.out), _targets_above_full(b.out)]
    if entry is None:
        return dg.MaterializeResult(metadata={"skipped": True}, check_results=checks)
    return dg.MaterializeResult(metadata=entry["info"] | _files_metadata(b, entry), check_results=checks)


demo_store_assets = [corpus, tokenizer, sparse_model, dense_model, circuits]


def store_dir(config: DemoStoreConfig) -> Path:
    """The directory these assets write to under a config (for callers that read the store)."""
    return Path(config.out or embedded_store_dir())
