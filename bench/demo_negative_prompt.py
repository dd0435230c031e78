"""Negative prompts on the image demo: guidance away from a prompt instead of from the null prompt.

    python bench/demo_negative_prompt.py                     # the shipped checkpoints/demo_mnist_t2i

Every row draws --samples images from the null prompt '' (the model's unconditional distribution), seeds 0..N-1:
first unguided, then guided away from a negative prompt, p('')^(1+w) / p(negative)^w. bench/demo_quality.py's
digit classifier (trained here on the MNIST train split) and tint reader count how many samples show the negative
prompt's digit and colour. Prints a table; writes <out_dir>/demo_negative_prompt.json and a PNG grid of each row's
first samples (a row of the grid per row of the table).
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from demo_quality import (COLOUR_NAMES, colour_of, demo_parser, generate, ink, load_demo,  # noqa: E402
                          start_process, train_classifier, write_report)
from dataset import DIGIT_NAMES  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.image import make_grid, to_uint8, write_png  # noqa: E402

GRID_SAMPLES = 16  # of each row, in the PNG
ZOOM = 3  # the PNG's pixels per sample pixel


def shares(net, images):
    """Fraction of the images read as each digit and as each tint."""
    with torch.no_grad():
        digits = net(ink(images)).argmax(1)
    colours = colour_of(images)
    return ({str(d): round(float((digits == d).float().mean()), 4) for d in range(10)},
            {c: round(float((colours == i).float().mean()), 4) for i, c in enumerate(COLOUR_NAMES)})


def run(args):
    start_process(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    config, pipe = load_demo(args.checkpoint_path, "colour_mnist")
    net, digit_acc, colour_acc = train_classifier(config.img_size, args.classifier_epochs, args.seed)
    report = {"checkpoint_path": args.checkpoint_path, "samples": args.samples, "seed": args.seed,
              "classifier": {"digit_accuracy": round(digit_acc, 4), "colour_accuracy": round(colour_acc, 4)},
              "rows": []}
    unconditional = [(None, None, "")] * args.samples
    rows = [("none", 0.0, None)] + [(f"'{n}', cfg {w:g}", w, n) for n in args.negatives for w in args.cfg]
    targets = [(int(d), c) for d, c in (n.split(":") for n in args.targets)]
    print(f"digit classifier: {digit_acc:.1%} on tinted test digits; tint reader {colour_acc:.1%}")
    print(f"\n{args.samples} samples of the null prompt per row; share read as each target digit and tint:")
    header = "".join(f"{f'{DIGIT_NAMES[d]}s':>8}{c:>8}" for d, c in targets)
    print(f"{'negative prompt':<34}{header}{'seconds':>9}")
    cells = []
    for name, w, negative in rows:
        start = time.perf_counter()
        images = generate(pipe, unconditional, w, args.seed, args.batch,
                          **({} if negative is None else {"negative_prompt": negative}))
        seconds = time.perf_counter() - start
        digits, colours = shares(net, images)
        report["rows"].append({"negative_prompt": negative, "cfg": w, "digit_shares": digits,
                               "colour_shares": colours, "seconds": round(seconds, 1)})
        line = "".join(f"{digits[str(d)]:>8.1%}{colours[c]:>8.1%}" for d, c in targets)
        print(f"{name:<34}{line}{seconds:>9.1f}")
        cells.append(np.concatenate(list(to_uint8(images[:GRID_SAMPLES] * 2 - 1)), axis=1))
    grid = os.path.join(args.out_dir, "demo_negative_prompt.png")
    write_png(grid, make_grid(cells, tall=True)[0].repeat(ZOOM, 0).repeat(ZOOM, 1))
    report["grid"] = grid
    print(f"rows of the grid, top to bottom: {', '.join(name for name, _, _ in rows)}: {grid}")
    write_report(report, os.path.join(args.out_dir, "demo_negative_prompt.json"))
    return report


def main(argv=None):
    parser = demo_parser(__doc__, "demo_mnist_t2i")
    parser.add_argument("--negatives", nargs="+", default=["a red seven", "a blue zero"], help="negative prompts")
    parser.add_argument("--targets", nargs="+", default=["7:red", "0:blue"],
                        help="digit:tint pairs whose shares the table shows")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales of the guided rows")
    parser.add_argument("--samples", type=int, default=300, help="samples per row")
    parser.add_argument("--classifier_epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=50, help="images per sampling call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out_dir", default="logs/demo_negative_prompt")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
