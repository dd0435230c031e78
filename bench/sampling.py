"""Sequential vs block-wise Jacobi sampling: network calls, wall time and their ratios, from one run.

A 256-wide, 6-block deep-shallow STARFlow (random weights) on 16x16x4 latents, batch 4 with guidance.
    python bench/sampling.py [--device cuda] [--threads 2]
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_flow import MetaBlock, Model  # noqa: E402


def build(device):
    torch.manual_seed(0)
    model = Model(in_channels=4, img_size=16, patch_size=1, channels=256, num_blocks=6,
                  layers_per_block=[2, 2, 2, 2, 2, 8], head_dim=64, rope=True, sos=True, txt_size=16, txt_dim=64,
                  cond_top_only=True, use_softplus=True, use_final_norm=True, soft_clip=4.0, seq_order="L2R")
    with torch.no_grad():  # random but non-trivial flow steps
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.1))
    return model.eval().to(device)


def run(model, noise, y, **kwargs):
    calls = {"n": 0}
    original = MetaBlock.step

    def counted(self, *args, **kw):
        calls["n"] += 1
        return original(self, *args, **kw)

    MetaBlock.step = counted
    try:
        if noise.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.reverse(noise, y, guidance=3.0, **kwargs)
        if noise.is_cuda:
            torch.cuda.synchronize()
        return out, calls["n"], time.perf_counter() - start
    finally:
        MetaBlock.step = original


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.device)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, 4, 16, 16, generator=g).to(args.device)
    y = torch.randn(8, 16, 64, generator=g).to(args.device)  # 4 prompts + 4 null prompts
    run(model, noise[:1], y[0::4], jacobi=True, jacobi_block_size=64)  # warm-up
    seq, seq_calls, seq_time = run(model, noise, y)
    print(f"{'sampler':<34}{'net calls':>10}{'seconds':>10}{'speed-up':>10}{'calls ratio':>13}{'max|x-seq|':>12}")
    print(f"{'sequential':<34}{seq_calls:>10}{seq_time:>10.2f}{1.0:>10.2f}{1.0:>13.2f}{0.0:>12.2e}")
    for block_size, th in [(16, 1e-3), (64, 1e-3), (64, 1e-6), (64, 1e-10)]:
        out, calls, seconds = run(model, noise, y, jacobi=True, jacobi_block_size=block_size, jacobi_th=th,
                                  jacobi_max_iter=100)
        diff = (out - seq).abs().max().item()
        name = f"jacobi block {block_size}, th {th:g}"
        print(f"{name:<34}{calls:>10}{seconds:>10.2f}{seq_time / seconds:>10.2f}{seq_calls / calls:>13.2f}"
              f"{diff:>12.2e}")


if __name__ == "__main__":
    main()
