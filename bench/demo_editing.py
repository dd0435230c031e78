"""Editing, inpainting and reconstruction by flow inversion on the MNIST image demo, judged as bench/demo_quality.py
judges samples: a digit CNN trained on the MNIST train split and the nearest-tint colour rule.

- Colour editing: a sample of "a {colour} {digit}" is edited to the next colour ("a red seven" -> "a green seven")
  by STARFlowPipeline.edit; reported: how often the colour judge reads the target colour, how often the digit judge
  still reads the digit, and the overlap (IoU) of the ink masks before and after.
- Inpainting: tinted MNIST test digits (never seen in training) lose their lower half, which STARFlowPipeline.inpaint
  regenerates under the digit's own prompt and under another digit's ("a {colour} {digit + 1}"); reported: how often
  the judge reads the prompted digit.
- Reconstruction: the same prompt and guidance, no added noise and no refresh: the largest pixel error.

    python bench/demo_editing.py                    # the shipped checkpoints/demo_mnist_t2i
    python bench/demo_editing.py --per_pair 1 --inpaint_digits 30

Prints a table and writes <out_dir>/demo_editing.json and demo_editing.png (rows: originals, colour edits; test
digits, erased, inpainted under their own prompt, inpainted under another digit's).
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import DIGIT_NAMES, MNISTDataset  # noqa: E402
from demo_quality import (COLOUR_NAMES, add_common_args, colour_of, demo_parser, ink, load_demo,  # noqa: E402
                          start_process, to_unit, train_classifier, write_report)
from utils.config import guidance_scale  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.image import write_png  # noqa: E402

INK = 0.25  # brightest channel above this (in [0, 1]) counts as ink, as in demo_quality


def prompt(digit, colour):
    return f"a {colour} {DIGIT_NAMES[digit]}"


def gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def batched(pipe_call, items, batch):
    """Concatenated PIL images of pipe_call(chunk) over chunks of `items`."""
    images = []
    for start in range(0, len(items), batch):
        images += pipe_call(items[start:start + batch], start).images
    return images


def colour_editing(pipe, net, args):
    """Sample every (digit, colour), edit each to the next colour; judge colour, digit and ink overlap."""
    pairs = [(d, c, COLOUR_NAMES[(i + 1) % len(COLOUR_NAMES)]) for d in range(10)
             for i, c in enumerate(COLOUR_NAMES) for _ in range(args.per_pair)]
    sources = batched(lambda chunk, s: pipe([prompt(d, c) for d, c, _ in chunk],
                                            generator=gens(args.seed + s, len(chunk))), pairs, args.batch)
    edited = batched(lambda chunk, s: pipe.edit(sources[s:s + len(chunk)], [prompt(d, t) for d, _, t in chunk],
                                                source_prompt=[prompt(d, c) for d, c, _ in chunk],
                                                generator=gens(args.seed + 10_000 + s, len(chunk))), pairs, args.batch)
    before, after = to_unit(sources), to_unit(edited)
    with torch.no_grad():
        digits = net(ink(after)).argmax(1)
    want_digit = torch.tensor([d for d, _, _ in pairs])
    want_colour = torch.tensor([COLOUR_NAMES.index(t) for _, _, t in pairs])
    a, b = ink(before) > INK, ink(after) > INK
    iou = ((a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).clamp(min=1)).mean().item()
    result = {"edits": len(pairs), "target_colour": (colour_of(after) == want_colour).float().mean().item(),
              "same_digit": (digits == want_digit).float().mean().item(), "ink_iou": iou}
    return result, sources, edited, [prompt(d, c) for d, c, _ in pairs]


def inpainting(pipe, net, args, mask_path):
    """Test digits lose their lower half; regenerate it under their own prompt and under digit + 1's."""
    data = MNISTDataset(pipe.config.img_size, colour=True, split="test")
    items = [data.load(i, args.seed) for i in range(args.inpaint_digits)]
    result, rows = {}, {"test": [], "erased": []}
    for pixels, _, _ in items:
        picture = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        rows["test"].append(Image.fromarray(picture))
        erased = picture.copy()
        erased[picture.shape[0] // 2:] = 0
        rows["erased"].append(Image.fromarray(erased))
    labels = [int(data.labels[i]) for i in range(args.inpaint_digits)]
    colours = [int(colour_of(to_unit([im]))[0]) for im in rows["test"]]
    for name, shift in (("own_prompt", 0), ("other_prompt", 1)):
        wanted = [(d + shift) % 10 for d in labels]
        images = []
        for i, picture in enumerate(rows["test"]):
            out = pipe.inpaint(picture, mask_path, prompt(wanted[i], COLOUR_NAMES[colours[i]]), rounds=args.rounds,
                               candidates=args.candidates, generator=gens(args.seed + 20_000 + i, 1))
            images += out.images
        with torch.no_grad():
            read = net(ink(to_unit(images))).argmax(1)
        result[name] = {"digits": len(images),
                        "reads_prompted_digit": (read == torch.tensor(wanted)).float().mean().item()}
        rows[name] = images
    return result, rows


def reconstruction(pipe, sources, prompts, args):
    """Largest pixel error of an edit to the source's own prompt with no added noise (cfg 0 and the config's)."""
    errors = {}
    for cfg in (0.0, guidance_scale(pipe.config)):
        back = batched(lambda chunk, s: pipe.edit(sources[s:s + len(chunk)], chunk, source_prompt=chunk, cfg=cfg,
                                                  noise_std=0, generator=gens(args.seed, len(chunk))), prompts,
                       args.batch)
        errors[f"cfg_{cfg:g}"] = int(max(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max()
                                         for a, b in zip(sources, back)))
    return errors


def picture(path, sources, edited, rows, zoom=4, pad=2):
    """Originals above their colour edits (12 spread over the pairs), then the inpainting rows (the first 12 test
    digits: original, erased, regenerated under its own prompt and under another digit's)."""
    step = max(1, len(sources) // 12)
    lines = [sources[::step][:12], edited[::step][:12]] + [rows[k][:12] for k in ("test", "erased", "own_prompt",
                                                                                 "other_prompt")]
    cells = [[np.asarray(im.resize((im.width * zoom, im.height * zoom), Image.NEAREST)) for im in line]
             for line in lines]
    h, w = cells[0][0].shape[:2]
    grid = np.zeros((len(lines) * (h + pad) + pad, 12 * (w + pad) + pad, 3), np.uint8)
    for r, line in enumerate(cells):
        for c, cell in enumerate(line):
            grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = cell
    write_png(path, grid)


def run(args):
    start_process(args.threads)
    config, pipe = load_demo(args.checkpoint_path, "colour_mnist")
    os.makedirs(args.out_dir, exist_ok=True)
    net, clf_digit, _ = train_classifier(config.img_size, args.classifier_epochs, args.seed)
    report = {"checkpoint_path": args.checkpoint_path, "classifier_test_accuracy": round(clf_digit, 4),
              "per_pair": args.per_pair, "rounds": args.rounds, "candidates": args.candidates}
    start = time.perf_counter()
    report["colour_editing"], sources, edited, prompts = colour_editing(pipe, net, args)
    report["colour_editing"]["seconds"] = round(time.perf_counter() - start, 1)
    mask = Image.new("L", (config.img_size, config.img_size))
    mask.paste(255, (0, config.img_size // 2, config.img_size, config.img_size))
    mask_path = os.path.join(args.out_dir, "lower_half_mask.png")
    write_png(mask_path, np.asarray(mask))
    start = time.perf_counter()
    report["inpainting"], rows = inpainting(pipe, net, args, mask_path)
    report["inpainting"]["seconds"] = round(time.perf_counter() - start, 1)
    report["reconstruction_max_pixel_error"] = reconstruction(pipe, sources, prompts, args)
    e, p = report["colour_editing"], report["inpainting"]
    print(f"\ncolour editing ({e['edits']} edits): target colour {e['target_colour']:.1%}, same digit "
          f"{e['same_digit']:.1%}, ink IoU {e['ink_iou']:.2f}")
    print(f"inpainting the lower half ({p['own_prompt']['digits']} test digits): own prompt read "
          f"{p['own_prompt']['reads_prompted_digit']:.1%}, another digit's prompt read "
          f"{p['other_prompt']['reads_prompted_digit']:.1%}")
    print(f"reconstruction, largest pixel error (0..255): {report['reconstruction_max_pixel_error']}")
    path = os.path.join(args.out_dir, "demo_editing.png")
    picture(path, sources, edited, rows)
    print(f"picture: {path}")
    write_report(report, os.path.join(args.out_dir, "demo_editing.json"))
    return report


def main(argv=None):
    parser = demo_parser(__doc__, "demo_mnist_t2i")
    parser.add_argument("--per_pair", type=int, default=2, help="edits per (digit, colour) pair")
    parser.add_argument("--inpaint_digits", type=int, default=100, help="test digits to inpaint")
    parser.add_argument("--rounds", type=int, default=4, help="inpainting rounds")
    parser.add_argument("--candidates", type=int, default=4, help="inpainting candidates per round")
    add_common_args(parser, batch=60, out_dir="logs/demo_editing")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
