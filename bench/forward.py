"""Benchmark: the project's forward path vs the released dense algorithm, at release-scale widths.

Builds a model with csp_yolo2's widths (d_model 2048, 128 heads of 16, d_mlp 8192, d_pos_emb 32,
sink, RMSNorm, bigram table, untied, AbsTopK 1/4 at the release's 8 location types) with fewer
layers, block weights at the release's density (1/1000 nonzero), saves it in the released layout,
then in a fresh process (so peak RSS is its own):

- loads it with `inference.load_model` (memory-mapped) and reports peak RSS against the file size;
- times, at batch 1 and 8 of 1024 tokens (each path: one warm-up run, then the median of
  `--repeat` runs, 3 by default, the released and the fast path taking turns):
  `released`: the released algorithm written out here (dense `F.linear`, AbsTopK by topk+scatter,
              sink attention as SDPA over a prepended zero key with a (B, H, T, T+1) additive
              mask, as the release's `SDPAWithSink`; attention run one sequence at a time so
              batch 8 fits in memory, which only helps it);
  `dense+attn`: the model with dense matmuls but the fast sink attention (where the time goes);
  `fast`:     the project's path, `inference.fast.accelerate(model)`;
- prints tokens/s, the ratio fast / released (target >= 5x), in wall-clock and in process CPU
  time (steadier when other jobs share the cores), and the max |logit| difference, with the
  number of positions whose logits differ by more than 1e-4 of the logit scale (AbsTopK is
  discontinuous: two values equal to float rounding can swap places when summed in another order).

    python bench/forward.py [--layers 2] [--tokens 1024] [--batches 1 8] [--threads N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CSP_YOLO2_WIDTHS = dict(
    d_model=2048, n_head=128, d_head=16, d_mlp=8192, block_size=1024, vocab_size=2048, afrac=0.25,
    afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out,mlp_neuron,attn_v,attn_k,attn_q", d_pos_emb=32, sink=True,
    rms_norm=True, enable_bigram_table=True, learnable_bigram_table=True, tied_unembed=False,
)  # fmt: skip
DENSITY = 1e-3  # the release's fraction of nonzero non-embedding weights


def build_release_model(n_layer: int, density: float = DENSITY, seed: int = 0):
    """A GPT with csp_yolo2 widths whose block weights keep `density` of their entries, scaled
    so that activations stay O(1) (values are random; only sizes and sparsity matter)."""
    from inference import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, **CSP_YOLO2_WIDTHS)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".h." in name and p.dim() == 2:  # non-embedding weights: sparse
                p.mul_(torch.rand_like(p) < density).mul_(math.sqrt(p.shape[1]) / 6)
            elif name.endswith("sink_logit"):
                p.normal_()
            elif name == "bigram_table":
                p.normal_(std=0.1)
    return model


# ---- the released algorithm, written out (dense matmuls) ------------------------------------
def _abs_topk(x: torch.Tensor, frac: float) -> torch.Tensor:
    k = int(frac * x.shape[-1])
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, idx, x.gather(-1, idx))


def _sdpa_with_sink(q, k, v, sink_logit):
    """The release's SDPAWithSink: a zero key/value slot prepended, an additive (B,H,T,T+1) mask."""
    B, H, T, D = q.shape
    zeros = q.new_zeros(B, H, 1, D)
    k, v = torch.cat([zeros, k], 2), torch.cat([zeros, v], 2)
    allow = torch.ones(T, T + 1, dtype=torch.bool).tril(1)
    allow[:, 0] = True
    mask = torch.where(allow, 0.0, torch.finfo(q.dtype).min).view(1, 1, T, T + 1).expand(B, H, T, T + 1)
    mask = mask + F.pad(sink_logit.view(1, H, 1, 1), (0, T))  # sink logit in column 0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.no_grad()
def released_forward(sd: dict, cfg, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    H, dh, frac = cfg.n_head, cfg.d_head, cfg.afrac
    pos = sd["transformer.wpe.weight"][:T].unsqueeze(0).expand(B, T, -1)
    x = sd["transformer.wte.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = torch.cat(
            [F.rms_norm(x, (cfg.d_model,), sd[p + "ln_1.weight"]), F.rms_norm(pos, (cfg.d_pos_emb,), sd[p + "ln_p1.weight"])], -1
        )
        q, k, v = F.linear(_abs_topk(h, frac), sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]).split(H * dh, -1)
        q, k, v = (_abs_topk(t, frac).view(B, T, H, dh).transpose(1, 2) for t in (q, k, v))
        y = torch.cat(
            [_sdpa_with_sink(q[b : b + 1], k[b : b + 1], v[b : b + 1], sd[p + "attn.attn_imp.sink_logit"]) for b in range(B)]
        )
        y = F.linear(y.transpose(1, 2).reshape(B, T, H * dh), sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"])
        x = x + _abs_topk(y, frac)
        h = torch.cat(
            [F.rms_norm(x, (cfg.d_model,), sd[p + "ln_2.weight"]), F.rms_norm(pos, (cfg.d_pos_emb,), sd[p + "ln_p2.weight"])], -1
        )
        h = F.gelu(F.linear(_abs_topk(h, frac), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + _abs_topk(F.linear(_abs_topk(h, frac), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"]), frac)
    x = F.rms_norm(x, (cfg.d_model,), sd["transformer.ln_f.weight"])
    return F.linear(x, sd["lm_head.weight"]) + sd["final_logits_bias"] + sd["bigram_table"][idx]


# ---- measurement (child process) ---------------------------------------------------------
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timed(fn, *args):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, (time.perf_counter() - start, time.process_time() - cpu)


SETTLE_S = 0.05


def _median_interleaved(repeat: int, fns: dict):
    """Each function once untimed (warm-up: allocator, thread pools, caches), then `repeat` rounds
    calling each in turn, so that a slow spell of the machine hits both sides alike; per function,
    its output and the (wall, cpu) times of its median-wall run. Each timed run starts after a
    pause of SETTLE_S: torch's OpenMP threads spin for ~5 ms after a parallel op (libgomp's default
    wait policy), and that spin, left by the run before, would take a core from the next run."""
    outs = {name: fn() for name, fn in fns.items()}
    runs: dict = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(SETTLE_S)
            outs[name], t = _timed(fn)
            runs[name].append(t)
    return {name: (outs[name], sorted(r)[len(r) // 2]) for name, r in runs.items()}


def child(directory: str, tokens: int, batches: list[int], threads: int | None, repeat: int) -> dict:
    from inference import load_model
    from inference.fast import accelerate, decelerate

    if threads:
        torch.set_num_threads(threads)
    base_rss = _peak_rss()
    model, (load_s, _) = _timed(load_model, directory)
    load_rss = _peak_rss() - base_rss
    cfg, sd = model.config, model.state_dict()
    out = {"load_s": load_s, "load_peak_rss": load_rss, "file_size": (Path(directory) / "final_model.pt").stat().st_size}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        accelerate(model)
        model(torch.zeros(1, 8, dtype=torch.long))  # builds the compressed weights once
        for B in batches:
            idx = torch.randint(0, cfg.vocab_size, (B, tokens), generator=gen)
            paths = {"released": lambda idx=idx: released_forward(sd, cfg, idx), "fast": lambda idx=idx: model(idx)}
            res = _median_interleaved(repeat, paths)
            (ref, t_released), (fast, t_fast) = res["released"], res["fast"]
            decelerate(model)
            accelerate(model, max_density=0.0)  # dense matmuls, fast attention
            _, t_dense_attn = _median_interleaved(repeat, {"dense": lambda idx=idx: model(idx)})["dense"]
            decelerate(model)
            accelerate(model)
            model(idx[:, :8])
            diff, scale = (fast - ref).abs(), ref.abs().max().item()
            out[f"batch{B}"] = {
                "released_tok_s": B * tokens / t_released[0],
                "dense_attn_tok_s": B * tokens / t_dense_attn[0],
                "fast_tok_s": B * tokens / t_fast[0],
                "cpu_ratio": t_released[1] / t_fast[1],
                "max_logit_diff": diff.max().item(),
                "logit_scale": scale,
                "positions_off": int((diff.amax(-1) > 1e-4 * scale).sum()),
                "positions": B * tokens,
            }
    out["peak_rss"] = _peak_rss()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per path after one warm-up; the median is reported")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.batches, args.threads, args.repeat)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from inference.loader import save_model

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; csp_yolo2 widths, {args.layers} layers, density {DENSITY}; "
        f"times: median of {args.repeat} runs after a warm-up"
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_model(build_release_model(args.layers), tmp)
        print(f"built and saved the checkpoint in {time.perf_counter() - t0:.1f} s")
        cmd = [sys.executable, __file__, "--child", tmp, "--tokens", str(args.tokens), "--repeat", str(args.repeat)]
        cmd += ["--batches", *map(str, args.batches)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    mb = 2**20
    print(f"load: {res['load_s']:.2f} s, peak RSS of loading {res['load_peak_rss'] / mb:.0f} MB "
          f"for a {res['file_size'] / mb:.0f} MB checkpoint ({res['load_peak_rss'] / res['file_size']:.2f}x file size)")  # fmt: skip
    for B in args.batches:
        r = res[f"batch{B}"]
        print(
            f"batch {B} x {args.tokens}: released {r['released_tok_s']:.0f} tok/s, dense+fast-attn {r['dense_attn_tok_s']:.0f} tok/s, "
            f"fast {r['fast_tok_s']:.0f} tok/s -> {r['fast_tok_s'] / r['released_tok_s']:.1f}x the released "
            f"({r['cpu_ratio']:.1f}x in CPU time; {r['fast_tok_s'] / r['dense_attn_tok_s']:.1f}x dense+fast-attn); "
            f"max logit diff {r['max_logit_diff']:.1e} (logit scale {r['logit_scale']:.1f}; "
            f"{r['positions_off']} of {r['positions']} positions off by > 1e-4 of it)"
        )
    print(f"peak RSS of the measuring process: {res['peak_rss'] / mb:.0f} MB")


if __name__ == "__main__":
    main()
