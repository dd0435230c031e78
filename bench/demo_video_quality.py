"""How well the moving-MNIST video demo does its job: prompted digit and direction accuracy (overall and per pair), how
clean its pixels are, Jacobi vs sequential time.

The digit CNN of bench/demo_quality.py, trained here on the MNIST train split at the clip's digit size, reads each
frame through a window centred on the ink; its logits are summed over the frames. The direction is the dominant
axis and sign of the ink's centre of mass from the first frame to the last. Every (digit, direction) pair is
prompted with the training templates. Pixel noise is bench/demo_quality.py's, over every frame.

    python bench/demo_video_quality.py                     # the shipped checkpoints/demo_moving_mnist_t2v
    python bench/demo_video_quality.py --checkpoint_path logs/demo_moving_mnist_t2v-<date>/checkpoints/latest

Prints the tables and writes <out_dir>/demo_video_quality.json, grid.mp4 (the first clip of every pair, rows digits
0-9, columns directions) and strip.png (the same clips, each as its frames side by side).
"""
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataset import DIGIT_NAMES, DIRECTIONS, MOTION_TEMPLATES, moving_digit_size  # noqa: E402
from dataset import MovingMNISTDataset  # noqa: E402
from demo_quality import (add_common_args, demo_parser, denoising, load_demo, pixel_noise, print_noise,  # noqa: E402
                          print_pair_table, start_process, to_uint8_scale, train_classifier, write_report)
from utils.config import guidance_scale, parse_vid_size  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.image import write_png, write_video  # noqa: E402

DIRECTION_NAMES = list(DIRECTIONS)


def ink_centres(clips):
    """(B, T, 3, H, W) in [0, 1] -> (B, T, 2): the (y, x) centre of mass of each frame's brightest channel."""
    ink = clips.amax(2)
    mass = ink.sum((2, 3)).clamp(min=1e-6)
    ys = torch.arange(ink.shape[-2], dtype=ink.dtype)
    xs = torch.arange(ink.shape[-1], dtype=ink.dtype)
    return torch.stack([(ink.sum(3) * ys).sum(2) / mass, (ink.sum(2) * xs).sum(2) / mass], -1)


def direction_of(clips):
    """Index into DIRECTION_NAMES: the dominant axis and sign of the ink's motion from first to last frame."""
    centres = ink_centres(clips)
    dy, dx = (centres[:, -1] - centres[:, 0]).unbind(-1)
    vertical = dy.abs() > dx.abs()
    return torch.where(vertical, torch.where(dy > 0, 3, 2), torch.where(dx > 0, 1, 0))


def digit_windows(clips, size):
    """(B, T, 1, size, size): each frame's ink cropped around its centre of mass (kept inside the canvas)."""
    ink = clips.amax(2, keepdim=True)
    B, T, _, H, W = ink.shape
    centres = ink_centres(clips).round().long()
    out = torch.zeros(B, T, 1, size, size)
    for b, t in itertools.product(range(B), range(T)):
        top = int((centres[b, t, 0] - size // 2).clamp(0, H - size))
        left = int((centres[b, t, 1] - size // 2).clamp(0, W - size))
        out[b, t] = ink[b, t, :, top:top + size, left:left + size]
    return out


def digit_of(net, clips, size):
    """The digit the CNN reads in a clip: its logits summed over the frames."""
    windows = digit_windows(clips, size)
    with torch.no_grad():
        logits = net(windows.flatten(0, 1)).unflatten(0, windows.shape[:2])
    return logits.log_softmax(-1).sum(1).argmax(-1)


def prompts_for(per_combo):
    """per_combo prompts per (digit, direction), cycling through the training templates."""
    out = []
    for digit, direction, k in itertools.product(range(10), DIRECTION_NAMES, range(per_combo)):
        template = MOTION_TEMPLATES[k % len(MOTION_TEMPLATES)]
        out.append((digit, direction, template.format(name=DIGIT_NAMES[digit], digit=digit, direction=direction)))
    return out


def generate(pipe, prompts, cfg, seed, batch, **sampler):
    """Clips in [0, 1] (N, T, 3, H, W) for the prompts, sample i seeded with seed + i, as sample.py does."""
    clips = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = pipe([p for _, _, p in chunk], cfg=cfg, **sampler,
                   generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))])
        clips += [torch.from_numpy(np.stack([np.array(f) for f in frames])).permute(0, 3, 1, 2).float() / 255
                  for frames in out.frames]
    return torch.stack(clips)


def score(net, clips, prompts, digit_size):
    """Fractions of clips whose digit / direction / both match the prompt, overall and per (digit, direction) pair
    ('pairs', keyed 'digit:direction')."""
    want_d = torch.tensor([d for d, _, _ in prompts])
    want_m = torch.tensor([DIRECTION_NAMES.index(m) for _, m, _ in prompts])
    ok = {"digit": digit_of(net, clips, digit_size) == want_d, "direction": direction_of(clips) == want_m}
    ok["both"] = ok["digit"] & ok["direction"]
    result = {k: round(v.float().mean().item(), 4) for k, v in ok.items()}
    result["n"], result["pairs"] = len(prompts), {}
    for digit, direction in dict.fromkeys((d, m) for d, m, _ in prompts):
        rows = (want_d == digit) & (want_m == DIRECTION_NAMES.index(direction))
        result["pairs"][f"{digit}:{direction}"] = {k: round(v[rows].float().mean().item(), 4) for k, v in ok.items()}
    return result


def pair_grid(clips, zoom=3, pad=3, strip=False):
    """(40, T, 3, H, W) in [0, 1], one clip per (digit, direction) -> uint8, rows digits, columns directions:
    (T, H', W', 3) frames of a grid video, or with strip=True one (H', W', 3) picture where every cell holds its
    clip's frames side by side."""
    cells = F.interpolate(clips.flatten(0, 1), scale_factor=zoom, mode="nearest").unflatten(0, clips.shape[:2])
    if strip:  # (N, T, 3, H, W) -> (N, 1, 3, H, T W + T - 1): frames left to right, 1 px grey gaps between them
        gap = torch.full((len(cells), 1, 3, cells.shape[3], 1), 0.25)
        parts = [p for t in range(cells.shape[1]) for p in (cells[:, t:t + 1], gap)][:-1]
        cells = torch.cat(parts, -1)
    (T, _, H, W), cols = cells.shape[1:], len(DIRECTION_NAMES)
    grid = torch.zeros(T, 3, 10 * (H + pad) + pad, cols * (W + pad) + pad)
    for i, cell in enumerate(cells):
        top, left = pad + (i // cols) * (H + pad), pad + (i % cols) * (W + pad)
        grid[:, :, top:top + H, left:left + W] = cell
    frames = (grid * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return frames[0] if strip else frames


def main(argv=None):
    parser = demo_parser(__doc__, "demo_moving_mnist_t2v")
    parser.add_argument("--per_combo", type=int, default=5, help="clips per (digit, direction) pair")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the config's cfg)")
    parser.add_argument("--timing", type=int, default=1, help="also sample with Jacobi and compare times (0: skip)")
    parser.add_argument("--prior_temp", type=float, default=1.0, help="prior temperature (the noise's std)")
    add_common_args(parser, batch=40, out_dir="logs/demo_video_quality")
    return run_cli(run, parser.parse_args(argv))


def run(args):
    start_process(args.threads)
    config, pipe = load_demo(args.checkpoint_path, "moving_mnist")
    cfg = args.cfg if args.cfg is not None else guidance_scale(config)
    digit_size = moving_digit_size(config.img_size)
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"checkpoint_path": args.checkpoint_path, "vid_size": config.vid_size, "img_size": config.img_size,
              "cfg": cfg, "per_combo": args.per_combo, "prior_temp": args.prior_temp}
    entries, denoised_by = denoising(args, config, pipe)
    report.update(entries)

    net, clf_digit, _ = train_classifier(digit_size, args.classifier_epochs, args.seed)
    report["classifier_test_digit_accuracy"] = round(clf_digit, 4)
    print(f"classifier (MNIST train split at {digit_size} px): test-split digit accuracy {clf_digit:.1%}")
    frames, fps = parse_vid_size(config.vid_size)
    data = MovingMNISTDataset(config.img_size, frames, fps, split="test")
    real = torch.stack([(data.load(i, args.seed)[0] + 1) / 2 for i in range(200)])
    report["pixel_noise_real"] = pixel_noise(to_uint8_scale(real.flatten(0, 1)))
    print_noise(report["pixel_noise_real"], "200 real test clips")

    prompts = prompts_for(args.per_combo)
    samplers = [("sequential", {})]
    if args.timing:
        samplers.append(("jacobi block 16, th 1e-3", dict(jacobi=True, jacobi_block_size=16, jacobi_th=1e-3)))
    report["samplers"] = []
    print(f"\n{len(prompts)} clips of {frames} frames, cfg {cfg:g}, prior temperature {args.prior_temp:g}, "
          f"{denoised_by}, {args.threads} threads")
    print(f"{'sampler':<28}{'digit':>8}{'direction':>11}{'both':>8}{'seconds':>9}")
    for name, sampler in samplers:
        start = time.perf_counter()
        clips = generate(pipe, prompts, cfg, args.seed, args.batch, denoiser=args.denoiser,
                         score_denoise_steps=args.score_denoise_steps, prior_temp=args.prior_temp, **sampler)
        seconds = time.perf_counter() - start
        result = dict(score(net, clips, prompts, digit_size), sampler=name, seconds=round(seconds, 1))
        report["samplers"].append(result)
        print(f"{name:<28}{result['digit']:>8.1%}{result['direction']:>11.1%}{result['both']:>8.1%}{seconds:>9.1f}")
        if name == "sequential":
            sequential, first = result, clips[::args.per_combo]
            report["pixel_noise"] = pixel_noise(clips.flatten(0, 1))
            write_video(os.path.join(args.out_dir, "grid.mp4"), pair_grid(first), pipe.train_fps)
            write_png(os.path.join(args.out_dir, "strip.png"), pair_grid(first, strip=True))
    table = [[sequential["pairs"][f"{d}:{m}"]["both"] for m in DIRECTION_NAMES] for d in range(10)]
    print_pair_table("\nper pair (sequential): digit and direction right", table, list(map(str, range(10))),
                     DIRECTION_NAMES)
    print_noise(report["pixel_noise"], f"the {len(prompts)} clips")
    print(f"first clip of every pair (rows digits 0-9, columns {' '.join(DIRECTION_NAMES)}): "
          f"{os.path.join(args.out_dir, 'grid.mp4')}, frames side by side: {os.path.join(args.out_dir, 'strip.png')}")
    if len(report["samplers"]) > 1:
        report["jacobi_speed_up"] = round(report["samplers"][0]["seconds"] / report["samplers"][1]["seconds"], 2)
        print(f"Jacobi speed-up over sequential: {report['jacobi_speed_up']:.2f}x")

    write_report(report, os.path.join(args.out_dir, "demo_video_quality.json"))
    return report


if __name__ == "__main__":
    main()
