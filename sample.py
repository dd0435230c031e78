"""Sample images or videos from a STARFlow / STARFlow-V checkpoint (plain python or torchrun; CPU, CUDA, MPS).

    torchrun --standalone --nproc_per_node 1 sample.py --model_config_path configs/starflow_3B_t2i_256x256.yaml \\
        --checkpoint_path ckpts/starflow_3B_t2i_256x256.pth --caption "a cat playing piano" --cfg 3.6 --jacobi 1

Config values (YAML) stand unless a flag is given; any config key can also be given as a flag. Writes one PNG (or
MP4) per sample plus a grid, each with a JSON beside it holding the prompt, seed and settings.
"""
import hashlib
import json
import os
import random
import re
import shlex
import sys

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from utils import distributed
from utils.checkpoint import EMA_WEIGHTS, OFFICIAL_WEIGHTS, checkpoint_weights, current_checkpoint, save_weights
from utils.config import SCHEMA, Compat, Key, flag, given_keys, guidance_scale, load_config, print_help, wants_help
from utils.errors import UserError, run_cli
from utils.files import check_output_dir, file_stamp, read_text, write_json
from utils.image import ASPECT_RATIOS, check_image, make_grid, parse_aspect_ratio, write_png, write_video
from utils.pipeline import ARGUMENTS, DTYPES, STARFlowPipeline, resolve_finetuned_vae


def check_aspect(value):
    """--aspect_ratio: 'random' or a W:H that parse_aspect_ratio accepts."""
    if value != "random":
        parse_aspect_ratio(value)


# Flags that are pipeline arguments (ARGUMENTS[...]) share the pipeline's type and range.
SAMPLE_KEYS = {
    "checkpoint_path": Key(None, "str", "model weights: official .pth, our .safetensors or a train.py checkpoint "
                                        "folder (required)", path="exists", missing=OFFICIAL_WEIGHTS),
    "caption": Key(None, "str", "a prompt, or a .txt file with one prompt per line (required); '' samples "
                                "unconditionally (the null prompt)", empty=True),
    "num_samples": Key(None, "int", "samples per prompt; default sample_batch_size x ranks for a prompt, "
                                    "1 per line for a .txt", low=1),
    "negative_prompt": Key(None, "str", "guidance pushes the samples away from this prompt instead of from the null "
                                        "prompt (needs --cfg > 0; text-to-image and video sampling)"),
    "sample_batch_size": Key(16, "int", "samples per forward pass on each rank", low=1),
    "seed": Key(191, "int", "base seed; sample i (in prompt-file order) uses seed + i on any number of ranks", low=0,
                high=2**63 - 1),
    "aspect_ratio": Key("1:1", "str", f"W:H ({', '.join(ASPECT_RATIOS)}, or any W/H within 1/8..8) or 'random' "
                                      f"(one per batch)", check=check_aspect),
    "jacobi": Key("auto", "str", "decoding: 0 token by token, 1 the original's block-wise Jacobi, auto sliding "
                                 "Jacobi windows chosen per flow step", choices=("0", "1", "auto")),
    "jacobi_th": ARGUMENTS["jacobi_th"].replace(
        help="Jacobi convergence threshold (relative mean squared change); default 0.005 for --jacobi 1, auto's own "
             "for auto"),
    "jacobi_block_size": ARGUMENTS["jacobi_block_size"].replace(
        help="--jacobi 1: tokens per chunk in the first frame (4x after it), default 64; auto: the deep step's "
             "window"),
    "jacobi_max_iter": ARGUMENTS["jacobi_max_iter"].replace(
        help="--jacobi 1: iterations per chunk at most (default 32); auto: evaluations of a token at most"),
    "attn_temp": ARGUMENTS["attn_temp"],
    "prior_temp": ARGUMENTS["prior_temp"].replace(
        help="prior temperature T: noise drawn from N(0, T^2 I) (1: the model's distribution; below 1, cleaner and "
             "less varied samples); text-to-image and video sampling"),
    "out_fps": ARGUMENTS["fps"].replace(help="video fps (prompt text and MP4); default: the fps of vid_size"),
    "target_length": ARGUMENTS["target_length"].replace(
        help="video frames to generate; beyond the training length a sliding window is used (needs --jacobi 1 or "
             "auto); 1 gives an image"),
    "context_length": ARGUMENTS["context_length"],
    "input_image": Key(None, "str", "image-to-video: the first frame ('none' = text-to-video); with --mask, the "
                                    "picture to inpaint", path="file"),
    "mask": Key(None, "str", "inpainting: a PNG of the input image's size, white where to regenerate", path="file"),
    "inpaint_rounds": Key(4, "int", "inpainting: encode-decode rounds that harmonise the hole with the rest",
                          low=0),
    "inpaint_candidates": Key(4, "int", "inpainting: variations per round; the flow keeps the most likely",
                              low=1),
    "edit_image": Key(None, "str", "editing: a picture to re-draw under --caption by flow inversion", path="file"),
    "source_caption": Key(None, "str", "editing: what the picture shows (default: the null prompt)"),
    "source_cfg": Key(None, "float", "editing: guidance of the encoding pass (default --cfg: exact inversion)",
                      low=0.0),
    "edit_refresh": Key(0.0, "float", "editing: fraction of fresh noise mixed into the picture's noise", low=0.0,
                        high=1.0),
    "edit_blocks": Key("all", "str", "editing: flow steps decoded under the new prompt (deep: only the deep one)",
                       choices=("all", "deep")),
    "input_video": Key(None, "str", "video continuation: an MP4 whose first frames become known latent frames",
                       path="file"),
    "interpolate_from": Key(None, "str", "interpolation: the first picture (video models: MP4) of a path through the "
                                         "flow's noise space to --interpolate_to, drawn as --num_samples points, "
                                         "both ends included", path="file"),
    "interpolate_to": Key(None, "str", "interpolation: the last picture (video models: MP4) of the path",
                          path="file"),
    "target_noise_std": ARGUMENTS["noise_std"].replace(
        help="noise level of the samples: prompt 'Noise Level', input-image noise and denoising (default noise_std)"),
    "compile_decode": flag(0, "decode the token-by-token flow steps (--jacobi 0; auto's deep step on a CPU) through "
                              "torch.compile'd graphs, compiled at the first batch (README, Sampling speed)"),
    "disable_learnable_denoiser": flag(0, "denoise with the flow's score step even if a learned denoiser exists"),
    "denoising_batch_size": ARGUMENTS["denoising_batch_size"],
    "output_dir": Key(None, "str", "output folder (default <logdir>/<checkpoint name>)", path="out"),
    "save_latents": flag(0, "also save the noisy and denoised latents of each batch (.safetensors)"),
    "save_folder": Compat(0, "int", "single files instead of a grid (both are always written)", (0, 1)),
    "dtype": Key("auto", "str", "model dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16",
                 choices=("auto", *DTYPES)),
}
CLI_ONLY = ("num_samples", "sample_batch_size")  # also train.py keys (unused there): YAML values never apply
JACOBI_MODES = {"0": False, "1": True, "auto": "auto"}
ORIGINAL_JACOBI = dict(jacobi_th=0.005, jacobi_block_size=64, jacobi_max_iter=32)  # the original sample.py's
GRID_CELLS = 64  # samples per grid file


def read_captions(caption):
    """A prompt, or the lines of a .txt file (blank lines skipped) -> (captions, name for files)."""
    if caption is None:
        raise UserError("--caption is required: a prompt, a .txt file with one prompt per line, or '' (unconditional)")
    if os.sep in caption and os.path.exists(caption) and not caption.endswith(".txt"):
        raise UserError(f"--caption '{caption}' names a file or folder, not a prompt; a prompt file ends in .txt")
    if caption.endswith(".txt"):
        lines = [line.strip() for line in read_text(caption, "caption file").splitlines() if line.strip()]
        if not lines:
            raise UserError(f"caption file '{caption}' has no prompts")
        return lines, os.path.splitext(os.path.basename(caption))[0]
    return [caption], caption or "unconditional"


def slug(text, limit=80):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "samples"


def regen_command(argv, caption, seed, aspect, out_dir, checkpoint, samples=1):
    """The command line that regenerates one sample (an interpolation: its whole path of `samples` points): this
    run's flags with this prompt, seed and aspect, the checkpoint it came from (a step folder, not a run's moving
    latest), written to <out_dir>/regenerated (so it cannot overwrite this run's files). Flags that are not
    sample.py's (evaluate.py --generate passes its own) are left out."""
    replaced = {"caption", "seed", "num_samples", "sample_batch_size", "aspect_ratio", "output_dir", "checkpoint_path"}
    kept, skip = [], False
    for tok in argv:
        if tok.startswith("--"):
            name = tok[2:].partition("=")[0].replace("-", "_")
            skip = name in replaced or name not in SCHEMA and name not in SAMPLE_KEYS
        if not skip:
            kept.append(tok)
    new = ["--checkpoint_path", checkpoint, "--caption", caption, "--seed", str(seed), "--aspect_ratio", aspect,
           "--num_samples", str(samples), "--sample_batch_size", "1", "--output_dir",
           os.path.join(out_dir, "regenerated")]
    return "python sample.py " + " ".join(shlex.quote(t) for t in kept + new)


def plan(captions, num_samples, seed, batch, world, rank):
    """Global sample list (caption, seed, index) cut into rounds of batch x world; this rank's share per round,
    padded with repeats so every rank runs the same batches in lock-step (Jacobi agrees across ranks)."""
    items = [(cap, seed + i, i) for i, cap in enumerate(c for c in captions for _ in range(num_samples))]
    rounds = []
    for start in range(0, len(items), batch * world):
        chunk = items[start:start + batch * world]
        mine = chunk[rank * batch:(rank + 1) * batch]
        rounds.append((mine, [(chunk[-1][0], chunk[-1][1], None)] * (min(batch, len(chunk)) - len(mine))))
    return items, rounds


def parse_config(argv, extra_keys=None):
    """CLI tokens -> Config; a train.py checkpoint folder brings its own config.yaml. extra_keys: the keys of an
    entry point that samples too (evaluate.py)."""
    keys = dict(SAMPLE_KEYS, **(extra_keys or {}))
    cfg = load_config(None, argv, extra_keys=keys)
    checkpoint = cfg.checkpoint_path and current_checkpoint(cfg.checkpoint_path)
    beside = checkpoint and os.path.join(checkpoint, "config.yaml")
    if not cfg.model_config_path and beside and os.path.isfile(beside):  # a train.py checkpoint folder
        cfg = load_config(beside, argv, extra_keys=keys)
    cfg.checkpoint_path = checkpoint
    given = given_keys(argv)
    for key in CLI_ONLY:  # saved configs carry train.py's unrelated defaults for these (4096 samples, batch 256)
        if key not in given:
            setattr(cfg, key, SAMPLE_KEYS[key].default)
    if not cfg.checkpoint_path:
        raise UserError("--checkpoint_path is required: a train.py checkpoint folder (e.g. checkpoints/demo_mnist_t2i) "
                        "or weights (.pth, .safetensors) with --model_config_path")
    if not cfg.model_config_path:
        raise UserError(f"--model_config_path is required: {cfg.checkpoint_path} is not a checkpoint folder with a "
                        f"config.yaml")
    if cfg.jacobi == "1":  # the original sample.py's chunk settings
        for key, value in ORIGINAL_JACOBI.items():
            setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    if cfg.mask and not cfg.input_image:
        raise UserError("--mask inpaints --input_image: give the picture with --input_image")
    if bool(cfg.interpolate_from) != bool(cfg.interpolate_to):
        raise UserError("interpolation needs both ends: give --interpolate_from and --interpolate_to")
    if sum(map(bool, (cfg.edit_image, cfg.mask, cfg.input_video, cfg.interpolate_from))) > 1 or \
            (cfg.input_image and (cfg.edit_image or cfg.interpolate_from)):
        raise UserError("--edit_image, --input_image --mask, --input_video and --interpolate_from/_to are separate "
                        "modes: give one")
    if cfg.negative_prompt is not None and sample_mode(cfg) != "sample":
        raise UserError("--negative_prompt steers sampling from noise; editing, inpainting and interpolation guide "
                        "away from the null prompt (editing describes the picture with --source_caption)")
    if cfg.prior_temp != 1 and sample_mode(cfg) != "sample":
        raise UserError("--prior_temp scales the noise that sampling starts from; editing, inpainting and "
                        "interpolation start from the pictures' own noise (use --edit_refresh to mix in fresh noise)")
    return cfg


def sample_mode(cfg):
    """'edit', 'inpaint', 'interpolate' or 'sample' (text-to-image/video, image-to-video, video continuation)."""
    return "edit" if cfg.edit_image else "inpaint" if cfg.mask else "interpolate" if cfg.interpolate_from else \
        "sample"


def sample_settings(cfg, denoiser):
    """What every sample's JSON records about how it was drawn (and from which pictures)."""
    settings = dict(mode=sample_mode(cfg), denoiser=denoiser, cfg=guidance_scale(cfg),
                    negative_prompt=cfg.negative_prompt, jacobi=cfg.jacobi,
                    jacobi_th=cfg.jacobi_th, jacobi_block_size=cfg.jacobi_block_size,
                    jacobi_max_iter=cfg.jacobi_max_iter, attn_temp=cfg.attn_temp, prior_temp=cfg.prior_temp,
                    compile_decode=cfg.compile_decode,
                    target_length=cfg.target_length, context_length=cfg.context_length, input_image=cfg.input_image,
                    input_video=cfg.input_video,
                    noise_std=cfg.target_noise_std or cfg.noise_std, model_config_path=cfg.model_config_path,
                    checkpoint_path=cfg.checkpoint_path, weights=checkpoint_weights(cfg.checkpoint_path,
                                                                                    cfg.ema_weights))
    if settings["mode"] == "edit":
        settings.update(source_image=cfg.edit_image, source_caption=cfg.source_caption, source_cfg=cfg.source_cfg,
                        edit_refresh=cfg.edit_refresh, edit_blocks=cfg.edit_blocks)
    if settings["mode"] == "inpaint":
        settings.update(source_image=cfg.input_image, mask=cfg.mask, inpaint_rounds=cfg.inpaint_rounds,
                        inpaint_candidates=cfg.inpaint_candidates)
    if settings["mode"] == "interpolate":
        settings.update(interpolate_from=cfg.interpolate_from, interpolate_to=cfg.interpolate_to,
                        path_points=cfg.num_samples)
    return settings


def path_fraction(index, points):
    """Where sample `index` of an interpolation of `points` samples lies on the path (0: --interpolate_from)."""
    return index / (points - 1)


def sample_round(pipe, cfg, batch, aspect):
    """One pass of the pipeline over a batch of (caption, seed, index), each sample with its own seed."""
    common = dict(cfg=guidance_scale(cfg), generator=[torch.Generator().manual_seed(s) for _, s, _ in batch],
                  aspect_ratio=aspect, noise_std=cfg.target_noise_std,
                  denoiser="score" if cfg.disable_learnable_denoiser else "auto", jacobi=JACOBI_MODES[cfg.jacobi],
                  jacobi_block_size=cfg.jacobi_block_size, jacobi_th=cfg.jacobi_th,
                  jacobi_max_iter=cfg.jacobi_max_iter, attn_temp=cfg.attn_temp,
                  compile_decode=bool(cfg.compile_decode))
    captions = [cap for cap, _, _ in batch]
    mode = sample_mode(cfg)
    if mode == "edit":
        return pipe.edit(cfg.edit_image, captions, source_prompt=cfg.source_caption, source_cfg=cfg.source_cfg,
                         refresh=cfg.edit_refresh, blocks=cfg.edit_blocks, **common)
    if mode == "inpaint":
        return pipe.inpaint(cfg.input_image, cfg.mask, captions, rounds=cfg.inpaint_rounds,
                            candidates=cfg.inpaint_candidates, **common)
    if mode == "interpolate":  # every round decodes its points of the one path, whose ends share the base seed's noise
        common["generator"] = torch.Generator().manual_seed(cfg.seed)
        return pipe.interpolate([cfg.interpolate_from, cfg.interpolate_to], captions[0],
                                steps=[0.0 if i is None else path_fraction(i, cfg.num_samples)  # None: padding
                                       for _, _, i in batch], **common)
    return pipe(captions, num_samples=1, target_length=cfg.target_length, fps=cfg.out_fps,
                input_image=cfg.input_image, input_video=cfg.input_video, context_length=cfg.context_length,
                denoising_batch_size=cfg.denoising_batch_size, negative_prompt=cfg.negative_prompt,
                prior_temp=cfg.prior_temp, **common)


def write_samples(out, mine, stem_of, rank, aspect, settings, command_of):
    """This rank's samples of a round: a PNG or MP4 each, with its JSON beside it."""
    h, w = out.size
    for j, (caption, seed, index) in enumerate(mine):
        stem = stem_of(index)
        if out.frames is not None:
            write_video(stem + ".mp4", np.stack([np.asarray(f) for f in out.frames[j]]), out.fps)
        else:
            write_png(stem + ".png", np.asarray(out.images[j]))
        info = dict(prompt=caption, text=out.prompts[j], seed=seed, index=index, rank=rank, height=h, width=w,
                    aspect_ratio=aspect, frames=len(out.frames[j]) if out.frames is not None else 1, fps=out.fps)
        if settings["mode"] == "interpolate":  # the points of the one path share its seed, the base seed
            info.update(seed=seed - index, fraction=path_fraction(index, settings["path_points"]))
        write_json(stem + ".json", dict(info, **settings, command=command_of(caption, info["seed"], aspect)))


GO_ON = "the same command again goes on where this run stopped"
# Keys that say where files go and how they are read: a rerun that differs only in them goes on with the samples
# of the first.
NOT_SAMPLING = {"logdir", "output_dir", "num_workers"}


def sampling_request(cfg, captions, world_size, ignore=()):
    """A digest of everything a sample depends on: the config (but NOT_SAMPLING and `ignore`), the prompts, the
    rank count (Jacobi decides convergence per batch) and the files read as they are on disk now: the checkpoint,
    a fine-tuned decoder, input pictures (a retrained checkpoint is another request)."""
    files = (cfg.checkpoint_path, resolve_finetuned_vae(cfg.finetuned_vae, cfg.logdir), cfg.input_image,
             cfg.edit_image, cfg.mask, cfg.input_video, cfg.interpolate_from, cfg.interpolate_to)
    config = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SAMPLING and k not in ignore}
    text = json.dumps(dict(config=config, captions=captions, files=[file_stamp(f) for f in files if f],
                           world_size=world_size), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def sample_json(stem):
    """The JSON beside a sample, or None where it is missing or unreadable."""
    try:
        with open(stem + ".json", encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def finished_sample(stem, request):
    """The JSON of a sample that a run of the same request finished (its picture is written before it), else None."""
    info = sample_json(stem)
    drawn = os.path.isfile(stem + ".png") or os.path.isfile(stem + ".mp4")
    return info if info is not None and info.get("request") == request and drawn else None


def rounds_to_draw(rounds, stem_of, request, items, per_round, device):
    """The rounds that an earlier run of the same request did not finish (a round is skipped only where every rank
    finished its share, so the ranks still run each batch together); how many samples are reused; their denoiser."""
    finished = [[finished_sample(stem_of(i), request) for _, _, i in mine] for mine, _ in rounds]
    unfinished = distributed.max_over_ranks([int(None in done) for done in finished], device)
    todo = [k for k, left in enumerate(unfinished) if left]
    reused = len(items) - sum(len(items[k * per_round:(k + 1) * per_round]) for k in todo)
    drawn = set(todo)
    denoiser = next((done[0]["denoiser"] for k, done in enumerate(finished) if k not in drawn and done), None)
    return todo, reused, denoiser


def output_dir(cfg):
    """--output_dir, else <logdir>/<checkpoint name>: a weights file's stem, a folder's name, and <run>_<step> for a
    train.py step folder (the runs of a logdir have step folders of the same names)."""
    if cfg.output_dir:
        return cfg.output_dir
    path = os.path.normpath(cfg.checkpoint_path)
    name, parent = os.path.splitext(os.path.basename(path))[0], os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and name.startswith("step_"):
        name = f"{os.path.basename(os.path.dirname(parent))}_{name}"
    return os.path.join(cfg.logdir, name)


def check_request(pipe, cfg, captions, num_samples):
    """The sampling flags against the model's geometry, once its VAE is loaded and before the model is (seconds,
    not the minutes of a 7B load): aspect ratio (every bucket for 'random'), video length, input image, negative
    prompt."""
    aspects = ASPECT_RATIOS if cfg.aspect_ratio == "random" else [cfg.aspect_ratio]
    mode = sample_mode(cfg)
    for aspect in aspects:
        pipe.check_inputs(captions[:1], aspect_ratio=aspect, input_image=cfg.input_image if mode == "sample" else None,
                          jacobi=JACOBI_MODES[cfg.jacobi], input_video=cfg.input_video, num_samples=num_samples,
                          target_length=cfg.target_length, context_length=cfg.context_length,
                          negative_prompt=cfg.negative_prompt if mode == "sample" else None, cfg=guidance_scale(cfg))
    ends = [] if pipe.video else [(cfg.interpolate_from, "interpolate_from"), (cfg.interpolate_to, "interpolate_to")]
    for picture, what in ((cfg.edit_image, "edit image"), (cfg.input_image if mode == "inpaint" else None,
                                                          "input image"), (cfg.mask, "mask"), *ends):
        if picture is not None:
            check_image(picture, what)


def grid_name(prefix, g, count):
    """The stem of grid g of a run of `count` samples."""
    return f"{prefix}_grid" if count <= GRID_CELLS else f"{prefix}_grid_{g:03d}"


def output_names(prefix, items):
    """The stems of the files a run writes: one per sample, the grids and the latents."""
    grids = [grid_name(prefix, g, len(items)) for g in range(-(-len(items) // GRID_CELLS))]
    return [f"{prefix}_{i:04d}" for _, _, i in items] + grids + [f"{prefix}_latents_{i:04d}" for _, _, i in items]


def free_prefix(out_dir, prefix, items, request):
    """`prefix`, or prefix-2, prefix-3, ...: the first whose files are not in out_dir yet, or whose samples an
    earlier run of the same request drew (an interrupted one, which this run finishes). A run never overwrites
    another's files (names within a run are unique: they carry the sample index)."""
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    present = {os.path.splitext(n)[0] for n in names}

    def same_request(candidate):
        stems = [f"{candidate}_{i:04d}" for _, _, i in items if f"{candidate}_{i:04d}.json" in names]
        return bool(stems) and all((sample_json(os.path.join(out_dir, st)) or {}).get("request") == request
                                   for st in stems)

    candidate, k = prefix, 1
    while present.intersection(output_names(candidate, items)) and not same_request(candidate):
        k += 1
        candidate = f"{prefix}-{k}"
    return candidate


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print_help(__doc__, "Sampling flags", SAMPLE_KEYS, "  --model_config_path, --cfg, --finetuned_vae, --logdir "
                   "and every other config key (python train.py --help lists them)")
        return 0
    cfg = parse_config(argv)
    captions, name = read_captions(cfg.caption)
    out_dir = output_dir(cfg)
    check_output_dir(out_dir)
    dist_info = distributed.init_distributed(cfg.device)
    rank, world = dist_info.rank, dist_info.world_size
    num_samples = cfg.num_samples or (1 if cfg.caption.endswith(".txt") else cfg.sample_batch_size * world)
    path = sample_mode(cfg) == "interpolate"
    if path and (len(captions) != 1 or num_samples < 2):
        raise UserError(f"interpolation draws one path of --num_samples points, both ends included: give one prompt "
                        f"and at least 2 points (got {len(captions)} prompt(s), {num_samples} point(s))")
    if path and cfg.target_length is not None:
        raise UserError("interpolation draws clips of the training length (the videos' first frames); drop "
                        "--target_length")
    if path and cfg.aspect_ratio == "random":
        raise UserError("--aspect_ratio random picks a size per batch, and a path's points share one: give a W:H")
    if path:  # sample_round and the JSONs place each point on the path by the count
        cfg.num_samples = num_samples
    if checkpoint_weights(cfg.checkpoint_path, cfg.ema_weights) != cfg.checkpoint_path and distributed.is_main():
        print(f"note: sampling the moving average of the weights ({EMA_WEIGHTS}; --ema_weights 0 samples the "
              f"trained weights)")
    if cfg.aspect_ratio not in ("1:1", None) and not cfg.mix_aspect and distributed.is_main():
        print(f"note: this config has mix_aspect 0 (trained on squares only); sampling {cfg.aspect_ratio} anyway")

    pipe = STARFlowPipeline.from_config(cfg, cfg.checkpoint_path, device=dist_info.device, dtype=cfg.dtype,
                                        validate=lambda p: check_request(p, cfg, captions, num_samples))
    items, rounds = plan(captions, num_samples, cfg.seed, cfg.sample_batch_size, world, rank)
    request = sampling_request(cfg, captions, world)
    prefix = distributed.broadcast_object(free_prefix(out_dir, slug(name), items, request)
                                          if distributed.is_main() else None)
    stem_of = lambda index: os.path.join(out_dir, f"{prefix}_{index:04d}")  # noqa: E731
    todo, reused, _ = rounds_to_draw(rounds, stem_of, request, items, cfg.sample_batch_size * world, dist_info.device)
    if distributed.is_main() and reused == len(items):
        print(f"note: {out_dir} holds all {reused} samples of this command, drawn by an earlier run of it; writing "
              f"the grids only (delete the samples to draw them again)")
    elif distributed.is_main() and reused:
        print(f"note: {out_dir} holds {reused} of the {len(items)} samples of this command, drawn by an earlier run "
              f"of it; drawing the other {len(items) - reused} (delete them to draw them all again)")
    elif distributed.is_main() and prefix != slug(name):
        print(f"note: {out_dir} already holds {slug(name)}_* files from an earlier run; this run writes {prefix}_* "
              f"(nothing is overwritten)")
    for k in tqdm(todo, desc=f"sampling {len(items) - reused}", disable=not distributed.is_main()):
        mine, padding = rounds[k]
        aspect = random.Random(cfg.seed * 7919 + k).choice(ASPECT_RATIOS) if cfg.aspect_ratio == "random" \
            else cfg.aspect_ratio
        out = sample_round(pipe, cfg, mine + padding, aspect)
        if cfg.save_latents and mine:  # before the samples, whose JSON marks the round as finished
            save_weights({"latents": out.latents[:len(mine)], "noisy_latents": out.noisy_latents[:len(mine)]},
                         os.path.join(out_dir, f"{prefix}_latents_{mine[0][2]:04d}.safetensors"))
        write_samples(out, mine, stem_of, rank, aspect, dict(sample_settings(cfg, out.denoiser), request=request),
                      lambda caption, seed, aspect: regen_command(argv, caption, seed, aspect, out_dir,
                                                                  cfg.checkpoint_path, num_samples if path else 1))
    distributed.barrier()
    if distributed.is_main():
        write_grids(out_dir, prefix, items, video=pipe.video and (cfg.target_length or pipe.train_frames) > 1)
        print(f"wrote {len(items)} sample(s) and grid(s) to {out_dir}")
    distributed.cleanup()
    return 0


def write_grids(out_dir, prefix, items, video):
    """Tile the single files of all ranks into grids of up to GRID_CELLS samples, each with a JSON index."""
    for g, start in enumerate(range(0, len(items), GRID_CELLS)):
        group = items[start:start + GRID_CELLS]
        stems = [os.path.join(out_dir, f"{prefix}_{index:04d}") for _, _, index in group]
        path = os.path.join(out_dir, grid_name(prefix, g, len(items)))
        if video:
            clips = [np.stack(imageio.mimread(s + ".mp4", memtest=False)) for s in stems]
            grid, layout = make_grid(clips, tall=True)
            with open(stems[0] + ".json") as f:
                fps = json.load(f)["fps"]
            write_video(path + ".mp4", grid, fps)
        else:
            grid, layout = make_grid([np.asarray(Image.open(s + ".png").convert("RGB")) for s in stems])
            write_png(path + ".png", grid)
        write_json(path + ".json", dict(layout, cells=[dict(prompt=c, seed=s, index=i, file=os.path.basename(st))
                                                       for (c, s, i), st in zip(group, stems)]))


def cli():
    sys.exit(run_cli(main, on_interrupt=GO_ON))


if __name__ == "__main__":
    cli()
