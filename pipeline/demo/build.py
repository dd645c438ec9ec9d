"""Build the embedded store: corpus -> tokenizer -> sparse (and dense) model -> circuits.

The output directory gets exactly the released layout (`shared/spec/checkpoint-format.md`):

    tinypython/encoder.json, tinypython/vocab.bpe
    models/<name>/beeg_config.json, models/<name>/final_model.pt
    train_curves/<name>/progress.json
    viz/<name>/<task>/<sweep>/<k>/viz_data.pt          (part 2, pipeline.demo.circuits)

plus `store_manifest.json`: the profile, the versions, and per finished stage its files with
their sha256. The manifest makes builds resumable (a finished stage whose files still match
is skipped) and protects other data (a directory holding a different store, or anything
that is not a store, is refused unless `force`).

Faults: every stage writes into a hidden temporary path next to its target and renames it
into place only when complete, and the manifest records a stage only after that; so an
interrupted build leaves no half-written file, and the next run redoes exactly the
unfinished stages. Leftover temporaries of a killed run are removed at the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inference.files import TMP_PREFIX, atomic_dir, sha256_file, write_atomic
from inference.loader import save_model
from pipeline.demo.profiles import Profile, get_profile

MANIFEST = "store_manifest.json"
MANIFEST_FORMAT = "circuits-demo-store/1"
LAYOUT_DIRS = ("tinypython", "models", "train_curves", "viz")
LOCK_NAME = ".build.lock"


class StoreBuildError(RuntimeError):
    """The store cannot be built here (a different store in the way, or a failed check)."""


# ---- temporaries ---------------------------------------------------------------------------


def remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries a killed build left behind (only in the store's own directories)."""
    for base in [out, *(out / d for d in LAYOUT_DIRS)]:
        if not base.is_dir():
            continue
        for p in list(base.rglob(f"{TMP_PREFIX}*")) if base != out else list(base.glob(f"{TMP_PREFIX}*")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


# ---- the builder -------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import tiktoken
    import tokenizers
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__,
    }


Progress = bool | Callable[[str], None] | None


class StoreBuilder:
    """Runs the stages of one store; each stage is skipped when the manifest says it is done.

    The Dagster assets call one stage each; `build_store` calls them all.
    """

    def __init__(self, out: str | Path, profile: str | Profile = "demo", force: bool = False, progress: Progress = True) -> None:
        self.out = Path(out)
        self.profile = get_profile(profile)
        self.force = force
        self.progress = progress
        self._corpus = None
        self._streams = None
        self.timings: dict[str, float] = {}  # stage -> seconds, for this run only (not in the manifest)
        self.out.mkdir(parents=True, exist_ok=True)
        self.identity = self._identity()
        with self._locked():
            self._claim_directory()
            remove_stale_temporaries(self.out)

    # -- messages ---------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if callable(self.progress):
            self.progress(msg)
        elif self.progress:
            from tqdm import tqdm

            tqdm.write(f"[build-store] {msg}", file=sys.stderr)

    # -- identity and the manifest ------------------------------------------------------------
    @property
    def corpus(self):
        if self._corpus is None:
            from pipeline.demo.corpus import corpus_for_profile

            self._corpus = corpus_for_profile(self.profile)
        return self._corpus

    def _identity(self) -> dict[str, Any]:
        from pipeline.demo.corpus import corpus_digest

        return {
            "profile": self.profile.name,
            "profile_fingerprint": self.profile.fingerprint(),
            "corpus_sha256": corpus_digest(self.corpus),
            "num_threads": self.profile.num_threads,
            **_versions(),
        }

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.out / MANIFEST
        if not path.exists():
            return None
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreBuildError(f"{path}: not a valid store manifest ({e}); use --force to rebuild this directory") from None
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise StoreBuildError(f"{path}: unknown manifest format {m.get('format') if isinstance(m, dict) else m!r}")
        return m

    def _write_manifest(self, m: dict[str, Any]) -> None:
        write_atomic(self.out / MANIFEST, json.dumps(m, indent=2, sort_keys=True) + "\n")

    def _new_manifest(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "identity": self.identity, "profile": self.profile.to_dict(), "stages": {}}

    def _claim_directory(self) -> None:
        """Refuse a directory holding a different store (or something else) unless forced."""
        try:
            m = self.read_manifest()
        except StoreBuildError:
            if not self.force:
                raise
            m = None
        if m is not None and m["identity"] == self.identity:
            return  # our own store, finished or not: resume it
        if m is not None and not self.force:
            diff = sorted(k for k in set(m["identity"]) | set(self.identity) if m["identity"].get(k) != self.identity.get(k))
            detail = ", ".join(f"{k}: {m['identity'].get(k)!r} there, {self.identity.get(k)!r} here" for k in diff)
            raise StoreBuildError(f"{self.out} holds a different store ({detail}); pass --force to replace it")
        existing = [p.name for p in self.out.iterdir() if p.name != LOCK_NAME and not p.name.startswith(TMP_PREFIX)]
        if existing and not self.force:
            raise StoreBuildError(
                f"{self.out} is not empty and holds no {MANIFEST} (found {sorted(existing)[:5]}); "
                "pass --force to build a store there (replacing its tinypython/, models/, train_curves/, viz/)"
            )
        if self.force:
            for name in (*LAYOUT_DIRS, MANIFEST):
                p = self.out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        self._write_manifest(self._new_manifest())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One builder at a time per store directory (Dagster may run assets in parallel)."""
        with open(self.out / LOCK_NAME, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def stage_done(self, stage: str) -> dict[str, Any] | None:
        """The manifest entry of a finished stage whose files are all present and unchanged."""
        m = self.read_manifest()
        entry = (m or {}).get("stages", {}).get(stage)
        if entry is None:
            return None
        for rel, digest in entry["files"].items():
            p = self.out / rel
            if not p.is_file() or sha256_file(p) != digest:
                return None
        return entry

    def _run_stage(self, stage: str, downstream: tuple[str, ...], fn: Callable[[], tuple[list[Path], dict]]) -> dict[str, Any]:
        with self._locked():
            done = self.stage_done(stage)
            if done is not None:
                self.log(f"{stage}: up to date, skipped")
                return done
            m = self.read_manifest() or self._new_manifest()
            # Anything built from this stage's old output is stale now.
            for name in (stage, *downstream):
                m["stages"].pop(name, None)
            self._write_manifest(m)
            t0 = time.perf_counter()
            files, info = fn()
            entry = {
                "files": {p.relative_to(self.out).as_posix(): sha256_file(p) for p in sorted(files)},
                "info": info,
                "seconds": round(time.perf_counter() - t0, 1),  # wall time of the build (the README's numbers)
            }
            m = self.read_manifest() or self._new_manifest()
            m["stages"][stage] = entry
            self._write_manifest(m)
            return entry

    # -- stages ---------------------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return ["corpus", "tokenizer", *(f"model:{n}" for n in self.profile.model_names), "circuits"]

    def _downstream(self, stage: str) -> tuple[str, ...]:
        names = self.stage_names()
        if stage == f"model:{self.profile.sparse_model}" and self.profile.dense_match_sparse and self.profile.train_dense:
            return (f"model:{self.profile.dense_model}", "circuits")  # the dense one is matched to it
        if stage.startswith("model:"):
            return ("circuits",)
        return tuple(names[names.index(stage) + 1 :])

    def build_corpus(self) -> dict[str, Any]:
        def run():
            summary = self.corpus.summary()
            self.log(
                f"corpus: {summary['train_files']} train files ({summary['train_bytes']:,} bytes), {summary['test_files']} test files ({summary['test_bytes']:,} bytes)"
            )
            return [], summary

        return self._run_stage("corpus", self._downstream("corpus"), run)

    def build_tokenizer(self) -> dict[str, Any]:
        from pipeline.demo import bpe

        def run():
            self.log(f"tokenizer: training a byte-level BPE with {self.profile.vocab_size} tokens")
            merges = bpe.train_bpe_merges((f.text for f in self.corpus.split("train")), self.profile.vocab_size)
            encoder_json, vocab_bpe = bpe.data_gym_files(merges)
            target = self.out / "tinypython"
            with atomic_dir(target) as tmp:
                (tmp / "encoder.json").write_text(encoder_json, encoding="utf-8")
                (tmp / "vocab.bpe").write_text(vocab_bpe, encoding="utf-8")
            self._streams = None
            enc = self.encoding()
            info = {"vocab_size": enc.n_vocab, "eot_token": enc.eot_token, **self._stream_sizes()}
            if enc.n_vocab != self.profile.vocab_size or enc.eot_token != self.profile.vocab_size - 1:
                raise StoreBuildError(
                    f"{target}: the written tokenizer has {enc.n_vocab} tokens (eot {enc.eot_token}), expected {self.profile.vocab_size}"
                )
            self.log(f"tokenizer: {info['train_tokens']:,} train tokens, {info['test_tokens']:,} test tokens")
            return [target / "encoder.json", target / "vocab.bpe"], info

        return self._run_stage("tokenizer", self._downstream("tokenizer"), run)

    def encoding(self):
        from inference.tokenizer import get_tokenizer

        return get_tokenizer(self.out / "tinypython")

    def streams(self):
        """(train, test) token streams of the corpus under the written tokenizer."""
        if self._streams is None:
            from pipeline.demo.train import token_stream

            enc = self.encoding()
            self._streams = tuple(
                token_stream((f.text for f in self.corpus.split(s)), enc, enc.eot_token) for s in ("train", "test")
            )
        return self._streams

    def _stream_sizes(self) -> dict[str, int]:
        train, test = self.streams()
        return {"train_tokens": len(train), "test_tokens": len(test)}

    def build_model(self, kind: str) -> dict[str, Any]:
        """Train and write the `sparse` or the `dense` model (and its training curve)."""
        if kind not in ("sparse", "dense"):
            raise ValueError(f"model kind must be 'sparse' or 'dense', got {kind!r}")
        name = self.profile.sparse_model if kind == "sparse" else self.profile.dense_model
        if name not in self.profile.model_names:
            raise StoreBuildError(f"profile {self.profile.name!r} has no {kind} model")
        stage = f"model:{name}"

        def run():
            from pipeline.demo.train import expected_nonzeros, train

            if self.stage_done("tokenizer") is None:
                raise StoreBuildError(f"{self.out}: build the tokenizer before the models")
            train_stream, test_stream = self.streams()
            on_eval = self._task_metrics_on_eval()
            stop_at = None
            if kind == "dense" and self.profile.dense_match_sparse:
                sparse_entry = self.stage_done(f"model:{self.profile.sparse_model}")
                if sparse_entry is None:
                    raise StoreBuildError(f"{self.out}: build the sparse model before the loss-matched dense one")
                stop_at = sparse_entry["info"]["final_test_xent"]
                self.log(f"{name}: stops at held-out xent <= {stop_at:.4f} (the sparse model's)")
            self.log(f"{name}: training {self.profile.steps} steps ({kind})")
            t0 = time.perf_counter()
            with self._bar(name) as on_step:
                result = train(
                    self.profile,
                    train_stream,
                    test_stream,
                    sparse=(kind == "sparse"),
                    on_step=on_step,
                    on_eval=on_eval,
                    stop_at_xent=stop_at,
                )
            seconds = time.perf_counter() - t0
            want = expected_nonzeros(result.model, self.profile, sparse=(kind == "sparse"))
            if result.nonzero_weights != want:
                raise StoreBuildError(f"{name}: {result.nonzero_weights} nonzero weights after training, expected exactly {want}")
            curve_path = self.out / "train_curves" / name / "progress.json"
            model_dir = self.out / "models" / name
            write_atomic(curve_path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in result.curve))
            with atomic_dir(model_dir) as tmp:
                save_model(result.model, tmp)
            info = {
                "kind": kind,
                "num_params": result.num_params,
                "weight_entries": result.weight_entries,
                "nonzero_weights": result.nonzero_weights,
                "weight_density": result.nonzero_weights / result.weight_entries,
                "target_density": self.profile.target_density if kind == "sparse" else 1.0,
                "final_test_xent": result.final_test_xent,
                "unigram_xent": result.unigram_xent,
                "nats_below_unigram": result.unigram_xent - result.final_test_xent,
                "heldout_tokens": self.profile.final_eval_windows * self.profile.block_size,
                "steps": result.steps,
                "matched_to_xent": stop_at,
            }
            self.log(
                f"{name}: held-out xent {result.final_test_xent:.3f} nats (unigram {result.unigram_xent:.3f}), "
                f"{result.nonzero_weights:,}/{result.weight_entries:,} weights nonzero, {seconds:.0f} s"
            )
            self.timings[stage] = seconds
            return [model_dir / "beeg_config.json", model_dir / "final_model.pt", curve_path], info

        return self._run_stage(stage, self._downstream(stage), run)

    def _task_metrics_on_eval(self):
        """progress.json gets, at every eval, each task's accuracy and loss on test-split pairs
        (a training monitor: not the circuits' evaluation set, which part 2 builds disjoint from
        its selection and pruning sets), so the curve shows when the model learned each task."""
        from pipeline.demo.prune import PruneConfig
        from pipeline.demo.tasks import held_out_task_docs, task_metrics

        cfg = PruneConfig.from_profile(self.profile)
        docs = held_out_task_docs(self.corpus, self.encoding(), cfg.ctx, cfg.test_pairs)

        def on_eval(step, model) -> dict:
            out = {}
            for task, d in docs.items():
                for key, value in task_metrics(model(d), d).items():
                    out[f"task_{key}/{task}"] = value
            return out

        return on_eval

    def build_circuits(self) -> dict[str, Any] | None:
        """Part 2 (pipeline.demo.circuits), when that module exists; None when it does not."""
        import importlib
        import importlib.util

        if importlib.util.find_spec("pipeline.demo.circuits") is None:
            self.log("circuits: pipeline.demo.circuits is not available, skipped")
            return None
        circuits = importlib.import_module("pipeline.demo.circuits")

        def run():
            for n in self.profile.model_names:
                if self.stage_done(f"model:{n}") is None:
                    raise StoreBuildError(f"{self.out}: build model {n} before the circuits")
            log = self.log if self.progress else None
            paths = circuits.build_circuits(self.out, self.profile, progress=log)
            files = [Path(p) if Path(p).is_absolute() else self.out / p for p in paths]
            return [f for f in files if f.is_file()], {"num_files": len(files)}

        return self._run_stage("circuits", (), run)

    @contextlib.contextmanager
    def _bar(self, name: str):
        if self.progress is True:
            from tqdm import tqdm

            with tqdm(total=self.profile.steps, desc=name, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

                def on_step(step: int, loss: float) -> None:
                    bar.update(1)
                    if step % 10 == 0 or step == self.profile.steps:
                        bar.set_postfix(loss=f"{loss:.3f}")

                yield on_step
        elif callable(self.progress):
            every = max(1, self.profile.steps // 10)

            def on_step(step: int, loss: float) -> None:
                if step % every == 0 or step == self.profile.steps:
                    self.progress(f"{name}: step {step}/{self.profile.steps}, loss {loss:.3f}")

            yield on_step
        else:
            yield None

    def forget(self, stage: str) -> None:
        """Mark a stage (and what was built from it) as not done: the next build redoes it,
        e.g. `--redo circuits` reruns the circuits on the existing models."""
        with self._locked():
            m = self.read_manifest() or self._new_manifest()
            for name in (stage, *self._downstream(stage)):
                m["stages"].pop(name, None)
            self._write_manifest(m)

    def build_all(self) -> Path:
        self.build_corpus()
        self.build_tokenizer()
        for kind in ("sparse", "dense") if self.profile.train_dense else ("sparse",):
            self.build_model(kind)
        self.build_circuits()
        return self.out


def build_store(out: str | Path, profile: str | Profile = "demo", force: bool = False, progress: Progress = True) -> Path:
    """Build (or finish building) the store at `out`; returns its path."""
    builder = StoreBuilder(out, profile, force=force, progress=progress)
    return builder.build_all()


def build_store_cli(args) -> int:
    """`circuits build-store --profile P --out DIR [--force]`."""
    from pipeline.settings import embedded_store_dir

    out = args.out or embedded_store_dir()
    t0 = time.perf_counter()
    try:
        builder = StoreBuilder(out, args.profile, force=args.force, progress=True)
        if getattr(args, "redo", None):
            builder.forget(args.redo)
        builder.build_all()
    except StoreBuildError as e:
        print(f"circuits build-store: error: {e}", file=sys.stderr)
        return 1
    m = builder.read_manifest() or {}
    print(f"store {args.profile!r} built at {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for stage, entry in sorted(m.get("stages", {}).items()):
        if stage.startswith("model:"):
            i = entry["info"]
            print(
                f"  {stage[6:]}: {i['num_params']:,} params, weight density {i['weight_density']:.4f}, "
                f"held-out xent {i['final_test_xent']:.3f} (unigram {i['unigram_xent']:.3f})",
                file=sys.stderr,
            )
    return 0
