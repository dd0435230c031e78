"""STARFlowPipeline: prompt -> images or videos from a config + checkpoint (T2I, T2V, TI2V, long video).

    pipe = STARFlowPipeline.from_pretrained("configs/starflow_3B_t2i_256x256.yaml", "ckpts/starflow_3B_t2i_256x256.pth")
    out = pipe("a film still of a cat playing piano", num_samples=4, cfg=3.6, jacobi=True)
    out.images[0].save("cat.png")

A call is a short sequence of named steps, as in diffusers: check_inputs, encode_prompt, prepare_noise, decode
(the flow's inverse), denoise (utils/recipe.py), postprocess (VAE decode; output_type pil, np or latent).
"""
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from transformer_flow import DEPRECATED_KEYS
from utils import recipe
from utils.checkpoint import checkpoint_weights, current_checkpoint, load_model_weights, load_state_dict_file
from utils.config import Key, check_value, guidance_scale, load_config, parse_vid_size
from utils.distributed import pick_device
from utils.errors import InputWarning, UserError, first_line
from utils.image import (aspect_ratio_to_image_size, check_image, load_image, load_mask, load_video,
                         parse_aspect_ratio, to_uint8)
from utils.text_encoder import cut_off_message, load_text_encoder
from utils.vae import finetuned_noise_std, load_vae

OUTPUT_TYPES = ("pil", "np", "latent")
EDIT_BLOCKS = ("all", "deep")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The numeric and named settings of a call: type, default and range, checked by check_inputs (sample.py's flags of
# the same meaning share these ranges).
ARGUMENTS = {
    "num_samples": Key(1, "int", "samples per prompt", low=1),
    "cfg": Key(None, "float", "guidance scale (default: the config's cfg)", low=0),
    "jacobi_block_size": Key(None, "int", "jacobi True: tokens per chunk in the first frame (4x after it), default "
                                          "16; 'auto': the deep step's window", low=1),
    "jacobi_th": Key(None, "float", "Jacobi convergence threshold (relative mean squared change); default 1e-3 "
                                    "for True, auto's own for 'auto'", low=0),
    "jacobi_max_iter": Key(None, "int", "jacobi True: iterations per chunk (default 32); 'auto': evaluations of a "
                                        "token at most", low=1),
    "attn_temp": Key(1.0, "float", "attention temperature (divides the attention logits' scale)", above=0),
    "prior_temp": Key(1.0, "float", "prior temperature T: decoding starts from noise drawn from N(0, T^2 I) (Glow's "
                                    "reduced-temperature sampling; below 1, cleaner and less varied samples)", low=0),
    "target_length": Key(None, "int", "video frames to generate (default: the training length)", low=1),
    "fps": Key(None, "float", "video fps in the prompt text (default: the fps of vid_size)", above=0),
    "context_length": Key(None, "int", "latent frames kept as context when the window slides (default 16, at "
                                       "most window - 1)", low=1),
    "noise_std": Key(None, "float", "noise level of the samples (default: the config's noise_std)", low=0),
    "denoiser": Key("auto", "str", "auto, learned, score or none", choices=recipe.DENOISERS),
    "denoising_batch_size": Key(None, "int", "samples per denoising pass (default: the whole batch)", low=1),
    "score_denoise_steps": Key(None, "int", "score steps of denoising (default: the config's)", low=1, high=16),
    "output_type": Key("pil", "str", "pil, np or latent", choices=OUTPUT_TYPES),
}


def resolve_dtype(dtype, device):
    """None/'auto' -> bfloat16 on CUDA, else float32; a name of DTYPES or one of its torch dtypes -> the dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"dtype '{dtype}' is not supported; use auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be a torch.float32/bfloat16/float16 or its name, got {dtype!r}")
    return dtype


@dataclass
class STARFlowOutput:
    """images: per image model sample a PIL image (output_type 'pil') or one uint8 array (N, H, W, 3) ('np');
    frames: per video a list of PIL frames, or one uint8 array (N, T, H, W, 3); latents: the denoised latents;
    noisy_latents: the flow's samples before denoising; denoiser: the one that ran (learned, score or none)."""
    images: list = None
    frames: list = None
    latents: torch.Tensor = None
    noisy_latents: torch.Tensor = None
    prompts: list = field(default_factory=list)
    size: tuple = None
    fps: float = None
    denoiser: str = None


@dataclass
class _Request:
    """A checked call: one caption per sample and the geometry and settings derived from the arguments."""
    captions: list
    cfg: float
    generator: object
    noise_std: float
    video: bool  # a multi-frame sample (a video model can also draw single images)
    fps: float  # 0 for images
    size: tuple  # (h, w) in pixels
    latent_shape: tuple
    window: int = None  # latent frames of the sliding window (long videos), else None
    context: int = None
    negatives: list = None  # guidance's second prompt per sample (negative_prompt), else the null prompt
    prior_temp: float = 1.0  # the standard deviation of the noise that decoding starts from


def resolve_finetuned_vae(value, logdir):
    """None/'none' -> None; an existing file or folder -> itself; otherwise an id under <logdir>/vae/ (original)."""
    if value is None or str(value).lower() == "none":
        return None
    if os.path.exists(value):
        return value
    for ext in (".safetensors", ".pth"):
        candidate = os.path.join(logdir, "vae", value + ext)
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"fine-tuned VAE '{value}' not found (neither a path nor {logdir}/vae/{value}.safetensors|.pth);"
                    f" pass --finetuned_vae none to denoise with the flow instead")


def _described(value):
    return "None" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _check_generator(generator, samples):
    """None, one torch.Generator, or one per sample."""
    many = isinstance(generator, (list, tuple))
    if generator is None or isinstance(generator, torch.Generator) or \
            (many and all(isinstance(g, torch.Generator) for g in generator)):
        if many and len(generator) != samples:
            raise UserError(f"generator: got {len(generator)} generators for {samples} samples; give one per sample "
                            f"(prompts x num_samples) or a single one")
        return
    raise TypeError(f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(5)) or a list of one "
                    f"per sample, got {_described(generator)}")


def interpolation_fractions(steps):
    """interpolate's `steps`: a count (>= 2, evenly spaced with both ends) or a list of fractions in [0, 1]."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 2:
            raise ValueError(f"steps must be at least 2 (the two pictures), got {steps}")
        return torch.linspace(0, 1, steps).tolist()
    if isinstance(steps, (list, tuple)) and steps and all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in steps):
        return [float(t) for t in steps]
    raise ValueError(f"steps must be a count (>= 2) or a non-empty list of fractions in [0, 1], got "
                     f"{_described(steps)}")


class STARFlowPipeline:
    """Text encoder + STARFlow model + VAE, with the sampling recipe of the official release."""

    def __init__(self, model, text_encoder, vae, config, device, dtype, finetuned_vae=None):
        self.model, self.text_encoder, self.vae, self.config = model, text_encoder, vae, config
        self.device, self.dtype = torch.device(device), dtype
        self.finetuned_vae = finetuned_vae
        self.finetuned_noise_std = finetuned_noise_std(finetuned_vae) if finetuned_vae else None
        self.video = config.vid_size is not None
        self.train_frames, self.train_fps = parse_vid_size(config.vid_size) if self.video else (1, 0)

    @classmethod
    def from_pretrained(cls, config_path, checkpoint_path=None, device=None, dtype=None, overrides=None,
                        finetuned_vae=None, validate=None):
        """Build from a YAML config and a .pth/.safetensors checkpoint, or from a checkpoint folder alone that holds
        its config.yaml (train.py's checkpoints/latest, the shipped demos). overrides: config keys (dict or CLI
        tokens).

        device: 'auto'/None picks cuda, mps or cpu. dtype: model dtype, a torch dtype or its name ('float16'; default
        bfloat16 on CUDA, else float32). finetuned_vae: path (or id under logdir/vae/) of a decoder fine-tuned on
        noisy latents; replaces denoising. validate: a function called with the pipeline as soon as its VAE is
        loaded, before the text encoder and the model, e.g. to check_inputs of the calls to come in seconds.
        """
        if not isinstance(config_path, (str, os.PathLike)):
            raise TypeError(f"config_path must be a path to a YAML config, got {type(config_path).__name__}")
        if checkpoint_path is None:
            folder = current_checkpoint(config_path)
            config_path = os.path.join(folder, "config.yaml")
            if not os.path.isfile(config_path):
                raise UserError(f"'{folder}' is not a checkpoint folder with a config.yaml; pass the YAML config and "
                                f"the checkpoint: from_pretrained(config_path, checkpoint_path)")
            checkpoint_path = folder
        return cls.from_config(load_config(config_path, overrides), checkpoint_path, device, dtype, finetuned_vae,
                               validate)

    @classmethod
    def from_config(cls, config, checkpoint_path, device=None, dtype=None, finetuned_vae=None, validate=None):
        """Like from_pretrained, with an already loaded utils.config.Config."""
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a path, got {type(checkpoint_path).__name__}")
        device = pick_device(device or config.device)
        dtype = resolve_dtype(dtype, device)
        weights_path = checkpoint_weights(checkpoint_path, config.ema_weights)
        weights = load_state_dict_file(weights_path)  # first: a bad path fails before minutes of loading
        finetuned = resolve_finetuned_vae(finetuned_vae if finetuned_vae is not None else config.finetuned_vae,
                                          config.logdir)
        vae = load_vae(config.vae, device, finetuned=finetuned, pixel_channels=config.channel_size)
        if vae.latent_channels != config.channel_size:
            raise UserError(f"config channel_size {config.channel_size} does not match the {vae.latent_channels} "
                            f"latent channels of VAE '{config.vae}'")
        pipe = cls(None, None, vae, config, device, dtype, finetuned)
        if validate is not None:
            validate(pipe)
        if config.text and config.text != "none":
            text_dtype = dtype if device.type == "cuda" else torch.float32
            pipe.text_encoder = load_text_encoder(config.text, config.txt_size, device, text_dtype)
        elif config.txt_size:
            raise UserError("config has txt_size > 0 but no `text:` encoder; set text: (e.g. google/flan-t5-xl)")
        txt_dim = pipe.text_encoder.dim if pipe.text_encoder else 0
        with torch.device("meta"):  # no float32 copy: the checkpoint's tensors become the parameters
            model = recipe.build_model(config, config.img_size // vae.spatial_factor, txt_dim)
        try:
            load_model_weights(model, weights, skip=DEPRECATED_KEYS.match, assign=True)
        except UserError as e:
            raise UserError(f"{checkpoint_path}: {e}") from None
        pipe.model = model.to(device, dtype).eval().requires_grad_(False)
        return pipe

    def to(self, device=None, dtype=None):
        """Move the pipeline, as diffusers' pipe.to: the flow to `device` in `dtype` (None keeps it; names and
        'auto' as in from_pretrained), the text encoder in that dtype on CUDA and float32 elsewhere, the VAE as
        loaded (float32). Returns the pipeline."""
        device = self.device if device is None else pick_device(device)
        dtype = self.dtype if dtype is None else resolve_dtype(dtype, device)
        self.model.to(device, dtype)
        self.vae.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device, dtype if device.type == "cuda" else torch.float32)
        self.device, self.dtype = device, dtype
        return self

    # ------------------------------------------------------------------------------------------- geometry
    def pixel_size(self, aspect_ratio=None):
        """(H, W) in pixels: area img_size^2, sides multiples of the VAE factor times the patch size."""
        multiple = self.vae.spatial_factor * self.config.patch_size
        ratio = 1.0 if aspect_ratio is None else parse_aspect_ratio(aspect_ratio)
        if self.config.img_size < multiple:
            raise UserError(f"img_size {self.config.img_size} is smaller than one latent patch ({multiple} px)")
        h, w = aspect_ratio_to_image_size(self.config.img_size, ratio, multiple)
        if abs(math.log(w / h / ratio)) > math.log(1.5):
            raise UserError(f"aspect ratio {aspect_ratio} cannot be made at img_size {self.config.img_size} with "
                            f"sides that are multiples of {multiple} px (closest is {w}x{h}); use a ratio nearer "
                            f"1:1 or a larger img_size")
        return h, w

    def latent_frames(self, num_frames):
        tf = self.vae.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            ok = max(1, num_frames - (num_frames - 1) % tf)
            raise UserError(f"video length {num_frames} frames does not fit the VAE's {tf}x temporal compression: "
                            f"use 1 + {tf}k frames, e.g. {ok} or {ok + tf}")
        return (num_frames - 1) // tf + 1

    # ---------------------------------------------------------------------------------------------- steps
    def check_inputs(self, prompt, generator=None, aspect_ratio=None, input_image=None, jacobi=False, input_video=None,
                     negative_prompt=None, **settings):
        """Validate the arguments of a call (types and ranges of ARGUMENTS, the geometry they ask for) and derive its
        captions, geometry and settings; needs only the VAE, so it can run before the model is loaded."""
        c = self.config
        unknown = sorted(set(settings) - set(ARGUMENTS))
        if unknown:
            raise TypeError(f"unexpected argument(s) {', '.join(unknown)}; the call takes {', '.join(ARGUMENTS)}")
        s = {name: settings.get(name, spec.default) for name, spec in ARGUMENTS.items()}
        if jacobi not in (False, True, "auto"):
            raise ValueError(f"jacobi must be False (token by token), True (the original's Jacobi chunks) or 'auto', "
                             f"got {jacobi!r}")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {_described(prompt)}")
        for name, value in s.items():
            check_value(name, value, ARGUMENTS[name], what="")
        captions = [p for p in prompts for _ in range(s["num_samples"])]
        if not captions:
            raise UserError("prompt is an empty list; give at least one prompt")
        _check_generator(generator, len(captions))
        if aspect_ratio is not None and not isinstance(aspect_ratio, str):
            raise TypeError(f"aspect_ratio must be a 'W:H' string such as '16:9', got {_described(aspect_ratio)}")
        target_length = s["target_length"]
        num_frames = target_length if target_length is not None else self.train_frames
        if not self.video and num_frames != 1:
            raise UserError("target_length is for video models; this config has no vid_size")
        if input_image is not None:
            if not self.video:
                raise UserError("--input_image (image-to-video) needs a video model")
            if num_frames == 1:
                raise UserError("--input_image is the first frame of a video, and target_length 1 asks for that frame "
                                "alone; ask for more frames (1 + 4k for Wan)")
            check_image(input_image)
        if input_video is not None:
            if input_image is not None or not self.video or not self.config.temporal_causal:
                raise UserError("--input_video continues a clip: it needs a temporally causal video model "
                                "(temporal_causal > 0) and no --input_image")
            if num_frames == 1:
                raise UserError("--input_video continues a clip, and target_length 1 leaves no frame to generate; "
                                f"ask for at least {1 + self.vae.temporal_factor} frames")
            if not os.path.isfile(input_video):
                raise UserError(f"input video '{input_video}' not found")
        video = self.video and num_frames > 1
        fps = (s["fps"] or self.train_fps) if video else 0
        h, w = self.pixel_size(aspect_ratio)
        f, T = self.vae.spatial_factor, self.latent_frames(num_frames) if video else 1
        shape = (len(captions), T, c.channel_size, h // f, w // f) if video else \
            (len(captions), c.channel_size, h // f, w // f)
        cfg = s["cfg"]
        request = _Request(captions=captions, cfg=guidance_scale(c) if cfg is None else float(cfg),
                           generator=generator if generator is not None else torch.Generator().manual_seed(0),
                           noise_std=c.noise_std if s["noise_std"] is None else s["noise_std"], video=video,
                           fps=int(fps) if float(fps).is_integer() else fps, size=(h, w), latent_shape=shape,
                           prior_temp=float(s["prior_temp"]))
        request.negatives = self.negative_prompts(negative_prompt, prompts, request.cfg, s["num_samples"])
        train_T = self.latent_frames(self.train_frames) if self.video else 1
        if video and T > train_T:
            if not jacobi:
                raise UserError(f"{num_frames} frames is longer than the {self.train_frames} the model was trained "
                                f"on; sliding-window generation needs --jacobi 1 or auto")
            request.window = train_T
            context = s["context_length"]
            request.context = min(16, train_T - 1) if context is None else context
            if not 0 < request.context < train_T:
                raise UserError(f"context_length must be between 1 and {train_T - 1} latent frames, "
                                f"got {request.context}")
        return request

    @staticmethod
    def negative_prompts(negative_prompt, prompts, cfg, num_samples):
        """One negative prompt per sample (given as a string for all, or one per prompt), or None: the null
        prompt."""
        if negative_prompt is None:
            return None
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
            raise TypeError(f"negative_prompt must be a string or a list of strings, got {_described(negative_prompt)}")
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one "
                             f"per prompt")
        if not cfg > 0:
            raise UserError("a negative prompt acts through classifier-free guidance, which cfg 0 turns off; give "
                            "cfg > 0 or no negative prompt")
        return [n for n in negatives for _ in range(num_samples)]

    def choose_denoiser(self, denoiser, request):
        """recipe.choose_denoiser for this model; warns when the fine-tuned decoder that replaces denoising was
        trained at another noise level than the samples carry (it would leave noise in, or blur)."""
        method = recipe.choose_denoiser(denoiser, self.model.learnable_self_denoiser is not None,
                                        bool(self.finetuned_vae))
        trained = self.finetuned_noise_std
        if method == "none" and trained is not None and not math.isclose(trained, request.noise_std, rel_tol=1e-3):
            warnings.warn(InputWarning(
                f"the fine-tuned decoder '{self.finetuned_vae}' learned latents of noise_std {trained:g}, but these "
                f"carry {request.noise_std:g}; fine-tune one at {request.noise_std:g}, or pass --finetuned_vae none "
                f"to denoise with the flow"))
        return method

    def encode_prompt(self, request, aspect_ratio):
        """(decorated texts, y_cond, y): y adds the rows of the null prompt (or of the negative prompts) when
        guidance is on, which then pushes the samples away from them."""
        texts = [recipe.decorate_prompt(self.config, cap, request.fps, aspect_ratio, request.noise_std)
                 for cap in request.captions]
        if self.text_encoder is None and any(request.captions):
            warnings.warn(InputWarning("this model is unconditional (no `text:` encoder): a prompt changes nothing "
                                       "but the file names; sample it with --caption ''"))
        if request.cfg <= 0:
            y = self.encode_text(texts)
            return texts, y, y
        if self.text_encoder is None:
            raise UserError("classifier-free guidance (cfg > 0) needs a text-conditional model; use --cfg 0")
        null = recipe.null_prompt(self.config, request.fps, aspect_ratio, request.noise_std)
        away = [null] * len(texts) if request.negatives is None else [
            recipe.decorate_prompt(self.config, n, request.fps, aspect_ratio, request.noise_std)
            for n in request.negatives]
        y = self.encode_text(texts + away)  # one encoder pass, each distinct text once
        return texts, y[:len(texts)], y

    def encode_text(self, texts):
        """(B, txt_size, dim) text states; a prompt past txt_size tokens warns (once per prompt) what is dropped."""
        if self.text_encoder is None:
            return None
        distinct = list(dict.fromkeys(texts))
        for text, cut in zip(distinct, self.text_encoder.cut_off(distinct)):
            if cut:
                warnings.warn(InputWarning(cut_off_message(self.text_encoder.txt_size, text, cut)))
        return self.text_encoder.encode(texts).to(self.dtype)

    def prepare_noise(self, request):
        """Per-sample Gaussian noise on the CPU (device independent), one generator per sample or one for all, at
        the request's prior temperature."""
        return self._randn(request.latent_shape, request.generator) * request.prior_temp

    def _randn(self, shape, generators):
        """Gaussian noise drawn on the CPU (the same on every device), one generator per sample or one for all."""
        if isinstance(generators, (list, tuple)):
            if len(generators) != shape[0]:  # several rows per sample (inpainting candidates): cycle
                return torch.cat([self._randn((len(generators), *shape[1:]), generators)
                                  for _ in range(shape[0] // len(generators))])
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        return torch.randn(shape, generator=generators)

    def encode_first_frame(self, request, image):
        """Image-to-video: the image as a noisy first latent frame (B, 1, C, h, w) for the flow to continue."""
        pixels = load_image(image, request.size).to(self.device)
        latent = self.vae.encode(pixels, sample=False).cpu()  # (1, C, h', w'): the causal VAE's first frame
        eps = self._randn((len(request.captions), *latent.shape[1:]), request.generator)
        return recipe.noise_augment(latent, request.noise_std, eps)[:, None].to(self.device, self.dtype)

    def encode_video_prefix(self, request, video):
        """Video continuation: the clip's first frames as noisy known latent frames (B, T', C, h, w), as many as
        the VAE can encode that leave at least one frame to generate (and fit the attention window)."""
        T = request.latent_shape[1]
        keep = min(T, request.window or T) - 1
        tf = self.vae.temporal_factor
        pixels = load_video(video, request.size, max_frames=1 + tf * (keep - 1))
        frames = 1 + (len(pixels) - 1) // tf * tf  # the VAE encodes 1 + tf k frames
        latent = self.vae.encode(pixels[:frames].transpose(0, 1)[None].to(self.device), sample=False).cpu()
        eps = self._randn((len(request.captions), *latent.shape[1:]), request.generator)
        return recipe.noise_augment(latent, request.noise_std, eps).to(self.device, self.dtype)

    def encode_images(self, images, request):
        """Pictures (paths or PIL) -> clean latents (B, C, h, w) at the request's size (VAE posterior mean)."""
        pixels = torch.cat([load_image(image, request.size) for image in images]).to(self.device)
        return self.vae.encode(pixels, sample=False).float()

    def encode_clips(self, videos, request):
        """Videos (paths) -> clean latents (B, T, C, h, w) of the request's latent frames: each video's first
        1 + tf (T - 1) frames, cropped and resized like an image (VAE posterior mean)."""
        frames = 1 + self.vae.temporal_factor * (request.latent_shape[1] - 1)
        latents = []
        for video in videos:
            if not isinstance(video, (str, os.PathLike)) or not os.path.isfile(video):
                raise UserError(f"interpolating videos takes two video files, got {_described(video)}")
            pixels = load_video(video, request.size, max_frames=frames)
            if len(pixels) < frames:
                raise UserError(f"'{video}' has {len(pixels)} frames; this model's clips have {frames}, so "
                                f"interpolation needs videos of at least {frames} frames")
            latents.append(self.vae.encode(pixels.transpose(0, 1)[None].to(self.device), sample=False))
        return torch.cat(latents).float()

    def likelihood(self, x, y, guidance=0.0):
        """The flow's density pass on latents x under text y: (z, per-sample NLL in nats); with guidance > 0
        (y = cat([y_cond, y_uncond])) the guided map, the exact inverse of guided decoding."""
        z, _, logdets = self.model(x.to(self.device, self.dtype), None if y is None else y.to(self.dtype),
                                   guidance=guidance)
        return z.float(), self.model.sample_nll(z, logdets)

    def decode(self, noise, y, request, cond_frames=None, **sampling):
        """The flow's inverse: noise -> noisy latents (float32), with guidance, Jacobi and the sliding window."""
        try:
            return self.model.reverse(noise.to(self.device, self.dtype), y, guidance=request.cfg,
                                      cond_frames=cond_frames, local_attn_window=request.window,
                                      context_length=request.context, **sampling).float()
        except torch._dynamo.exc.TorchDynamoException as e:  # a missing C++ compiler, an unsupported device
            if not sampling.get("compile_decode"):
                raise
            raise UserError(f"compile_decode: torch.compile could not build the decoding step ({first_line(e)}); "
                            f"decode without it (--compile_decode 0)") from None

    def denoise(self, x, y_cond, request, method, batch_size=None, score_steps=None):
        return recipe.denoise(self.model, x, y_cond, request.noise_std, method, self.dtype, window=request.window,
                              overlap=self.config.denoiser_window, batch_size=batch_size,
                              score_steps=score_steps or self.config.score_denoise_steps)

    def postprocess(self, latents, request, output_type):
        """VAE decode (one sample at a time: video VAEs are memory hungry) into PIL or uint8 numpy pictures."""
        if output_type == "latent":
            return None
        pixels = torch.cat([self.vae.decode(latents[i:i + 1].float().to(self.device)).cpu()
                            for i in range(len(latents))])
        arrays = to_uint8(pixels.transpose(1, 2) if request.video else pixels)
        if output_type == "np":
            return arrays
        if request.video:
            return [[Image.fromarray(frame) for frame in clip] for clip in arrays]
        return [Image.fromarray(a) for a in arrays]

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt, num_samples=1, cfg=None, generator=None, aspect_ratio=None, jacobi=False,
                 jacobi_block_size=None, jacobi_th=None, jacobi_max_iter=None, attn_temp=1.0, target_length=None,
                 fps=None, input_image=None, context_length=None, denoiser="auto", noise_std=None,
                 denoising_batch_size=None, score_denoise_steps=None, output_type="pil", input_video=None,
                 negative_prompt=None, prior_temp=1.0, compile_decode=False):
        """Generate num_samples per prompt.

        prompt: str or list of str. cfg: guidance scale (default: the config's cfg). jacobi: False (token by
        token), True (the original's block-wise Jacobi) or 'auto' (sliding windows per flow step; see
        Model.decode_schedules); the jacobi_* settings default to each mode's own. generator: a torch.Generator
        or one per sample (for per-sample seeds). aspect_ratio: 'W:H'. target_length: video frames (default:
        the training length; longer uses a sliding window of the training length, needs jacobi). input_image:
        path or PIL image for image-to-video; input_video: an MP4 to continue (its first frames become known
        latent frames). denoiser: 'auto' (learned if the model has one), 'learned', 'score', or 'none' (automatic
        when a fine-tuned VAE decoder is loaded); score_denoise_steps: score steps (default: the config's).
        output_type: 'pil', 'np' (uint8 arrays) or 'latent' (no VAE decode). negative_prompt: str, or one per
        prompt: guidance pushes away from it instead of from the null prompt (needs cfg > 0). prior_temp: the
        noise's standard deviation (1: the model's distribution; below 1 trades variety for cleaner samples).
        compile_decode: the flow steps decoded token by token run through torch.compile'd graphs (compiled on the
        first call; Model.decode_schedules).
        """
        request = self.check_inputs(prompt, generator, aspect_ratio, input_image, jacobi, input_video,
                                    negative_prompt, num_samples=num_samples, cfg=cfg,
                                    jacobi_block_size=jacobi_block_size, jacobi_th=jacobi_th,
                                    jacobi_max_iter=jacobi_max_iter, attn_temp=attn_temp, target_length=target_length,
                                    fps=fps, context_length=context_length, noise_std=noise_std, denoiser=denoiser,
                                    denoising_batch_size=denoising_batch_size,
                                    score_denoise_steps=score_denoise_steps, output_type=output_type,
                                    prior_temp=prior_temp)
        method = self.choose_denoiser(denoiser, request)
        texts, y_cond, y = self.encode_prompt(request, aspect_ratio)
        noise = self.prepare_noise(request)
        cond_frames = None
        if input_image is not None:
            cond_frames = self.encode_first_frame(request, input_image)
        elif input_video is not None:
            cond_frames = self.encode_video_prefix(request, input_video)
        x = self.decode(noise, y, request, cond_frames, attn_temp=attn_temp, jacobi=jacobi,
                        jacobi_block_size=jacobi_block_size, jacobi_th=jacobi_th, jacobi_max_iter=jacobi_max_iter,
                        compile_decode=compile_decode)
        clean = self.denoise(x, y_cond, request, method, denoising_batch_size, score_denoise_steps)
        pictures = self.postprocess(clean, request, output_type)
        return self._output(pictures, clean, x, texts, request, method)

    def _output(self, pictures, clean, noisy, texts, request, method):
        return STARFlowOutput(images=None if request.video else pictures, frames=pictures if request.video else None,
                              latents=clean.cpu(), noisy_latents=noisy.cpu(), prompts=texts, size=request.size,
                              fps=request.fps if request.video else None, denoiser=method)

    # ---------------------------------------------------------------------------- editing by inversion
    def _image_request(self, images, prompt, cfg, generator, aspect_ratio, noise_std, output_type, what):
        """Checks shared by edit and inpaint: a text-conditional image model, one prompt per picture."""
        if self.video:
            raise UserError(f"{what} works on image models; continue a video with --input_video")
        if self.text_encoder is None:
            raise UserError(f"{what} by prompt needs a text-conditional model (this config has no `text:`)")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        images = images * len(prompts) if len(images) == 1 else images  # one picture, several prompts
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
        return images, self.check_inputs(prompts, generator, aspect_ratio, cfg=cfg, noise_std=noise_std,
                                         output_type=output_type)

    @torch.no_grad()
    def edit(self, image, prompt, source_prompt=None, cfg=None, source_cfg=None, generator=None, refresh=0.0,
             blocks="all", aspect_ratio=None, noise_std=None, denoiser="auto", output_type="pil", **sampling):
        """Re-draw pictures under another prompt by flow inversion, with no training.

        The picture is encoded (VAE, plus noise_std noise; 0 encodes the clean latents and skips denoising) to z
        by the exact likelihood pass under source_prompt (default: the null prompt), guided with source_cfg
        (default cfg: then the guided map is inverted exactly); `refresh` in [0, 1] mixes fresh noise into z
        (sqrt(1 - r^2) z + r eps); z is decoded under `prompt` with guidance `cfg`. `blocks`: 'all' decodes every
        flow step under the new prompt, 'deep' only the deep one (the shallow steps keep the source prompt; the
        same thing for cond_top_only models, whose shallow steps see no text). With the same prompt and cfg,
        refresh 0 and noise_std 0 the picture comes back to float precision. sampling: the jacobi settings and
        attn_temp of __call__.
        """
        images, request = self._image_request(image, prompt, cfg, generator, aspect_ratio, noise_std, output_type,
                                              "editing")
        if not 0.0 <= refresh <= 1.0:
            raise ValueError(f"refresh must be in [0, 1], got {refresh}")
        if blocks not in EDIT_BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(EDIT_BLOCKS)}, got {blocks!r}")
        source_cfg = request.cfg if source_cfg is None else float(source_cfg)
        method = "none" if request.noise_std == 0 else self.choose_denoiser(denoiser, request)
        x0 = self.encode_images(images, request)
        x = recipe.noise_augment(x0, request.noise_std, self._randn(x0.shape, request.generator).to(x0.device))
        sources = [source_prompt] * len(images) if source_prompt is None or isinstance(source_prompt, str) \
            else list(source_prompt)
        null = self.encode_text([recipe.null_prompt(self.config, 0, aspect_ratio, request.noise_std)] * len(images))
        y_source = torch.cat([null[i:i + 1] if s is None else self.encode_text(
            [recipe.decorate_prompt(self.config, s, 0, aspect_ratio, request.noise_std)])
            for i, s in enumerate(sources)])
        z, _ = self.likelihood(x, torch.cat([y_source, null]) if source_cfg > 0 else y_source, source_cfg)
        if refresh > 0:
            z = math.sqrt(1 - refresh ** 2) * z + refresh * self._randn(z.shape, request.generator).to(z.device)
        texts, y_cond, y = self.encode_prompt(request, aspect_ratio)
        y_shallow = None
        if blocks == "deep":
            y_shallow = torch.cat([y_source, null]) if request.cfg > 0 else y_source
        out = self.decode(z, y, request, y_shallow=y_shallow, **sampling)
        clean = self.denoise(out, y_cond, request, method)
        return self._output(self.postprocess(clean, request, output_type), clean, out, texts, request, method)

    @torch.no_grad()
    def inpaint(self, image, mask, prompt, cfg=None, generator=None, rounds=4, candidates=4, aspect_ratio=None,
                noise_std=None, denoiser="auto", output_type="pil", **sampling):
        """Regenerate the white region of `mask` under `prompt`; every latent outside it keeps its value exactly.

        An autoregressive flow conditions exactly on the tokens before a hole, not on those after it. So the hole
        is filled by encode-decode rounds: a fresh sample with the known tokens pasted in; then per round the
        completed picture is encoded to z, the hole's noise is partly refreshed (fully at first, less every
        round) in `candidates` variations, each is decoded with the known tokens pasted back, and the one the flow
        finds most likely as a whole picture (its exact NLL, which scores the known tokens after the hole too) is
        kept. The known latents get noise_std noise for the flow and are restored clean after denoising.
        """
        images, request = self._image_request(image, prompt, cfg, generator, aspect_ratio, noise_std, output_type,
                                              "inpainting")
        if any(im is not images[0] for im in images):
            raise ValueError("inpaint takes one picture (give a list of prompts for several samples)")
        if rounds < 0 or candidates < 1:
            raise ValueError(f"rounds must be >= 0 and candidates >= 1, got {rounds} and {candidates}")
        method = self.choose_denoiser(denoiser, request)
        hole = self.latent_mask(load_mask(mask, images[0], request.size)).to(self.device)
        B = len(request.captions)
        x0 = self.encode_images(images, request).expand(B, -1, -1, -1)
        known = recipe.noise_augment(x0, request.noise_std, self._randn(x0.shape, request.generator).to(x0.device))
        texts, y_cond, y = self.encode_prompt(request, aspect_ratio)
        x = torch.where(hole, self.decode(self.prepare_noise(request), y, request, **sampling), known)
        for strength in torch.linspace(1.0, 0.3, rounds).tolist():
            z, _ = self.likelihood(x, y_cond)
            z = z.repeat(candidates, 1, 1, 1)
            fresh = math.sqrt(1 - strength ** 2) * z + strength * self._randn(z.shape, request.generator).to(z.device)
            y_k = y if y is None else torch.cat([y[:B].repeat(candidates, 1, 1), y[B:].repeat(candidates, 1, 1)])
            tries = torch.where(hole, self.decode(torch.where(hole, fresh, z), y_k, request, **sampling),
                                known.repeat(candidates, 1, 1, 1))
            _, nll = self.likelihood(tries, y_cond.repeat(candidates, 1, 1))
            best = nll.view(candidates, B).argmin(0)
            x = tries.view(candidates, B, *tries.shape[1:])[best, torch.arange(B)]
        clean = torch.where(hole, self.denoise(x, y_cond, request, method), x0)
        return self._output(self.postprocess(clean, request, output_type), clean, x, texts, request, method)

    @torch.no_grad()
    def interpolate(self, images, prompt, steps=8, cfg=None, generator=None, aspect_ratio=None, noise_std=None,
                    denoiser="auto", output_type="pil", **sampling):
        """Pictures (a video model: clips) on the path from images[0] to images[1] through the flow's noise space.

        Both pictures get the same noise_std noise (the path changes the pictures, not their noise) and are encoded
        to z by the exact likelihood pass under `prompt` ('' is the null prompt) with guidance cfg. The points at
        `steps` (a count, evenly spaced with both ends; or a list of fractions in [0, 1]) of the spherical path
        between the two z's (recipe.slerp) are decoded under the same prompt and guidance, so the ends give the
        pictures back (to float precision before denoising). A video model takes two videos of at least its
        training length (their first frames of that length). sampling: the jacobi settings and attn_temp of
        __call__.
        """
        fractions = interpolation_fractions(steps)
        if not isinstance(images, (list, tuple)) or len(images) != 2:
            raise ValueError(f"interpolate takes two pictures (a list or tuple of paths or PIL images; video "
                             f"models: of video paths), got {_described(images)}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (one prompt for the whole path), got {_described(prompt)}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be one torch.Generator (the pictures' noise), got {_described(generator)}")
        request = self.check_inputs([prompt], generator, aspect_ratio, cfg=cfg, noise_std=noise_std,
                                    output_type=output_type, num_samples=len(fractions))
        method = "none" if request.noise_std == 0 else self.choose_denoiser(denoiser, request)
        x0 = self.encode_clips(images, request) if request.video else self.encode_images(images, request)
        eps = self._randn((1, *x0.shape[1:]), request.generator).to(x0.device)
        x = recipe.noise_augment(x0, request.noise_std, eps)
        texts, y_cond, y = self.encode_prompt(request, aspect_ratio)
        ends = None if y is None else torch.cat([part[:1].repeat(2, 1, 1) for part in y.split(len(fractions))])
        z, _ = self.likelihood(x, ends, request.cfg)
        out = self.decode(recipe.slerp(z[0], z[1], fractions), y, request, **sampling)
        clean = self.denoise(out, y_cond, request, method)
        return self._output(self.postprocess(clean, request, output_type), clean, out, texts, request, method)

    def latent_mask(self, pixel_mask):
        """(H, W) bool pixel mask -> (1, 1, h, w) latent mask, whole patches: a token is regenerated when any of
        its pixels is."""
        cell = self.vae.spatial_factor * self.config.patch_size
        tokens = F.max_pool2d(pixel_mask[None, None].float(), cell) > 0
        return tokens.repeat_interleave(self.config.patch_size, -2).repeat_interleave(self.config.patch_size, -1)
