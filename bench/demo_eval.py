"""The image demo measured with evaluate.py's protocols: FID, sFID, KID, precision and recall against the tinted
MNIST test digits (guidance 0 and 3, sequential and Jacobi decoding), test bits/dim, and zero-shot digit and colour
accuracy by likelihood.

    python bench/demo_eval.py                                        # the shipped checkpoints/demo_mnist_t2i
    python bench/demo_eval.py --checkpoint_path logs/demo_mnist_t2i-<date>/checkpoints/latest --samples 1000

FID: `--samples` images per setting, prompted with every (digit, colour) pair in turn (the five training templates
cycling, seeds 0..N-1, the same prompts and seeds for every setting), against the Inception statistics of
`--ref_samples` tinted test digits (cached in --out_dir). The "real digits" row is the FID of `--samples` other test
digits against the same statistics (when the 10,000 test digits suffice): what a perfect model scores at this sample
count (FID is biased upwards at small counts, so compare rows at one count). The full protocol, 10k samples against
all test digits, is `--samples 10000 --ref_samples 10000` (a GPU's work). `--prior_temps 1 0.8` scores every
setting at each prior temperature (pipe(prior_temp=)). Bits/dim: evaluate.py --bpd over --bpd_items test digits;
the most and least likely of them by the exact likelihood go to <out_dir>/likelihood_extremes.png. Prints a table,
writes <out_dir>/demo_eval.json.
"""
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
from dataset import COLOUR_TEMPLATES, COLOURS, DIGIT_NAMES, MNISTDataset  # noqa: E402
from demo_quality import demo_parser, load_demo, start_process, write_report  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.files import write_text  # noqa: E402
from utils.image import to_uint8, write_png  # noqa: E402
from utils.metrics import (PR_NEIGHBOURS, InceptionV3, feature_stats, frechet_distance,  # noqa: E402
                           inception_features, kernel_inception_distance, load_stats, precision_recall, save_stats,
                           split_spatial)

DECODERS = {"sequential": {}, "jacobi": dict(jacobi=True, jacobi_block_size=16, jacobi_th=1e-3, jacobi_max_iter=32)}
TEST_DIGITS = 10000
EXTREMES = 12  # test digits shown at each end of the likelihood ranking


def test_digits(config, start, count, seed):
    """uint8 (H, W, 3) tinted MNIST test digits start..start+count, tints drawn as the demo's data draws them."""
    data = MNISTDataset(config.img_size, colour=True, split="test")
    return [to_uint8(data.load(i, seed)[0]) for i in range(start, start + count)]


def features_of(net, images, batch, desc):
    """(pool features, sFID statistics) of uint8 images."""
    feats, spatial = split_spatial(inception_features(net, images, batch, desc=desc))
    mu, sigma = feature_stats(spatial)
    return feats, {"mu": mu, "sigma": sigma, "count": len(spatial)}


def reference_stats(net, config, args):
    """Inception statistics, features and sFID statistics of the first --ref_samples test digits, computed once per
    network and count (a cache file without the features or the sFID's, from an earlier version, is computed
    again)."""
    path = os.path.join(args.out_dir, f"ref_stats_{args.ref_samples}_{net.sha1[:8]}_seed{args.seed}.npz")
    cached = load_stats(path) if os.path.isfile(path) else None
    if cached is not None and cached["features"] is not None and cached["sfid"] is not None:
        return cached, path
    feats, sfid = features_of(net, test_digits(config, 0, args.ref_samples, args.seed), args.batch,
                              f"inception reference ({args.ref_samples})")
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, len(feats), net, features=feats, sfid=sfid)
    return load_stats(path), path


def sample_images(pipe, prompts, cfg, decoder, seed, batch, prior_temp=1.0):
    """uint8 samples for the prompts (sample i seeded seed + i, as sample.py), and the seconds it took."""
    images, start = [], time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk = prompts[first:first + batch]
        out = pipe([p for _, _, p in chunk], cfg=cfg, output_type="np", prior_temp=prior_temp, **DECODERS[decoder],
                   generator=[torch.Generator().manual_seed(seed + first + i) for i in range(len(chunk))])
        images += list(out.images)
    return images, time.perf_counter() - start


def likelihood_extremes(config, items, args):
    """The EXTREMES most and least likely test digits by their bits/dim, as one PNG (top row: the most likely);
    their indices and bits/dim."""
    order = np.argsort(items["bits_per_dim"])
    picks = {"most_likely": order[:EXTREMES], "least_likely": order[::-1][:EXTREMES]}
    data = MNISTDataset(config.img_size, colour=True, split="test")
    rows = [np.concatenate([to_uint8(data.load(items["index"][k], args.seed)[0]) for k in ks], 1)
            for ks in picks.values()]
    path = os.path.join(args.out_dir, "likelihood_extremes.png")
    gap = np.full((2, rows[0].shape[1], 3), 64, np.uint8)
    write_png(path, np.concatenate([rows[0], gap, rows[1]]).repeat(4, 0).repeat(4, 1))
    return {"picture": path, **{name: [{"index": int(items["index"][k]), "bits_per_dim": items["bits_per_dim"][k]}
                                       for k in ks] for name, ks in picks.items()}}


def scores_to(ref, scored):
    """FID, sFID, KID, precision and recall of (features, sFID statistics) against the reference."""
    feats, sfid = scored
    mu, sigma = feature_stats(feats)
    precision, recall = precision_recall(ref["features"], feats)
    kid, kid_std = kernel_inception_distance(ref["features"], feats)
    ref_sfid = ref["sfid"]
    return {"fid": round(frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), 3),
            "sfid": round(frechet_distance(sfid["mu"], sfid["sigma"], ref_sfid["mu"], ref_sfid["sigma"]), 3),
            "kid": round(kid, 5), "kid_std": round(kid_std, 5), "precision": round(precision, 4),
            "recall": round(recall, 4)}


def fid_prompts(n):
    """n prompts, pair after pair over the 60 (digit, colour) pairs (so any count covers them evenly), the five
    training templates taking turns round by round."""
    combos = [(d, c) for d in range(10) for c in COLOURS]
    out = []
    for i in range(n):
        digit, colour = combos[i % len(combos)]
        template = COLOUR_TEMPLATES[(i // len(combos)) % len(COLOUR_TEMPLATES)]
        out.append((digit, colour, template.format(name=DIGIT_NAMES[digit], digit=digit, colour=colour)))
    return out


def run(args):
    start_process(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    config, pipe = load_demo(args.checkpoint_path, "colour_mnist")
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    if not 2 <= args.ref_samples <= TEST_DIGITS or args.samples < 2:
        raise UserError(f"--ref_samples must be 2..{TEST_DIGITS} (the test digits) and --samples at least 2")
    report = {"checkpoint_path": args.checkpoint_path, "samples": args.samples, "ref_samples": args.ref_samples,
              "seed": args.seed, "threads": args.threads, "jacobi": DECODERS["jacobi"]}

    start = time.perf_counter()
    net = InceptionV3(spatial=True)
    ref, ref_path = reference_stats(net, config, args)
    report["inception"], report["fid"] = net.describe(), []
    print(f"\nFID, sFID, KID, precision and recall (k = {PR_NEIGHBOURS}) against {args.ref_samples} tinted test "
          f"digits ({ref_path}), {args.samples} images each:")
    print(f"{'setting':<26}{'FID':>9}{'sFID':>9}{'KID':>10}{'precision':>11}{'recall':>9}{'sampling s':>12}")
    if args.ref_samples + args.samples <= TEST_DIGITS:  # real digits the reference has not seen: the floor
        floor = scores_to(ref, features_of(net, test_digits(config, args.ref_samples, args.samples, args.seed),
                                           args.batch, f"inception real digits ({args.samples})"))
        report["fid"].append({"setting": "real digits", **floor})
        print(f"{'real test digits':<26}{floor['fid']:>9.3f}{floor['sfid']:>9.3f}{floor['kid']:>10.5f}"
              f"{floor['precision']:>11.4f}{floor['recall']:>9.4f}")
    prompts = fid_prompts(args.samples)
    for cfg, decoder, temp in itertools.product(args.cfg, args.decoders, args.prior_temps):
        setting = f"cfg {cfg:g}, {decoder}" + ("" if temp == 1 else f", T {temp:g}")
        images, seconds = sample_images(pipe, prompts, cfg, decoder, args.seed, args.batch, temp)
        r = scores_to(ref, features_of(net, images, args.batch, f"inception {setting}"))
        report["fid"].append({"setting": setting, "cfg": cfg, "decoder": decoder, "prior_temp": temp, **r,
                              "sampling_seconds": round(seconds, 1)})
        print(f"{setting:<26}{r['fid']:>9.3f}{r['sfid']:>9.3f}{r['kid']:>10.5f}"
              f"{r['precision']:>11.4f}{r['recall']:>9.4f}{seconds:>12.1f}")
    report["fid_seconds"] = round(time.perf_counter() - start, 1)

    if args.bpd_items:
        report["bits_per_dim"] = {}
        print(f"\ntest bits/dim ({args.bpd_items} tinted test digits, captioned 'a {{colour}} {{digit}}'):")
        for noise in ("dequantize", "train"):
            cfg = evaluate.parse_config(["--checkpoint_path", args.checkpoint_path, "--bpd", "1", "--num_items",
                                         str(args.bpd_items), "--nll_noise", noise, "--seed", str(args.seed),
                                         "--eval_batch_size", "500"])
            start = time.perf_counter()
            bpd = evaluate.likelihood_metrics(pipe, cfg, info)["bpd"]
            bpd["seconds"] = round(time.perf_counter() - start, 1)
            items = bpd.pop("items")
            report["bits_per_dim"][noise] = bpd
            floor = f" (the noise alone: {bpd['noise_entropy']:.3f})" if "noise_entropy" in bpd else ""
            print(f"  {noise:<11} {bpd['mean']:.4f} +- {bpd['stderr']:.4f}  {bpd['unit']}{floor}")
            if noise == "dequantize":
                report["likelihood_extremes"] = likelihood_extremes(config, items, args)
                print(f"  the {EXTREMES} most and least likely of them: {report['likelihood_extremes']['picture']}")

    if args.rank_items:
        prompts_file = os.path.join(args.out_dir, "digit_colour_prompts.txt")
        write_text(prompts_file, "\n".join(f"a {c} {DIGIT_NAMES[d]}" for d in range(10) for c in COLOURS) + "\n")
        cfg = evaluate.parse_config(["--checkpoint_path", args.checkpoint_path, "--rank_prompts", prompts_file,
                                     "--num_items", str(args.rank_items), "--seed", str(args.seed),
                                     "--eval_batch_size", "600"])
        start = time.perf_counter()
        prompts60 = evaluate.read_prompts(prompts_file)
        out, _, noise = evaluate.likelihoods(pipe, cfg, info, prompts60)
        best = [prompts60[k].split() for k in out["scores"].argmax(1)]
        truth = [c.split() for c in out["caption"]]  # 'a {colour} {digit}': EVAL_CAPTIONS of colour_mnist
        digit = np.mean([b[2] == t[2] for b, t in zip(best, truth)])
        colour = np.mean([b[1] == t[1] for b, t in zip(best, truth)])
        both = np.mean([b == t for b, t in zip(best, truth)])
        report["zero_shot"] = {"items": len(truth), "prompts": len(prompts60), "noise": noise,
                               "digit_accuracy": round(float(digit), 4), "colour_accuracy": round(float(colour), 4),
                               "both_accuracy": round(float(both), 4),
                               "seconds": round(time.perf_counter() - start, 1)}
        print(f"\nzero-shot by likelihood ({len(truth)} test digits, the best of {len(prompts60)} prompts "
              f"'a {{colour}} {{digit}}'): digit {digit:.1%}, colour {colour:.1%}, both {both:.1%}")

    write_report(report, os.path.join(args.out_dir, "demo_eval.json"))
    return report


def main(argv=None):
    parser = demo_parser(__doc__, "demo_mnist_t2i")
    parser.add_argument("--samples", type=int, default=200, help="images per FID setting (10000 for the full count)")
    parser.add_argument("--ref_samples", type=int, default=500, help="test digits behind the reference statistics")
    parser.add_argument("--cfg", type=float, nargs="+", default=[0.0, 3.0], help="guidance scales")
    parser.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--prior_temps", type=float, nargs="+", default=[1.0],
                        help="prior temperatures (the noise's standard deviation) to score each setting at")
    parser.add_argument("--bpd_items", type=int, default=10000, help="test digits for bits/dim (0: skip)")
    parser.add_argument("--rank_items", type=int, default=500, help="test digits to classify (0: skip)")
    parser.add_argument("--batch", type=int, default=50, help="images per sampling / Inception batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core CPU)")
    parser.add_argument("--out_dir", default="logs/demo_eval")
    return run_cli(run, parser.parse_args(argv))


if __name__ == "__main__":
    main()
