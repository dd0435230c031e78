"""How well the MNIST demo does its job: prompted digit and colour accuracy (overall and per pair), how clean its
pixels are, test NLL, Jacobi vs sequential time.

A small CNN trained here on the MNIST train split (colour-blind: it sees the ink, the brightest channel) reads the
digit of every generated image; the colour is the nearest of the six tints to the mean colour of the ink. Neither
sees a model sample while it is built. Every (digit, colour) pair is prompted with the training templates, so the
held-out pairs (the config's `holdout`, never in training) show whether the model composes digit and colour.
Pixel noise (`pixel_noise`): the std of the background, every channel of the pixels with no ink (brightest channel
above INK_THRESHOLD) within BACKGROUND_MARGIN px, which is 0 on real digits; and the std of the ink inside the strokes.

    python bench/demo_quality.py                          # the shipped checkpoints/demo_mnist_t2i
    python bench/demo_quality.py --checkpoint_path logs/demo_mnist_t2i/checkpoints/latest --per_combo 2

Prints the tables and writes <out_dir>/demo_quality.json and, per guidance scale, grid_cfg<cfg>.png: the first sample
of every (digit, colour) pair, rows digits 0-9, columns the six colours, held-out pairs framed.
"""
import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import COLOUR_TEMPLATES, COLOURS, DIGIT_NAMES, MNISTDataset, load_mnist_arrays, parse_holdout  # noqa: E402
from utils import recipe  # noqa: E402
from utils.config import guidance_scale, load_config  # noqa: E402
from utils.distributed import retain_freed_memory  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.files import write_json  # noqa: E402
from utils.image import write_png  # noqa: E402
from utils.pipeline import STARFlowPipeline  # noqa: E402

COLOUR_NAMES = list(COLOURS)
INK_THRESHOLD = 0.25  # brightest channel above this (in [0, 1]) counts as ink
BACKGROUND_MARGIN = 2  # background pixels have no ink within this many pixels (Chebyshev distance)


def ink(pixels):
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W): the brightest channel, the digit's shape whatever its tint."""
    return pixels.amax(1, keepdim=True)


def to_unit(images):
    """PIL images -> (N, 3, H, W) float in [0, 1]."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])


def colour_of(pixels):
    """Index into COLOUR_NAMES of the tint nearest to the mean ink colour (both scaled to a maximum of 1)."""
    mask = (ink(pixels) > INK_THRESHOLD).float()
    mean = (pixels * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)
    mean = mean / mean.amax(1, keepdim=True).clamp(min=1e-6)
    tints = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])
    return torch.cdist(mean, tints / tints.amax(1, keepdim=True)).argmin(1)


def pixel_noise(pixels):
    """How clean (N, C, H, W) pictures in [0, 1] are: std and mean of the background (every channel of the pixels
    with no ink within BACKGROUND_MARGIN px) and std of the ink inside the strokes (pixels whose 3x3 neighbourhood
    is all ink); real digits have a background std of 0."""
    brightest = ink(pixels)
    mask = (brightest > INK_THRESHOLD).float()
    background = F.max_pool2d(mask, 2 * BACKGROUND_MARGIN + 1, 1, BACKGROUND_MARGIN) == 0
    core = -F.max_pool2d(-mask, 3, 1, 1) > 0  # erosion (max_pool pads with -inf, so borders do not erode)
    values = pixels.masked_select(background.expand_as(pixels))
    stroke = brightest.masked_select(core)
    return {"background_std": round(values.std().item(), 5), "background_mean": round(values.mean().item(), 5),
            "background_fraction": round(background.float().mean().item(), 4),
            "stroke_std": round(stroke.std().item(), 4), "stroke_mean": round(stroke.mean().item(), 4)}


def to_uint8_scale(pixels):
    """Pixels in [0, 1] rounded to the 256 levels a PNG or MP4 frame holds, as the samples are."""
    return (pixels * 255).round() / 255


def print_noise(noise, what):
    print(f"pixel noise of {what}: background std {noise['background_std']:.4f} (mean {noise['background_mean']:.4f}, "
          f"{noise['background_fraction']:.0%} of pixels), ink inside strokes {noise['stroke_mean']:.3f} "
          f"+- {noise['stroke_std']:.3f}")


def print_pair_table(title, table, row_names, col_names, marked=()):
    """A rows x columns table of fractions, one line a row; cells (r, c) in `marked` carry a '*'."""
    print(title)
    print("      " + "".join(f"{c:>8}" for c in col_names))
    for r, name in enumerate(row_names):
        cells = [f"{table[r][c]:.0%}" + ("*" if (r, c) in marked else " ") for c in range(len(col_names))]
        print(f"{name:<6}" + "".join(f"{cell:>8}" for cell in cells))


def digit_net(size):
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, 10))


def mnist_at(size, split):
    """MNIST images resized to size x size (antialiased bilinear, as the demo data), in [0, 1], and labels."""
    images, labels = load_mnist_arrays(split)
    x = torch.from_numpy(images).float()[:, None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1), torch.from_numpy(labels)


def train_classifier(size, epochs, seed, limit=None):
    """Digit CNN on the MNIST train split (its first `limit` images if given; ink scaled like the six tints);
    returns it and its test-split accuracy on tinted test digits for digit and colour."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = mnist_at(size, "train")
    x, y = x[:limit], y[:limit]
    net = digit_net(size)
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(256):
            scale = torch.empty(len(idx), 1, 1, 1).uniform_(0.6, 1.1, generator=g)
            loss = F.cross_entropy(net(x[idx] * scale), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    xt, yt = mnist_at(size, "test")
    tint = torch.randint(len(COLOUR_NAMES), (len(xt),), generator=g)
    tinted = xt * torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[tint][:, :, None, None]
    with torch.no_grad():
        digit_acc = (net(ink(tinted)).argmax(1) == yt).float().mean().item()
    return net, digit_acc, (colour_of(tinted) == tint).float().mean().item()


def prompts_for(combos, per_combo):
    """per_combo prompts per (digit, colour), cycling through the training templates."""
    out = []
    for (digit, colour), k in itertools.product(combos, range(per_combo)):
        template = COLOUR_TEMPLATES[k % len(COLOUR_TEMPLATES)]
        out.append((digit, colour, template.format(name=DIGIT_NAMES[digit], digit=digit, colour=colour)))
    return out


def generate(pipe, prompts, cfg, seed, batch, **sampler):
    """Images in [0, 1] (N, 3, H, W) for the prompts, sample i seeded with seed + i, as sample.py does."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = pipe([p for _, _, p in chunk], cfg=cfg, **sampler,
                   generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))])
        images += [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in out.images]
    return torch.stack(images)


def score(net, images, prompts, holdout):
    """Fractions of images whose digit / colour / both match the prompt: all, seen pairs, held-out pairs, and per
    (digit, colour) pair ('pairs', keyed 'digit:colour')."""
    with torch.no_grad():
        digit = net(ink(images)).argmax(1)
    colour = colour_of(images)
    want_d = torch.tensor([d for d, _, _ in prompts])
    want_c = torch.tensor([COLOUR_NAMES.index(c) for _, c, _ in prompts])
    held = torch.tensor([(d, c) in holdout for d, c, _ in prompts])
    ok = {"digit": digit == want_d, "colour": colour == want_c}
    ok["both"] = ok["digit"] & ok["colour"]
    result = {}
    for part, rows in (("all", torch.ones_like(held)), ("seen", ~held), ("held_out", held)):
        if rows.any():
            result[part] = {k: round(v[rows].float().mean().item(), 4) for k, v in ok.items()}
            result[part]["n"] = int(rows.sum())
    result["pairs"] = {}
    for digit, colour in dict.fromkeys((d, c) for d, c, _ in prompts):
        rows = (want_d == digit) & (want_c == COLOUR_NAMES.index(colour))
        result["pairs"][f"{digit}:{colour}"] = {k: round(v[rows].float().mean().item(), 4) for k, v in ok.items()}
    return result


def save_grid(images, prompts, per_combo, holdout, path, zoom=4, pad=4):
    """First sample of every (digit, colour), enlarged: rows are digits, columns colours; held-out pairs framed."""
    cols, (h, w) = len(COLOUR_NAMES), images.shape[-2:]
    h, w = h * zoom, w * zoom
    canvas = Image.new("RGB", (cols * (w + pad) + pad, 10 * (h + pad) + pad))
    draw = ImageDraw.Draw(canvas)
    for i, (x, (digit, colour, _)) in enumerate(zip(images[::per_combo], prompts[::per_combo])):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        cell = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(cell).resize((w, h), Image.NEAREST), (left, top))
        if (digit, colour) in holdout:
            draw.rectangle((left - 2, top - 2, left + w + 1, top + h + 1), outline=(128, 128, 128), width=2)
    write_png(path, np.asarray(canvas))


@torch.no_grad()
def test_nll_bpd(pipe, n_images, seed, batch=100):
    """Conditional NLL of noise-augmented test digits (their captions), bits per dimension on the 0..255 scale."""
    cfg = pipe.config
    data = MNISTDataset(cfg.img_size, colour=True, split="test")
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, n_images, batch):
        items = [data.load(i, seed) for i in range(start, min(start + batch, n_images))]
        x = torch.stack([p for p, _, _ in items])
        x = x + cfg.noise_std * torch.randn(x.shape, generator=g)
        y = pipe.encode_text([recipe.decorate_prompt(cfg, c) for _, c, _ in items])
        z, _, logdets = pipe.model(x.to(pipe.device, pipe.dtype), y)
        losses = pipe.model.get_loss(z, logdets)
        total += (losses["loss_z"] + losses["loss_logdet"]).item() * len(items)
        count += len(items)
    nats = total / count + 0.5 * math.log(2 * math.pi)  # get_loss leaves out the Gaussian constant
    return to_bits_255(nats)


def to_bits_255(nats):
    """Nats per dimension of pixels in [-1, 1] -> bits per dimension of pixels v in 0..255 (x = v / 127.5 - 1)."""
    return (nats + math.log(127.5)) / math.log(2)


def noise_entropy_bpd(noise_std):
    """Entropy of the added Gaussian noise alone, the floor under any NLL of noise-augmented data."""
    return to_bits_255(0.5 * math.log(2 * math.pi * math.e * noise_std ** 2))


@torch.no_grad()
def jacobi_timing(pipe, prompts, cfg, seed):
    """model.reverse on one batch: sequential against block-wise Jacobi; seconds, speed-up, max |x - x_seq|."""
    c = pipe.config
    y = pipe.encode_text([recipe.decorate_prompt(c, p) for _, _, p in prompts])
    if cfg > 0:
        y = torch.cat([y, pipe.encode_text([recipe.null_prompt(c)] * len(prompts))])
    noise = torch.randn((len(prompts), c.channel_size, c.img_size, c.img_size),
                        generator=torch.Generator().manual_seed(seed)).to(pipe.device, pipe.dtype)
    runs = [("sequential", {}), ("jacobi block 16, th 1e-3", dict(jacobi=True, jacobi_block_size=16, jacobi_th=1e-3)),
            ("jacobi block 64, th 5e-3", dict(jacobi=True, jacobi_block_size=64, jacobi_th=5e-3)),
            ("jacobi block 64, th 1e-8", dict(jacobi=True, jacobi_block_size=64, jacobi_th=1e-8, jacobi_max_iter=64))]
    pipe.model.reverse(noise[:1], y[:1] if cfg <= 0 else y[[0, len(prompts)]], guidance=cfg)  # warm-up
    rows, reference = [], None
    for name, kwargs in runs:
        start = time.perf_counter()
        x = pipe.model.reverse(noise, y, guidance=cfg, **kwargs)
        seconds = time.perf_counter() - start
        reference = x if reference is None else reference
        rows.append({"sampler": name, "seconds": round(seconds, 3),
                     "max_abs_diff": float((x - reference).abs().max())})
    for row in rows:
        row["speed_up"] = round(rows[0]["seconds"] / row["seconds"], 2)
    return rows


def main(argv=None):
    parser = demo_parser(__doc__, "demo_mnist_t2i")
    parser.add_argument("--per_combo", type=int, default=10, help="samples per (digit, colour) pair")
    parser.add_argument("--cfg", type=float, nargs="+", default=None,
                        help="guidance scales to score (default: the config's cfg, as sample.py uses)")
    parser.add_argument("--nll_images", type=int, default=2000, help="test digits for the NLL (0: skip)")
    parser.add_argument("--timing", type=int, default=1, help="time sequential vs Jacobi sampling (0: skip)")
    add_common_args(parser, batch=60, out_dir="logs/demo_quality")
    return run_cli(run, parser.parse_args(argv))


def start_process(threads):
    """Threads, and freed memory kept, as the entry points' processes run (utils.distributed.init_distributed)."""
    torch.set_num_threads(threads)
    retain_freed_memory()


def demo_parser(doc, demo):
    """A demo benchmark's argument parser, with --checkpoint_path defaulting to the shipped checkpoints/<demo>."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / demo),
                        help="a folder with model.safetensors and config.yaml (the shipped demo or a train.py run)")
    return parser


def add_common_args(parser, batch, out_dir):
    """The flags both demo benchmarks share."""
    parser.add_argument("--classifier_epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=batch, help="samples per sampling batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--denoiser", default="auto", choices=recipe.DENOISERS,
                        help="denoising after the flow: auto (the learned self-denoiser if the model has one, else "
                             "score steps), learned, score or none")
    parser.add_argument("--score_denoise_steps", type=int, default=None,
                        help="score steps of denoising (default: the config's score_denoise_steps)")
    parser.add_argument("--out_dir", default=out_dir)


def denoising(args, config, pipe):
    """The denoising a benchmark's samples get, as report entries and in words."""
    method = recipe.choose_denoiser(args.denoiser, pipe.model.learnable_self_denoiser is not None)
    steps = args.score_denoise_steps or config.score_denoise_steps
    words = {"learned": f"the learned self-denoiser ({config.denoiser_target} target)",
             "score": f"{steps} score step(s) of denoising", "none": "no denoising"}[method]
    return {"denoiser": method, "score_denoise_steps": steps}, words


def load_demo(checkpoint_path, data_format):
    """(config, pipeline) of a demo checkpoint folder whose config trains on `data_format`."""
    config_path = os.path.join(checkpoint_path, "config.yaml")
    if not os.path.isfile(config_path):
        raise UserError(f"{checkpoint_path} has no config.yaml: pass a demo checkpoint folder (under checkpoints/, "
                        "or <logdir>/<run>/checkpoints/latest of a demo training run)")
    config = load_config(config_path)
    if config.data_format != data_format:
        raise UserError(f"{config_path} is not a {data_format} demo config (data_format {config.data_format})")
    return config, STARFlowPipeline.from_config(config, checkpoint_path, device="cpu")


def write_report(report, path):
    """The report as JSON, written atomically."""
    write_json(path, report)
    print(f"\nwrote {path}")


def run(args):
    start_process(args.threads)
    config, pipe = load_demo(args.checkpoint_path, "colour_mnist")
    holdout = parse_holdout(config.holdout)
    scales = args.cfg if args.cfg is not None else [guidance_scale(config)]
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"checkpoint_path": args.checkpoint_path, "img_size": config.img_size, "holdout": config.holdout,
              "per_combo": args.per_combo}
    entries, denoised_by = denoising(args, config, pipe)
    report.update(entries)

    start = time.perf_counter()
    net, clf_digit, clf_colour = train_classifier(config.img_size, args.classifier_epochs, args.seed)
    report["classifier"] = {"test_digit_accuracy": round(clf_digit, 4), "test_colour_accuracy": round(clf_colour, 4),
                            "seconds": round(time.perf_counter() - start, 1)}
    print(f"classifier (MNIST train split, {args.classifier_epochs} epochs): test-split digit accuracy "
          f"{clf_digit:.1%}, colour rule {clf_colour:.1%} on tinted test digits")

    data = MNISTDataset(config.img_size, colour=True, split="test")
    real = torch.stack([(data.load(i, args.seed)[0] + 1) / 2 for i in range(600)])
    report["pixel_noise_real"] = pixel_noise(to_uint8_scale(real))
    print_noise(report["pixel_noise_real"], "600 real tinted test digits")

    prompts = prompts_for([(d, c) for d in range(10) for c in COLOUR_NAMES], args.per_combo)
    steps = report["score_denoise_steps"]
    report["accuracy"], report["pixel_noise"], grids = {}, {}, {}
    print(f"\n{len(prompts)} samples per guidance scale, {denoised_by}, {args.threads} threads")
    print(f"{'cfg':>5} {'part':<9} {'n':>5} {'digit':>7} {'colour':>7} {'both':>7} {'seconds':>8}")
    for cfg in scales:
        start = time.perf_counter()
        images = generate(pipe, prompts, cfg, args.seed, args.batch, denoiser=args.denoiser,
                          score_denoise_steps=steps)
        seconds = time.perf_counter() - start
        result = score(net, images, prompts, holdout)
        report["accuracy"][f"cfg_{cfg:g}"] = dict(result, seconds=round(seconds, 1))
        report["pixel_noise"][f"cfg_{cfg:g}"] = pixel_noise(images)
        for part in [p for p in ("all", "seen", "held_out") if p in result]:
            r, took = result[part], f"{seconds:>8.1f}" if part == "all" else ""
            print(f"{cfg:>5g} {part:<9} {r['n']:>5} {r['digit']:>7.1%} {r['colour']:>7.1%} {r['both']:>7.1%} {took}")
        grids[cfg] = os.path.join(args.out_dir, f"grid_cfg{cfg:g}.png")
        save_grid(images, prompts, args.per_combo, holdout, grids[cfg])
    marked = {(d, COLOUR_NAMES.index(c)) for d, c in holdout}
    for cfg, grid in grids.items():
        pairs = report["accuracy"][f"cfg_{cfg:g}"]["pairs"]
        table = [[pairs[f"{d}:{c}"]["both"] for c in COLOUR_NAMES] for d in range(10)]
        print_pair_table(f"\nper pair, cfg {cfg:g}: digit and colour right (* held out)", table,
                         [str(d) for d in range(10)], COLOUR_NAMES, marked)
        print_noise(report["pixel_noise"][f"cfg_{cfg:g}"], f"the {len(prompts)} samples")
        print(f"sample grid (rows digits 0-9, columns {' '.join(COLOUR_NAMES)}; held out framed): {grid}")

    if args.nll_images > 0:
        start = time.perf_counter()
        bpd = test_nll_bpd(pipe, args.nll_images, args.seed)
        floor = noise_entropy_bpd(config.noise_std)
        report["test_nll"] = {"bits_per_dim": round(bpd, 4), "noise_entropy_bits_per_dim": round(floor, 4),
                              "images": args.nll_images, "noise_std": config.noise_std,
                              "seconds": round(time.perf_counter() - start, 1)}
        print(f"\ntest-split NLL ({args.nll_images} tinted test digits with their captions, noise_std "
              f"{config.noise_std}): {bpd:.3f} bits/dim (the added noise alone has {floor:.3f})")

    if args.timing:
        cfg = scales[-1]
        rows = jacobi_timing(pipe, prompts[::len(prompts) // 16][:16], cfg, args.seed)
        report["sampling_time"] = {"batch": 16, "cfg": cfg, "threads": args.threads, "rows": rows}
        print(f"\nsampling 16 images (cfg {cfg:g}, {args.threads} threads):")
        print(f"{'sampler':<28}{'seconds':>9}{'speed-up':>10}{'max|x-seq|':>12}")
        for row in rows:
            print(f"{row['sampler']:<28}{row['seconds']:>9.2f}{row['speed_up']:>10.2f}{row['max_abs_diff']:>12.2e}")

    write_report(report, os.path.join(args.out_dir, "demo_quality.json"))
    return report


if __name__ == "__main__":
    main()
