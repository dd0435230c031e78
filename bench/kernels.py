"""The flow's matmuls through PyTorch's F.linear (MKL on CPU), through oneDNN (plain and prepacked weights), and
through misc/linear.py's Linear, which picks between them by size on AMD CPUs and takes F.linear on others; the
three products of a training step's layer (forward, input gradient, weight gradient) each in MKL and in oneDNN; then
its RoPE rotations as a real rotation and as misc/pe.py's complex product; forward, and forward + backward; from one
run.

    python bench/kernels.py                 # 2 threads
    python bench/kernels.py --threads 1 --reps 500

Shapes (rows x in -> out) of a transformer layer's four matmuls: the bench model's (width 256) at a decoding step (4
samples: 4 rows in the shallow steps, which see no text; 8 with guidance in the deep step), a 16-token Jacobi chunk
(128 rows) and a training batch (16 x 272 rows); the demo model's (width 128) at a decoding step (16 prompts +
guidance: 32 rows), a 16-token chunk (512 rows) and a training batch (16 x 76 rows). RoPE: the queries of the same
cases (batch x heads x tokens x head_dim), sliced from a fused qkv output (attention rotates queries and keys
together, twice these heads). Prints microseconds and the ratios Linear / F.linear and complex / real (lower is
better); writes <out_dir>/kernels.json.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from misc.linear import (ONEDNN, ONEDNN_KERNELS, Linear, cpu_vendor, onednn_linear, onednn_weight_grad,  # noqa: E402
                         prepacked, uses_onednn)
from misc.pe import RotaryEmbedding, apply_rope, grid_positions  # noqa: E402
from utils.errors import run_cli  # noqa: E402

WIDTHS = {"bench": 256, "demo": 128}
CASES = [("bench shallow decode", "bench", 4), ("bench decode", "bench", 8), ("bench jacobi chunk", "bench", 128),
         ("bench training", "bench", 16 * 272),
         ("demo decode", "demo", 32), ("demo jacobi chunk", "demo", 512), ("demo training", "demo", 16 * 76)]
HEAD_DIMS = {"bench": 64, "demo": 32}
ROPE_CASES = [("bench decode", "bench", 8, 1), ("bench jacobi chunk", "bench", 8, 16),  # (name, model, batch, tokens)
              ("bench training", "bench", 16, 272), ("demo decode", "demo", 32, 1),
              ("demo jacobi chunk", "demo", 32, 16), ("demo training", "demo", 16, 76)]


def layer_shapes(width):
    """(in, out) of a transformer layer's four matmuls: qkv, attention out, MLP up, MLP down."""
    return [(width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)]


def seconds(fn, reps):
    """Median of `reps` timed calls after warm-up calls."""
    for _ in range(max(3, reps // 10)):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def timings(rows, n_in, n_out, reps):
    """Microseconds of F.linear, forced oneDNN (plain, packed) and Linear as decoding runs it; forward + backward of
    F.linear and of Linear."""
    layer, x = Linear(n_in, n_out), torch.randn(rows, n_in)
    xg = x.clone().requires_grad_()
    reps = max(5, reps // 20) if rows > 1000 else reps

    def aten_train():
        F.linear(xg, layer.weight, layer.bias).sum().backward()

    def linear_train():
        layer(xg).sum().backward()

    with torch.no_grad():
        aten = seconds(lambda: F.linear(x, layer.weight, layer.bias), reps)
        plain = seconds(lambda: onednn_linear(x, layer.weight, layer.bias), reps)
        with prepacked(layer):
            packed = seconds(lambda: onednn_linear(x, layer.packed_weight(), layer.bias), reps)
            routed = seconds(lambda: layer(x), reps)
    return {"aten": aten, "onednn": plain, "onednn_packed": packed, "linear": routed,
            "aten_train": seconds(aten_train, reps), "linear_train": seconds(linear_train, reps)}


def training_products(rows, n_in, n_out, reps):
    """Microseconds of a training layer's three products as autograd of F.linear runs them (MKL) and as Linear's
    oneDNN route does: forward, input gradient g @ W, weight gradient g.T @ x."""
    x, weight, bias, g = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(n_out), torch.randn(rows, n_out)
    reps = max(5, reps // 20)
    return {"forward_mkl": seconds(lambda: F.linear(x, weight, bias), reps),
            "forward_onednn": seconds(lambda: onednn_linear(x, weight, bias), reps),
            "input_grad_mkl": seconds(lambda: g.mm(weight), reps),
            "input_grad_onednn": seconds(lambda: onednn_linear(g, weight.t(), None), reps),
            "weight_grad_mkl": seconds(lambda: x.t().mm(g).t(), reps),  # AddmmBackward's form
            "weight_grad_onednn": seconds(lambda: onednn_weight_grad(g, x), reps)}


def real_rotation(t, cos, sin):
    """The real form of RoPE, the baseline: t * cos + (-t1, t0) * sin on adjacent pairs, halves stacked back."""
    pairs = t.float().unflatten(-1, (-1, 2))
    return t.float() * cos + torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2) * sin


def rope_timings(batch, heads, tokens, head_dim, reps):
    """Microseconds of the real rotation and of apply_rope on attention's query layout; forward + backward of each."""
    width = heads * head_dim
    q = torch.randn(batch, tokens, 3 * width)[..., :width].unflatten(-1, (heads, head_dim)).transpose(1, 2)
    rotation = RotaryEmbedding(head_dim)(grid_positions(1, tokens))  # the model's table for a row of tokens
    cos, sin = (part.repeat_interleave(2, dim=-1) for part in (rotation.real, rotation.imag))
    torch.testing.assert_close(apply_rope(q, rotation), real_rotation(q, cos, sin), atol=1e-5, rtol=1e-5)
    qg = q.detach().clone().requires_grad_()
    reps = max(5, reps // 20) if batch * tokens > 1000 else reps
    with torch.no_grad():
        real = seconds(lambda: real_rotation(q, cos, sin), reps)
        complex_product = seconds(lambda: apply_rope(q, rotation), reps)
    return {"real": real, "complex": complex_product,
            "real_train": seconds(lambda: real_rotation(qg, cos, sin).sum().backward(), reps),
            "complex_train": seconds(lambda: apply_rope(qg, rotation).sum().backward(), reps)}


def run(args):
    from utils.files import write_json
    if not ONEDNN_KERNELS:
        raise SystemExit("error: this PyTorch build has no oneDNN (torch.backends.mkldnn); nothing to compare")
    torch.set_num_threads(args.threads)
    vendor = cpu_vendor() or "unknown CPU"
    print(f"{vendor} ({'oneDNN route on' if ONEDNN else 'F.linear only'}), {args.threads} threads; microseconds per "
          f"call (median of {args.reps}), ratio = Linear / F.linear")
    print(f"{'case':<21}{'shape':>16}{'F.linear':>10}{'oneDNN':>8}{'packed':>8}{'Linear':>8}{'route':>8}{'ratio':>7}"
          f"{'train F':>10}{'train L':>10}{'ratio':>7}")
    report = []
    for name, model, rows in CASES:
        for n_in, n_out in layer_shapes(WIDTHS[model]):
            t = {k: v * 1e6 for k, v in timings(rows, n_in, n_out, args.reps).items()}
            route = "oneDNN" if uses_onednn(torch.empty(rows, n_in), torch.empty(n_out, n_in)) else "MKL"
            print(f"{name:<21}{f'{rows}x{n_in}->{n_out}':>16}{t['aten']:>10.1f}{t['onednn']:>8.1f}"
                  f"{t['onednn_packed']:>8.1f}{t['linear']:>8.1f}{route:>8}{t['linear'] / t['aten']:>7.2f}"
                  f"{t['aten_train']:>10.1f}{t['linear_train']:>10.1f}{t['linear_train'] / t['aten_train']:>7.2f}",
                  flush=True)
            report.append(dict(case=name, rows=rows, n_in=n_in, n_out=n_out, route=route, **t))
    print("\nA training layer's products, each in MKL (autograd of F.linear) and in oneDNN (Linear's route); "
          "microseconds per call, ratio = oneDNN / MKL")
    print(f"{'case':<21}{'shape':>16}" + "".join(f"{h + ' MKL':>13}{'oneDNN':>8}{'ratio':>7}"
                                                 for h in ("forward", "input g", "weight g")))
    for name, model, rows in CASES:
        if "training" not in name:
            continue
        for n_in, n_out in layer_shapes(WIDTHS[model]):
            t = {k: v * 1e6 for k, v in training_products(rows, n_in, n_out, args.reps).items()}
            print(f"{name:<21}{f'{rows}x{n_in}->{n_out}':>16}" + "".join(
                f"{t[p + '_mkl']:>13.1f}{t[p + '_onednn']:>8.1f}{t[p + '_onednn'] / t[p + '_mkl']:>7.2f}"
                for p in ("forward", "input_grad", "weight_grad")), flush=True)
            report.append(dict(case=f"products {name}", rows=rows, n_in=n_in, n_out=n_out, **t))
    print(f"\nRoPE of the queries; microseconds per call, ratio = complex product (misc/pe.py) / real rotation")
    print(f"{'case':<21}{'shape':>16}{'real':>10}{'complex':>9}{'ratio':>7}{'train R':>10}{'train C':>10}{'ratio':>7}")
    for name, model, batch, tokens in ROPE_CASES:
        heads, head_dim = WIDTHS[model] // HEAD_DIMS[model], HEAD_DIMS[model]
        t = {k: v * 1e6 for k, v in rope_timings(batch, heads, tokens, head_dim, args.reps).items()}
        print(f"{name:<21}{f'{batch}x{heads}x{tokens}x{head_dim}':>16}{t['real']:>10.1f}{t['complex']:>9.1f}"
              f"{t['complex'] / t['real']:>7.2f}{t['real_train']:>10.1f}{t['complex_train']:>10.1f}"
              f"{t['complex_train'] / t['real_train']:>7.2f}", flush=True)
        report.append(dict(case=f"rope {name}", batch=batch, heads=heads, tokens=tokens, head_dim=head_dim, **t))
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, "kernels.json"),
               {"cpu_vendor": vendor, "onednn_route": ONEDNN, "threads": args.threads, "reps": args.reps,
                "unit": "microseconds", "rows": report})
    print(f"\nwrote {os.path.join(args.out_dir, 'kernels.json')}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--out_dir", default="logs/kernels")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
