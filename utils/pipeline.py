"""STARFlowPipeline: prompt -> images or videos from a config + checkpoint (T2I, T2V, TI2V, long video).

    pipe = STARFlowPipeline.from_pretrained("configs/starflow_3B_t2i_256x256.yaml", "ckpts/starflow_3B_t2i_256x256.pth")
    out = pipe("a film still of a cat playing piano", num_samples=4, cfg=3.6, jacobi=True)
    out.images[0].save("cat.png")

A call is a short sequence of named steps, as in diffusers: check_inputs, encode_prompt, prepare_noise, decode
(the flow's inverse), denoise (utils/recipe.py), postprocess (VAE decode; output_type pil, np or latent).
"""
import math
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from transformer_flow import DEPRECATED_KEYS, Model
from utils import recipe
from utils.checkpoint import load_model_weights, load_state_dict_file
from utils.config import load_config, model_kwargs, parse_vid_size
from utils.distributed import pick_device
from utils.errors import UserError
from utils.image import aspect_ratio_to_image_size, load_image, parse_aspect_ratio, to_uint8
from utils.text_encoder import load_text_encoder
from utils.vae import load_vae

OUTPUT_TYPES = ("pil", "np", "latent")


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


class STARFlowPipeline:
    """Text encoder + STARFlow model + VAE, with the sampling recipe of the official release."""

    def __init__(self, model, text_encoder, vae, config, device, dtype, finetuned_vae=None):
        self.model, self.text_encoder, self.vae, self.config = model, text_encoder, vae, config
        self.device, self.dtype = torch.device(device), dtype
        self.finetuned_vae = finetuned_vae
        self.video = config.vid_size is not None
        self.train_frames, self.train_fps = parse_vid_size(config.vid_size) if self.video else (1, 0)

    @classmethod
    def from_pretrained(cls, config_path, checkpoint_path, device=None, dtype=None, overrides=None,
                        finetuned_vae=None):
        """Build from a YAML config and a .pth/.safetensors checkpoint. overrides: config keys (dict or CLI tokens).

        device: 'auto'/None picks cuda, mps or cpu. dtype: model dtype (default bfloat16 on CUDA, else float32).
        finetuned_vae: path (or id under logdir/vae/) of a decoder fine-tuned on noisy latents; replaces denoising.
        """
        return cls.from_config(load_config(config_path, overrides), checkpoint_path, device, dtype, finetuned_vae)

    @classmethod
    def from_config(cls, config, checkpoint_path, device=None, dtype=None, finetuned_vae=None):
        """Like from_pretrained, with an already loaded utils.config.Config."""
        device = pick_device(device or config.device)
        weights = load_state_dict_file(checkpoint_path)  # first: a bad path fails before minutes of loading
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        finetuned = resolve_finetuned_vae(finetuned_vae if finetuned_vae is not None else config.finetuned_vae,
                                          config.logdir)
        text_encoder = None
        if config.text and config.text != "none":
            text_dtype = dtype if device.type == "cuda" else torch.float32
            text_encoder = load_text_encoder(config.text, config.txt_size, device, text_dtype)
        elif config.txt_size:
            raise UserError("config has txt_size > 0 but no `text:` encoder; set text: (e.g. google/flan-t5-xl)")
        vae = load_vae(config.vae, device, finetuned=finetuned, pixel_channels=config.channel_size)
        if vae.latent_channels != config.channel_size:
            raise UserError(f"config channel_size {config.channel_size} does not match the {vae.latent_channels} "
                            f"latent channels of VAE '{config.vae}'")
        latent_size = config.img_size // vae.spatial_factor
        kwargs = model_kwargs(config, latent_size, txt_dim=text_encoder.dim if text_encoder else 0)
        with torch.device("meta"):  # no float32 copy: the checkpoint's tensors become the parameters
            model = Model(**kwargs)
        try:
            load_model_weights(model, weights, skip=DEPRECATED_KEYS.match, assign=True)
        except UserError as e:
            raise UserError(f"{checkpoint_path}: {e}") from None
        model = model.to(device, dtype).eval().requires_grad_(False)
        return cls(model, text_encoder, vae, config, device, dtype, finetuned)

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
    def check_inputs(self, prompt, num_samples, cfg, generator, aspect_ratio, target_length, fps, input_image,
                     jacobi, context_length, noise_std, output_type):
        """Validate the arguments of a call and derive its captions, geometry and settings."""
        c = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        captions = [p for p in prompts for _ in range(num_samples)]
        if not captions:
            raise UserError("no prompts given")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if isinstance(generator, (list, tuple)) and len(generator) != len(captions):
            raise ValueError(f"got {len(generator)} generators for {len(captions)} samples")
        num_frames = target_length if target_length is not None else self.train_frames
        if not self.video and num_frames != 1:
            raise UserError("target_length is for video models; this config has no vid_size")
        if input_image is not None and not self.video:
            raise UserError("--input_image (image-to-video) needs a video model")
        video = self.video and num_frames > 1
        fps = (fps or self.train_fps) if video else 0
        h, w = self.pixel_size(aspect_ratio)
        f, T = self.vae.spatial_factor, self.latent_frames(num_frames) if video else 1
        shape = (len(captions), T, c.channel_size, h // f, w // f) if video else \
            (len(captions), c.channel_size, h // f, w // f)
        request = _Request(captions=captions, cfg=(c.cfg[0] if c.cfg else 0.0) if cfg is None else float(cfg),
                           generator=generator if generator is not None else torch.Generator().manual_seed(0),
                           noise_std=c.noise_std if noise_std is None else noise_std, video=video,
                           fps=int(fps) if float(fps).is_integer() else fps, size=(h, w), latent_shape=shape)
        train_T = self.latent_frames(self.train_frames) if self.video else 1
        if video and T > train_T:
            if not jacobi:
                raise UserError(f"{num_frames} frames is longer than the {self.train_frames} the model was trained "
                                f"on; sliding-window generation needs --jacobi 1")
            request.window = train_T
            request.context = min(16, train_T - 1) if context_length is None else context_length
            if not 0 < request.context < train_T:
                raise UserError(f"context_length must be between 1 and {train_T - 1} latent frames, "
                                f"got {request.context}")
        return request

    def encode_prompt(self, request, aspect_ratio):
        """(decorated texts, y_cond, y): y adds the null prompt's rows when guidance is on."""
        texts = [recipe.decorate_prompt(self.config, cap, request.fps, aspect_ratio, request.noise_std)
                 for cap in request.captions]
        y_cond = self.encode_text(texts)
        y = y_cond
        if request.cfg > 0:
            if y_cond is None:
                raise UserError("classifier-free guidance (cfg > 0) needs a text-conditional model; use --cfg 0")
            null = recipe.null_prompt(self.config, request.fps, aspect_ratio, request.noise_std)
            y = torch.cat([y_cond, self.encode_text([null] * len(texts))])
        return texts, y_cond, y

    def encode_text(self, texts):
        if self.text_encoder is None:
            return None
        return self.text_encoder.encode(texts).to(self.dtype)

    def prepare_noise(self, request):
        """Per-sample Gaussian noise on the CPU (device independent), one generator per sample or one for all."""
        return self._randn(request.latent_shape, request.generator)

    def _randn(self, shape, generators):
        if isinstance(generators, (list, tuple)):
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        return torch.randn(shape, generator=generators)

    def encode_first_frame(self, request, image):
        """Image-to-video: the image as a noisy first latent frame (B, 1, C, h, w) for the flow to continue."""
        pixels = load_image(image, request.size).to(self.device)
        latent = self.vae.encode(pixels, sample=False).cpu()  # (1, C, h', w'): the causal VAE's first frame
        eps = self._randn((len(request.captions), *latent.shape[1:]), request.generator)
        return recipe.noise_augment(latent, request.noise_std, eps)[:, None].to(self.device, self.dtype)

    def decode(self, noise, y, request, cond_frames=None, **sampling):
        """The flow's inverse: noise -> noisy latents (float32), with guidance, Jacobi and the sliding window."""
        return self.model.reverse(noise.to(self.device, self.dtype), y, guidance=request.cfg,
                                  cond_frames=cond_frames, local_attn_window=request.window,
                                  context_length=request.context, **sampling).float()

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
                 jacobi_block_size=16, jacobi_th=1e-3, jacobi_max_iter=32, attn_temp=1.0, target_length=None,
                 fps=None, input_image=None, context_length=None, denoiser="auto", noise_std=None,
                 denoising_batch_size=None, score_denoise_steps=None, output_type="pil"):
        """Generate num_samples per prompt.

        prompt: str or list of str. cfg: guidance scale (default: the config's cfg). generator: a torch.Generator
        or one per sample (for per-sample seeds). aspect_ratio: 'W:H'. target_length: video frames (default:
        the training length; longer uses a sliding window of the training length, needs jacobi). input_image:
        path or PIL image for image-to-video. denoiser: 'auto' (learned if the model has one), 'learned',
        'score', or 'none' (automatic when a fine-tuned VAE decoder is loaded); score_denoise_steps: score steps
        (default: the config's). output_type: 'pil', 'np' (uint8 arrays) or 'latent' (no VAE decode).
        """
        request = self.check_inputs(prompt, num_samples, cfg, generator, aspect_ratio, target_length, fps,
                                    input_image, jacobi, context_length, noise_std, output_type)
        method = recipe.choose_denoiser(denoiser, self.model.learnable_self_denoiser is not None,
                                        bool(self.finetuned_vae))
        texts, y_cond, y = self.encode_prompt(request, aspect_ratio)
        noise = self.prepare_noise(request)
        cond_frames = None if input_image is None else self.encode_first_frame(request, input_image)
        x = self.decode(noise, y, request, cond_frames, attn_temp=attn_temp, jacobi=jacobi,
                        jacobi_block_size=jacobi_block_size, jacobi_th=jacobi_th, jacobi_max_iter=jacobi_max_iter)
        clean = self.denoise(x, y_cond, request, method, denoising_batch_size, score_denoise_steps)
        pictures = self.postprocess(clean, request, output_type)
        return STARFlowOutput(images=None if request.video else pictures, frames=pictures if request.video else None,
                              latents=clean.cpu(), noisy_latents=x.cpu(), prompts=texts, size=request.size,
                              fps=request.fps if request.video else None, denoiser=method)
