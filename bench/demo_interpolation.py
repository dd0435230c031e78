"""Interpolation between tinted MNIST test digits through the image demo's noise space (STARFlowPipeline.interpolate),
against the pixel cross-fade, judged by bench/demo_quality.py's digit CNN and by the flow's own likelihood.

    python bench/demo_interpolation.py                     # the shipped checkpoints/demo_mnist_t2i

--pairs pairs of test digits (never seen in training; each pair two different digits, tinted as the demo's data
tints them) are joined by --steps points, under the null prompt with guidance 0, the same noise on both ends. Per
point of the path (fraction t, averaged over the pairs):
- conf: how sure the digit CNN is of any digit (its mean top softmax); first / second: the share it reads as the
  pair's first or second digit;
- ink: the pixels above the ink threshold, over the mean of the two ends' (a cross-fade's middle carries both
  strokes);
- bits/dim: the flow's exact NLL of the point before denoising (its noisy pixels, in 8-bit units); the cross-fade of
  the two ends' noisy pixels carries the same noise, so the two columns compare like with like.
The ends: the mean and largest pixel error of the path's first and last pictures against the test digits. Prints a
table; writes <out_dir>/demo_interpolation.json and demo_interpolation.png (a row per pair: the flow's path, then
the cross-fade).
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import MNISTDataset  # noqa: E402
from demo_quality import (INK_THRESHOLD, demo_parser, ink, load_demo, to_unit, train_classifier,  # noqa: E402
                          start_process, write_report)
from utils import recipe  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.image import to_uint8, write_png  # noqa: E402
from utils.metrics import LEVEL, bits_per_dim  # noqa: E402

ZOOM = 3  # the PNG's pixels per sample pixel
PICTURE_PAIRS = 6  # pairs shown in the PNG
GAP = 8  # pixels between a pair's flow path and its cross-fade


def digit_pairs(data, count):
    """Indices (a, b) of `count` pairs of test digits, in order, each pair two different digits."""
    pairs, i = [], 0
    while len(pairs) < count:
        j = i + 1
        while int(data.labels[j]) == int(data.labels[i]):
            j += 1
        pairs.append((i, j))
        i = j + 1
    return pairs


def judge(net, pixels, first, second):
    """(top softmax, read as first, read as second) per picture; pixels (N, 3, H, W) in [0, 1]."""
    with torch.no_grad():
        probs = net(ink(pixels)).softmax(1)
    read = probs.argmax(1)
    return probs.amax(1), (read == first).float(), (read == second).float()


def ink_amount(pixels):
    return (ink(pixels) > INK_THRESHOLD).flatten(1).sum(1).float()


def run(args):
    start_process(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.steps < 3 or args.pairs < 1:
        raise UserError("--steps must be at least 3 (the ends and a point between) and --pairs at least 1")
    config, pipe = load_demo(args.checkpoint_path, "colour_mnist")
    net, digit_acc, _ = train_classifier(config.img_size, args.classifier_epochs, args.seed)
    data = MNISTDataset(config.img_size, colour=True, split="test")
    fractions = torch.linspace(0, 1, args.steps)
    y = pipe.encode_text([recipe.null_prompt(config, 0, None, config.noise_std)] * args.steps)
    stats = {name: torch.zeros(5, args.steps) for name in ("flow", "crossfade")}  # conf, first, second, ink, bpd
    end_errors, rows = [], []
    start = time.perf_counter()
    for k, (a, b) in enumerate(digit_pairs(data, args.pairs)):
        ends = [Image.fromarray(to_uint8(data.load(i, args.seed)[0])) for i in (a, b)]
        first, second = int(data.labels[a]), int(data.labels[b])
        out = pipe.interpolate(ends, "", steps=args.steps, cfg=0.0, generator=torch.Generator().manual_seed(k))
        t = fractions.view(-1, 1, 1, 1)
        fade_noisy = (1 - t) * out.noisy_latents[:1] + t * out.noisy_latents[-1:]
        clean_ends = to_unit(ends)
        paths = {"flow": (to_unit(out.images), out.noisy_latents),
                 "crossfade": ((1 - t) * clean_ends[:1] + t * clean_ends[1:], fade_noisy)}
        for name, (pixels, noisy) in paths.items():
            conf, is_first, is_second = judge(net, pixels, first, second)
            ink_share = ink_amount(pixels) / ink_amount(clean_ends).mean()
            nll = pipe.likelihood(noisy, y)[1].cpu()
            bpd = torch.from_numpy(bits_per_dim(nll.numpy(), noisy[0].numel(), LEVEL))
            stats[name] += torch.stack([conf, is_first, is_second, ink_share, bpd.float()])
        pictures = (to_unit(out.images[::args.steps - 1]) - clean_ends).abs() * 255
        end_errors.append((float(pictures.mean()), float(pictures.amax())))
        if k < PICTURE_PAIRS:
            flow, fade = (np.concatenate(list(to_uint8(pixels * 2 - 1)), axis=1) for pixels, _ in paths.values())
            rows.append(np.concatenate([flow, np.zeros((flow.shape[0], GAP, 3), np.uint8), fade], axis=1))
    seconds = time.perf_counter() - start
    stats = {name: s / args.pairs for name, s in stats.items()}

    print(f"digit CNN: {digit_acc:.1%} on tinted test digits. {args.pairs} pairs of test digits, {args.steps} points "
          f"each ({seconds:.1f} s):")
    columns = ("conf", "first", "second", "ink", "bits/dim")
    print(f"{'t':>6} | flow path: " + "".join(f"{c:>9}" for c in columns) + " | cross-fade: " +
          "".join(f"{c:>9}" for c in columns))
    table = []
    for i, t in enumerate(fractions.tolist()):
        row = {"t": round(t, 4)}
        for name in stats:
            row[name] = dict(zip(("confidence", "reads_first", "reads_second", "ink", "bits_per_dim"),
                                 [round(float(v), 4) for v in stats[name][:, i]]))
        table.append(row)
        cells = ["".join(f"{float(v):>9.3f}" for v in stats[name][:, i]) for name in stats]
        print(f"{t:>6.3f} |            {cells[0]} |             {cells[1]}")
    mean_error = float(np.mean([e for e, _ in end_errors]))
    worst = max(m for _, m in end_errors)
    print(f"ends of the flow path against the test digits: mean pixel error {mean_error:.2f}, largest {worst:.0f} "
          f"(of 255; after noise_std {config.noise_std:g} noise and denoising)")
    grid = os.path.join(args.out_dir, "demo_interpolation.png")
    gap = np.zeros((2, rows[0].shape[1], 3), np.uint8)
    picture = np.concatenate([part for row in rows for part in (row, gap)][:-1])
    write_png(grid, picture.repeat(ZOOM, 0).repeat(ZOOM, 1))
    print(f"a row per pair: the flow's path, then the cross-fade: {grid}")
    report = {"checkpoint_path": args.checkpoint_path, "pairs": args.pairs, "steps": args.steps, "seed": args.seed,
              "classifier_digit_accuracy": round(digit_acc, 4), "path": table,
              "ends": {"mean_pixel_error": round(mean_error, 3), "largest_pixel_error": worst},
              "seconds": round(seconds, 1), "grid": grid}
    write_report(report, os.path.join(args.out_dir, "demo_interpolation.json"))
    return report


def main(argv=None):
    parser = demo_parser(__doc__, "demo_mnist_t2i")
    parser.add_argument("--pairs", type=int, default=50, help="pairs of test digits")
    parser.add_argument("--steps", type=int, default=9, help="points per path, both ends included")
    parser.add_argument("--classifier_epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out_dir", default="logs/demo_interpolation")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
