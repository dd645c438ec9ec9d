"""One ablation pass per location of a release-shaped circuit: a baseline `CircuitModel` vs this one.

    python bench/synthetic.py --store /tmp/rc-conn --nodes 2048      # once (connected circuit)
    python bench/ablation_passes.py [--store /tmp/rc-conn] [--baseline 5abeeca] [--per-pass 8]

On the first chunk of task docs (2 docs, as `pipeline.recompute` runs them), builds the circuit-only
model twice, from `inference/circuit_model.py` at git revision `--baseline` and from the working
tree, then runs one mean-ablation pass of `--per-pass` nodes at every location with each, in turns,
and prints each pass's process CPU time, the ratio, and the largest loss difference between the two
(they must agree within float rounding). The sum over locations, times the passes each location
needs, is one chunk's ablation time per mode; times chunks x 2 modes, the whole recompute's.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def baseline_module(rev: str):
    """`inference/circuit_model.py` as of git revision `rev`, imported under another name."""
    src = subprocess.run(["git", "show", f"{rev}:inference/circuit_model.py"], cwd=HERE.parent, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "circuit_model_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("circuit_model_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_pass(cm, docs, loc: str, per_pass: int):
    """(CPU seconds, losses) of one batched mean-ablation pass of the first `per_pass` nodes at `loc`."""
    import torch
    import torch.nn.functional as F

    from inference import circuit as C

    ch = cm.circuit[loc][:per_pass]
    A = len(ch)
    value = torch.tensor([float(cm.fill[loc][c]) for c in ch.tolist()])
    ablations = {loc: (A, torch.arange(A), torch.arange(A), value)}
    n, T = docs.shape
    lengths = C.docs_lengths(docs)
    rows = torch.arange(n) * T + lengths - 2
    answers, half = docs[torch.arange(n), lengths - 1], n // 2
    tokens = torch.cat([torch.stack([answers[:half], answers[half:]], 1)] * 2)
    i, last = C.parse_location(loc)[0], cm.config.n_layer - 1
    relevant = (torch.arange(T)[None, :] <= (lengths - 2)[:, None]).reshape(-1)
    ties = (torch.zeros(A, n, dtype=torch.bool), relevant)  # as CircuitModel.ablation_losses passes them
    t = time.process_time()
    with torch.no_grad():
        state = cm.start_states[i]
        for j in range(i, last + 1):
            state = cm._run_layer(j, state, ablations, ties, rows if j == last else None)
        logits = cm._final_logits(state, rows, tokens, at_rows=True).float()
    cpu = time.process_time() - t
    return cpu, -(F.log_softmax(logits[:, :half], -1)[..., 0] + F.log_softmax(logits[:, half:], -1)[..., 1]).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("/tmp/rc-conn"))
    ap.add_argument("--baseline", default="5abeeca", help="git revision of the baseline circuit_model.py")
    ap.add_argument("--per-pass", type=int, default=8)
    args = ap.parse_args()

    import torch

    from inference import circuit as C
    from inference import circuit_model as CM
    from inference import load_model
    from pipeline import recompute as R
    from pipeline.formats import read_viz_data

    viz_path = next((args.store / "viz").rglob("viz_data.pt"))
    model = load_model(args.store / "models" / viz_path.relative_to(args.store / "viz").parts[0], device="cpu").eval()
    viz = read_viz_data(viz_path)
    run = R._Run(model, viz, R.CHUNK_TOKENS, 0, None)
    docs = run.docs_of(run.chunks[0])
    means = R.means_over_sequences(model, R.sample_sequences(R.snippet_sequences(viz), 8192), run.locations)[0]
    frozen = C.frozen_norm_scales(model, docs)
    print(f"load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}; chunk {tuple(docs.shape)}")
    models = {}
    for name, mod in (("baseline", baseline_module(args.baseline)), ("current", CM)):
        t = time.perf_counter()
        models[name] = mod.CircuitModel(model, docs, run.circuit, means, frozen)
        print(f"{name} circuit-only model built in {time.perf_counter() - t:.0f} s")
    total = {"baseline": 0.0, "current": 0.0}
    for loc in models["current"].locations:
        n = len(models["current"].circuit[loc])
        if loc == C.FINAL_RESID or n == 0:
            continue
        (t0, l0), (t1, l1) = (one_pass(models[k], docs, loc, args.per_pass) for k in ("baseline", "current"))
        passes = math.ceil(n / args.per_pass)
        total["baseline"] += passes * t0
        total["current"] += passes * t1
        print(
            f"{loc}: {n} nodes, baseline {t0:.2f} s, current {t1:.2f} s, x{t0 / t1:.2f}, max |dloss| {(l0 - l1).abs().max():.1e}"
        )
    b, c = total["baseline"], total["current"]
    chunks = len(run.chunks)
    print(f"one chunk, one mode (CPU s): baseline {b:.0f}, current {c:.0f}, x{b / c:.2f}")
    print(
        f"extrapolated to {chunks} chunks x 2 modes (CPU h): baseline {b * chunks * 2 / 3600:.1f}, current {c * chunks * 2 / 3600:.1f}"
    )


if __name__ == "__main__":
    main()
