"""The video demo measured with evaluate.py's video protocols: per-frame FID and KID of its clips against moving-MNIST
test clips (guidance 0 and the config's), every clip its 5 frames; FVD too, given the I3D. (Per-frame precision and
recall are left out: a frame's nearest neighbours are its own clip's frames, so they read near 0 even for real clips.)

    python bench/demo_video_eval.py                                  # the shipped checkpoints/demo_moving_mnist_t2v
    python bench/demo_video_eval.py --i3d i3d_torchscript.pt         # + FVD (StyleGAN-V's I3D, a local copy)

Everything goes through evaluate.py as a user runs it, on MP4 files: test clips 0..--ref_clips-1 (digits and
directions drawn as the demo's data draws them) are written to <out_dir>/ref and their statistics saved once
(--save_stats); the next --clips test clips, in <out_dir>/real, are the "real clips" row, what a perfect model scores
at this count (FID is biased upwards at small counts, so compare rows at one count); each guidance scale samples
--clips prompts with `evaluate.py --generate 1` into <out_dir>/cfg_<g>, every (digit, direction) pair in turn, the
training templates cycling. Prints a table and writes <out_dir>/demo_video_eval.json.
"""
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from dataset import DIGIT_NAMES, DIRECTIONS, MOTION_TEMPLATES, MovingMNISTDataset  # noqa: E402
from demo_quality import demo_parser, start_process, write_report  # noqa: E402
from utils.config import guidance_scale, load_config, parse_vid_size  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.files import write_text  # noqa: E402
from utils.image import to_uint8, write_video  # noqa: E402

TEST_DIGITS = 10000


def write_test_clips(folder, config, start, count, seed):
    """Test clips start..start+count as MP4s (what a user's folder of reference videos would be)."""
    frames, fps = parse_vid_size(config.vid_size)
    data = MovingMNISTDataset(config.img_size, frames, fps, split="test")
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + count):
        path = os.path.join(folder, f"clip_{i:05d}.mp4")
        if not os.path.isfile(path):
            write_video(path, to_uint8(data.load(i, seed)[0]), fps)
    return folder


def pair_prompts(n):
    """n prompts, pair after pair over the 40 (digit, direction) pairs, the templates taking turns round by round."""
    pairs = list(itertools.product(range(10), DIRECTIONS))
    out = []
    for i in range(n):
        digit, direction = pairs[i % len(pairs)]
        template = MOTION_TEMPLATES[(i // len(pairs)) % len(MOTION_TEMPLATES)]
        out.append(template.format(name=DIGIT_NAMES[digit], digit=digit, direction=direction))
    return out


def scores(report):
    """The row of an evaluate.py report."""
    row = {"fid": round(report["fid"], 3), "kid": round(report["kid"]["mean"], 5),
           "kid_std": round(report["kid"]["std"], 5), "frames": report["images"]["count"]}
    if "fvd" in report:
        row["fvd"] = round(report["fvd"]["value"], 3)
    return row


def run(args):
    start_process(args.threads)
    config = load_config(os.path.join(args.checkpoint_path, "config.yaml"))
    if config.data_format != "moving_mnist":
        raise UserError(f"{args.checkpoint_path} is not a moving_mnist demo checkpoint")
    if args.ref_clips + args.clips > TEST_DIGITS or min(args.ref_clips, args.clips) < 2:
        raise UserError(f"--ref_clips and --clips must be at least 2 and {TEST_DIGITS} together at most")
    frames = parse_vid_size(config.vid_size)[0]
    common = ["--video_frames", str(frames), "--kid", "1", "--num_workers", "0",
              "--eval_batch_size", str(args.batch)] + (["--fvd", "1", "--i3d", args.i3d] if args.i3d else [])
    stats = os.path.join(args.out_dir, f"ref_{args.ref_clips}_seed{args.seed}{'_fvd' if args.i3d else ''}.npz")
    start = time.perf_counter()
    if not os.path.isfile(stats):
        ref = write_test_clips(os.path.join(args.out_dir, "ref"), config, 0, args.ref_clips, args.seed)
        evaluate.main(["--ref", ref, "--save_stats", stats, *common,
                       "--report", os.path.join(args.out_dir, "ref_stats.json")])
    real = write_test_clips(os.path.join(args.out_dir, "real"), config, args.ref_clips, args.clips, args.seed)
    rows = [{"setting": "real test clips", **scores(evaluate.main(["--images", real, "--ref", stats, *common]))}]
    prompts = os.path.join(args.out_dir, "prompts.txt")
    write_text(prompts, "\n".join(pair_prompts(args.clips)) + "\n")
    for cfg in args.cfg if args.cfg is not None else [0.0, guidance_scale(config)]:
        began = time.perf_counter()
        report = evaluate.main(["--generate", "1", "--checkpoint_path", args.checkpoint_path, "--caption", prompts,
                                "--cfg", str(cfg), "--seed", str(args.seed), "--sample_batch_size", str(args.batch),
                                "--images", os.path.join(args.out_dir, f"cfg_{cfg:g}"), "--ref", stats, *common])
        rows.append({"setting": f"cfg {cfg:g}", "cfg": cfg, **scores(report),
                     "seconds": round(time.perf_counter() - began, 1)})
    fvd = "FVD" if args.i3d else ""
    print(f"\nper-frame FID and KID against {args.ref_clips} moving-MNIST test clips "
          f"({args.ref_clips * frames} frames), {args.clips} clips of {frames} frames each:")
    print(f"{'setting':<18}{'FID':>9}{'KID':>10}{'KID std':>10}{fvd:>10}{'seconds':>9}")
    for r in rows:
        print(f"{r['setting']:<18}{r['fid']:>9.3f}{r['kid']:>10.5f}{r['kid_std']:>10.5f}"
              + (f"{r['fvd']:>10.3f}" if args.i3d else "") + (f"{r['seconds']:>9.1f}" if "seconds" in r else ""))
    result = {"checkpoint_path": args.checkpoint_path, "clips": args.clips, "ref_clips": args.ref_clips,
              "frames": frames, "seed": args.seed, "threads": args.threads, "reference": stats, "rows": rows,
              "seconds": round(time.perf_counter() - start, 1)}
    write_report(result, os.path.join(args.out_dir, "demo_video_eval.json"))
    return result


def main(argv=None):
    parser = demo_parser(__doc__, "demo_moving_mnist_t2v")
    parser.add_argument("--clips", type=int, default=200, help="clips per row")
    parser.add_argument("--ref_clips", type=int, default=400, help="test clips behind the reference statistics")
    parser.add_argument("--cfg", type=float, nargs="+", default=None,
                        help="guidance scales (default: 0 and the config's)")
    parser.add_argument("--i3d", default=None, help="StyleGAN-V's i3d_torchscript.pt, for FVD")
    parser.add_argument("--batch", type=int, default=50, help="clips per sampling batch; frames per Inception pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out_dir", default="logs/demo_video_eval")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
