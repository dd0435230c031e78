"""Training/model configuration: the original train-parser flags, YAML loading, CLI overrides, Model kwargs."""
import difflib
from pathlib import Path

import yaml

from utils.errors import UserError
from utils.files import write_text


class Key:
    """One config key: default, value type ('int', 'float', 'str', 'ints', 'floats'), meaning, and what it accepts:
    `choices` (an enumeration) or `low`/`high` (an inclusive range; each value of a list key)."""

    def __init__(self, default, kind, help, choices=None, low=None, high=None):
        self.default, self.kind, self.help = default, kind, help
        self.choices, self.low, self.high = choices, low, high


class Compat(Key):
    """A key of the original release for a feature it did not have (or did not release): it loads with the
    original's values and refuses any other, so a config never silently asks for what is not built."""

    def __init__(self, default, kind, feature, allowed=None):
        allowed = tuple(allowed) if allowed is not None else (default,)
        super().__init__(default, kind, f"accepted for compatibility, only {' or '.join(map(str, allowed))}: "
                                        f"{feature}", choices=allowed)
        self.feature = feature


# Every flag of the original `train.get_tarflow_parser`, with its default and meaning, then the keys this train.py adds.
SCHEMA = {
    # run and data
    "model_config_path": Key(None, "str", "YAML config path (original format or a plain mapping)"),
    "train_seed": Key(None, "int", "global seed; each rank uses seed + rank; None picks one from the clock"),
    "data": Key("data", "str", "training data: an image/video folder, a .tar shard, a brace pattern a-{000..009}.tar, "
                              "or a folder of .tar shards"),
    "logdir": Key("./logs", "str", "root folder for runs: checkpoints, sample grids, config"),
    "dataset": Key("dummy", "str", "dataset name: run name (wandb job) and file prefixes"),
    "wds": Compat(0, "int", "shards are detected from --data; 1 requires --data to be webdataset shards", (0, 1)),
    "mix_aspect": Key(0, "int", "aspect-ratio buckets in the loader and aspect-ratio text in prompts"),
    "img_size": Key(32, "int", "pixel reference side; bucket area = img_size^2"),
    "vid_size": Key(None, "str", "'frames:fps' for video training (e.g. '81:16'); None means images"),
    "fps_cond": Key(0, "int", "add 'A video with N fps' / 'An image' to prompts"),
    "no_flip": Key(0, "int", "disable random horizontal flips"),
    "caption_column": Key("syn_detailed_description_w_caption", "str",
                         "caption key in captions.jsonl / webdataset .json (falls back to 'caption', 'text')"),
    "secondary_dataset": Key(None, "str", "second data source mixed in with probability secondary_ratio"),
    "secondary_img_size": Key(32, "int", "img_size of the secondary data"),
    "secondary_vid_size": Key(None, "str", "vid_size of the secondary data"),
    "vae": Key(None, "str", "VAE id or folder ('none' trains in pixel space); ':x' suffix = Wan temporal scale"),
    "vae_decoder_factor": Compat(1, "int", "another decoder upsampling factor (unused in the original)"),
    "channel_size": Key(3, "int", "latent channels (Model in_channels); with vae none 3 (RGB) or 1 (grey)"),
    "finetuned_vae": Key(None, "str", "fine-tuned VAE decoder id under logdir/vae/ ('none' = off)"),
    "text": Key(None, "str", "text encoder id or folder (google/flan-t5-xl, a MiniLM folder, ...)"),
    "txt_size": Key(0, "int", "text tokens (pad/truncate length); Model txt_size"),
    # model
    "sos": Key(0, "int", "learned start-of-sequence token (needed for Jacobi sampling)"),
    "seq_order": Key("R2L", "str", "token order of the deep block: L2R (raster) or R2L (reversed)",
                     choices=("L2R", "R2L")),
    "patch_size": Key(4, "int", "patch size on the latent grid"),
    "channels": Key(512, "int", "transformer width"),
    "top_block_channels": Key(None, "int", "width of the deep (top) block; None = channels"),
    "blocks": Key(4, "int", "number of flow blocks for a single layers_per_block value; with several values it "
                            "follows their count (and must match it when given)"),
    "layers_per_block": Key([8], "ints", "layers per block, e.g. '2 2 2 2 2 24' (the last is the deep block)"),
    "rope": Key(0, "int", "rotary position embeddings"),
    "pt_seq_len": Key(None, "int", "RoPE base grid length; None = latent side // patch_size"),
    "adaln": Compat(0, "int", "adaLN conditioning (dead code in the original)"),
    "nvp": Compat(1, "int", "a volume-preserving flow (STARFlow is always affine)"),
    "use_softplus": Key(0, "int", "softplus scale parameterisation"),
    "cond_top_only": Key(0, "int", "text conditions only the top block"),
    "head_dim": Key(64, "int", "attention head size"),
    "num_heads": Key(None, "int", "attention heads; None = channels // head_dim"),
    "num_kv_heads": Key(None, "int", "key/value heads (GQA); None = num_heads"),
    "use_swiglu": Key(0, "int", "SwiGLU MLP"),
    "use_qk_norm": Key(0, "int", "query/key normalisation"),
    "use_post_norm": Key(0, "int", "post-norm (sandwich) layers"),
    "use_final_norm": Key(0, "int", "final norm before each block's output projection"),
    "use_bias": Key(1, "int", "biases in linear layers"),
    "norm_type": Key("layer_norm", "str", "pre-norm of every layer", choices=("layer_norm", "rms_norm")),
    "use_pretrained_lm": Compat(None, "str", "a Gemma top block (gemma3_4b, gemma3_1b, gemma2_2b: its weights "
                                             "were never released)"),
    "use_mm_attn": Compat(0, "int", "multimodal attention (it had no effect in the original either)"),
    "soft_clip": Key(0, "float", "soft clipping s*tanh(o/s) of block outputs (0 = off)"),
    "learnable_self_denoiser": Key(0, "int", "build and train the 8-layer learnable self-denoiser"),
    "conditional_denoiser": Key(0, "int", "the denoiser also sees the text"),
    "noise_embed_denoiser": Compat(0, "int", "a noise embedding in the denoiser (no effect in the original)"),
    "temporal_causal": Key(0, "int", "temporal causality mode for video (also the denoiser's block causality)"),
    "shallow_block_local": Key(0, "int", "shallow blocks act on each video frame separately"),
    "denoiser_window": Key(None, "int", "self-denoiser local window in latent frames"),
    "score_denoise_steps": Key(1, "int", "score-step denoising (no learned denoiser): steps x + noise_std^2 * score "
                                         "of the flow; 1 is the original's Tweedie step, more climb on toward the "
                                         "mode of the noisy density (cleaner pixels, one flow pass each)",
                               low=1, high=16),
    "local_attn_window": Key(None, "int", "deep-block attention window in latent frames"),
    # objective
    "noise_std": Key(0.3, "float", "std of the Gaussian noise added to latents (train and sample)"),
    "noise_type": Key("gaussian", "str", "training noise: gaussian, or uniform (pixel dequantisation)",
                      choices=("gaussian", "uniform")),
    "cond_noise_level": Key(0, "int", "'Noise Level N' prompt prefix and loss weight noise_std/0.3"),
    "batch_size": Key(128, "int", "GLOBAL batch size; per-rank batch = batch_size / world_size / acc"),
    "secondary_batch_size": Key(128, "int", "global batch size of the secondary data"),
    "secondary_ratio": Key(0.0, "float", "probability of replacing a batch with a secondary batch"),
    "acc": Key(1, "int", "gradient accumulation steps"),
    "fp8": Compat(0, "int", "FP8 training (unused in the original)"),
    "use_8bit_adam": Compat(0, "int", "8-bit Adam (unused in the original)"),
    "epochs": Key(1000, "int", "training epochs"),
    "epoch_length": Key(50000, "int", "samples per epoch; at most one pass over a folder or MNIST (0 = one full "
                                      "pass); tar shards stream, so there it sets the epoch"),
    "lr": Key(1e-4, "float", "peak learning rate"),
    "min_lr": Key(1e-6, "float", "cosine-decay floor (also the warmup start)"),
    "drop_label": Key(0.0, "float", "probability of replacing a caption with '' (classifier-free guidance)"),
    "drop_image": Key(0.0, "float", "video: probability of dropping the first latent frame, prefix '(extend) '"),
    "last_frame_cond": Key(0, "int", "video: condition on an encoded late frame, prefix '(last) '"),
    "video_to_video": Key(0, "int", "video: clips are target||source in time, prefix '(v2v) '"),
    "resume_path": Key(None, "str", "a run folder or checkpoint folder (exact resume) or model weights "
                                    "(.pth/.safetensors; weights only)"),
    "resume_epoch": Key(0, "int", "start epoch when resuming from bare weights"),
    "warmup_steps": Key(None, "int", "linear warmup steps; None = one epoch, at most 10% of the scheduled steps"),
    "fsdp": Key(0, "int", "FSDP2 (fully_shard per transformer layer, then the root); 0 = DDP or one process"),
    "fsdp_text_encoder": Key(0, "int", "also shard the frozen text encoder (only with fsdp 1)"),
    "gradient_checkpoint": Key(0, "int", "activation checkpointing of attention (Model use_checkpoint)"),
    "gradient_checkpoint_mlp": Key(None, "int", "activation checkpointing of MLPs (Model use_checkpoint_mlp)"),
    "compile": Compat(0, "int", "torch.compile of training (unused in the original)"),
    "latent_norm_regularization": Key(0.0, "float", "lambda of the penalty on intermediate flow outputs"),
    "loss_scaling": Compat(1, "int", "fp16 gradient scaling (training runs in bf16 or fp32, which need none, so "
                                     "0 and 1 train alike)", (0, 1)),
    "grad_clip": Key(0.0, "float", "gradient-norm clipping threshold (0 = off)"),
    "grad_skip": Key(0, "int", "skip (no optimizer step) updates whose grad norm is > grad_clip after "
                               "grad_skip_after steps; non-finite gradients are always skipped"),
    "dry_run": Key(0, "int", "one training step and one sample, no checkpoint"),
    "wandb_name": Key(None, "str", "run-name suffix; 'a+b' gives {dataset}-a-{value of key b}"),
    "save_every": Key(20, "int", "also keep a numbered copy of the weights every N epochs"),
    "sample_freq": Key(1, "int", "save a sample grid every N epochs (0 = never)"),
    "cfg": Key([0.0], "floats", "guidance scale for training-time samples (sample.py has its own)"),
    "num_samples": Key(4096, "int", "unused by train.py"),
    "sample_batch_size": Key(256, "int", "unused by train.py"),
    # keys added by this train.py
    "data_format": Key("auto", "str", "where training items come from; auto detects folder, video or wds from --data",
                       choices=("auto", "folder", "wds", "video", "mnist", "colour_mnist", "moving_mnist")),
    "holdout": Key(None, "str", "colour_mnist: '(digit):(colour)' pairs never shown in training, e.g. '7:red 2:blue'"),
    "num_workers": Key(2, "int", "DataLoader worker processes"),
    "max_steps": Key(0, "int", "stop after this many optimizer steps in total (0 = run all epochs)"),
    "ckpt_every": Key(1000, "int", "write the resumable training state every N optimizer steps (and at epoch end)"),
    "log_every": Key(10, "int", "log metrics every N optimizer steps"),
    "sample_every": Key(0, "int", "also save a sample grid every N optimizer steps (0 = only per sample_freq)"),
    "train_samples": Key(8, "int", "images/videos in each training-time sample grid"),
    "sample_captions": Key(None, "str", "captions for training-time samples, '|'-separated; None = from the data"),
    "grad_skip_after": Key(100, "int", "grad_skip applies from this optimizer step on (early norms are large)"),
    "denoiser_lr": Key(1e-4, "float", "peak learning rate of the learnable self-denoiser"),
    "weight_decay": Key(1e-4, "float", "AdamW weight decay"),
    "cache_latents": Key(0, "int", "encode each training item once with the VAE and reuse the latents"),
    "cache_text": Key(0, "int", "keep the text embedding of each distinct prompt in memory (small caption sets)"),
    "wandb": Key(1, "int", "log to wandb on rank 0 (offline when there is no API key); 0 = off"),
    "device": Key("auto", "str", "auto | cpu | cuda | mps"),
}


class Config:
    """Resolved configuration with attribute access."""

    def __init__(self, values):
        self.__dict__.update(values)

    def to_dict(self):
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def __repr__(self):
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()) + ")"


def _unknown(key, schema):
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see utils/config.py for the list of keys"
    return UserError(f"unknown config key '{key}'{hint}")


def _convert(key, value, kind):
    """Turn a YAML/CLI value into the key's type; 'None'/'null' give None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
        return None if kind not in ("ints", "floats") else []
    try:
        if kind in ("ints", "floats"):
            parts = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            cast = int if kind == "ints" else float
            return [cast(float(p)) if cast is int and float(p).is_integer() else cast(p) for p in parts]
        if kind == "int":
            if isinstance(value, bool) or str(value).lower() in ("true", "false"):
                return int(str(value).lower() == "true")
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}' expects {kind}, got {value!r}") from None


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        # Every scalar as a string, as the original (which str()-ed each value into argparse); this also keeps
        # YAML 1.1 from reading an unquoted vid_size 9:8 as the base-60 integer 548.
        data = yaml.load(path.read_text(), Loader=yaml.BaseLoader)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
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
            values[k], level[k] = _convert(k, v, schema[k].kind), 1
        values["model_config_path"] = str(path)
    for k, v in explicit.items():
        values[k], level[k] = _convert(k, v, schema[k].kind), 2
    for k in level:
        _validate(k, values[k], schema[k])
    _check(values, level)
    return Config(values)


def _validate(key, value, spec):
    """A given value against its key's enumeration or range (None means 'not set' and always passes)."""
    if value is None:
        return
    if isinstance(spec, Compat) and value not in spec.choices:
        raise UserError(f"config key '{key}: {value}' asks for {spec.feature}, which is not supported; "
                        f"remove the key or set it to {' or '.join(map(str, spec.choices))}")
    if spec.choices is not None and value not in spec.choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(map(str, spec.choices))}; got {value!r}")
    for v in value if isinstance(value, list) else [value]:
        if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high):
            bounds = (f"between {spec.low} and {spec.high}" if spec.low is not None and spec.high is not None
                      else f">= {spec.low}" if spec.low is not None else f"<= {spec.high}")
            raise UserError(f"config key '{key}' must be {bounds}; got {v}")


def _check(values, level):
    """Rules between keys. `blocks` follows a multi-entry layers_per_block, unless it was set where
    layers_per_block was (or later): then the two must agree."""
    if values["vid_size"] is not None:
        parse_vid_size(values["vid_size"])
    for key in ("batch_size", "acc", "img_size", "patch_size", "channels", "epochs"):
        if values[key] is not None and values[key] <= 0:
            raise UserError(f"config key '{key}' must be positive, got {values[key]}")
    layers = values["layers_per_block"]
    if not layers:
        raise UserError("config key 'layers_per_block' needs at least one value, e.g. '2 2 8'")
    if len(layers) > 1:
        if level.get("blocks", 0) >= level.get("layers_per_block", 1) and values["blocks"] != len(layers):
            raise UserError(f"config keys disagree: blocks {values['blocks']} but layers_per_block lists "
                            f"{len(layers)} blocks ({' '.join(map(str, layers))}); drop blocks or make them match")
        values["blocks"] = len(layers)


def parse_vid_size(vid_size):
    """'81:16' -> (81 frames, 16 fps); a third field (second fps) is accepted, the first fps is used."""
    parts = str(vid_size).split(":")
    try:
        frames, fps = int(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise UserError(f"vid_size must be 'frames:fps', e.g. '81:16', got {vid_size!r}") from None
    if frames < 1 or fps <= 0:
        raise UserError(f"vid_size needs frames >= 1 and fps > 0, got {vid_size!r}")
    return frames, fps


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
        denoiser_window=cfg.denoiser_window, local_attn_window=cfg.local_attn_window,
    )
