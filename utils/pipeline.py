"""STARFlowPipeline: prompt -> images or videos from a config + checkpoint (T2I, T2V, TI2V, long video).

    pipe = STARFlowPipeline.from_pretrained("configs/starflow_3B_t2i_256x256.yaml", "ckpts/starflow_3B_t2i_256x256.pth")
    out = pipe("a film still of a cat playing piano", num_samples=4, cfg=3.6, jacobi=True)
    out.images[0].save("cat.png")
"""
import math
import os
from dataclasses import dataclass, field

import imageio.v2 as imageio
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dataset import ASPECT_RATIOS, _crop_resize, aspect_ratio_to_image_size
from transformer_flow import DEPRECATED_KEYS, Model
from utils.checkpoint import load_model_weights, load_state_dict_file
from utils.config import load_config, model_kwargs, parse_vid_size
from utils.distributed import pick_device
from utils.errors import UserError
from utils.text_encoder import format_prompt, load_text_encoder
from utils.vae import load_vae

LEARNED_DENOISER_STEP = 0.3  # the self-denoiser target is sigma*(sigma/0.3)*score, so this step is sigma^2 * score
MAX_ASPECT = 8.0


@dataclass
class STARFlowOutput:
    """images: PIL list (image models); frames: per video a list of PIL frames; latents: denoised latents."""
    images: list = None
    frames: list = None
    latents: torch.Tensor = None
    noisy_latents: torch.Tensor = None
    prompts: list = field(default_factory=list)
    size: tuple = None
    fps: float = None


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


def parse_aspect_ratio(aspect):
    """'W:H' -> float W/H, validated."""
    try:
        w, h = (float(v) for v in str(aspect).split(":"))
    except ValueError:
        raise UserError(f"aspect ratio must look like 'W:H' (e.g. 16:9), got {aspect!r}") from None
    if not (w > 0 and h > 0) or not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        raise UserError(f"aspect ratio {aspect!r} is impossible: W and H must be positive with W/H within "
                        f"1/{MAX_ASPECT:g}..{MAX_ASPECT:g}; the trained buckets are {', '.join(ASPECT_RATIOS)}")
    return w / h


def load_input_image(image, size):
    """A path or PIL image -> (1, 3, h, w) in [-1, 1], centre-cropped to the aspect of size=(h, w) and resized."""
    if not isinstance(image, Image.Image):
        if not os.path.isfile(image):
            raise UserError(f"input image '{image}' not found")
        try:
            with Image.open(image) as f:
                image = f.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read input image '{image}': {e}; pass a PNG/JPEG/WebP file") from None
    return _crop_resize(image.convert("RGB"), size, flip=False)[None]


def to_uint8(pixels):
    """[-1, 1] float -> uint8 HWC numpy, channels last."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


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

    # --------------------------------------------------------------------------------------------- pieces
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

    def prompt_text(self, caption, aspect_ratio, fps, noise_std=None):
        """The decorated caption, as the model was trained: fps / noise level / aspect text per the config."""
        c = self.config
        return format_prompt(caption, fps=fps if c.fps_cond else None,
                             noise_std=(noise_std or c.noise_std) if c.cond_noise_level else None,
                             aspect_ratio=(aspect_ratio or "1:1") if c.mix_aspect else None)

    def encode_text(self, texts):
        if self.text_encoder is None:
            return None
        return self.text_encoder.encode(texts).to(self.dtype)

    def latent_frames(self, num_frames):
        tf = self.vae.temporal_factor
        if num_frames < 1 or (num_frames - 1) % tf:
            ok = max(1, num_frames - (num_frames - 1) % tf)
            raise UserError(f"video length {num_frames} frames does not fit the VAE's {tf}x temporal compression: "
                            f"use 1 + {tf}k frames, e.g. {ok} or {ok + tf}")
        return (num_frames - 1) // tf + 1

    def _noise(self, shape, generators):
        """Per-sample Gaussian noise on the CPU (device independent), one generator per sample or one for all."""
        if isinstance(generators, (list, tuple)):
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
        return torch.randn(shape, generator=generators)

    def denoise(self, x, y_cond, noise_std, learned, window=None, batch_size=None):
        """Remove the sigma-noise of sampled latents: learned self-denoiser or one score (Tweedie) step.

        Videos longer than `window` latent frames go in windows that overlap by denoiser_window frames; every
        window sees the noisy latents, and only frames not yet written are taken from each window.
        """
        if learned:
            def step(xb, yb):
                return xb.float() - LEARNED_DENOISER_STEP * self.model.denoise(xb.to(self.dtype), yb).float()
        else:
            def step(xb, yb):
                return self.model.score_denoise(xb.to(self.dtype), yb, noise_std).float()
        out = torch.empty_like(x, dtype=torch.float32)
        batch_size = batch_size or len(x)
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], None if y_cond is None else y_cond[i:i + batch_size]
            if x.dim() == 4 or window is None or x.shape[1] <= window:
                out[i:i + batch_size] = step(xb, yb)
                continue
            overlap = self.config.denoiser_window or window - 1
            stride = max(1, window - min(overlap, window - 1))
            out[i:i + batch_size, :window] = step(xb[:, :window], yb)
            done = window
            while done < x.shape[1]:
                end = min(done + stride, x.shape[1])
                out[i:i + batch_size, done:end] = step(xb[:, end - window:end], yb)[:, window - (end - done):]
                done = end
        return out

    def decode(self, latents):
        """VAE decode one sample at a time (video VAEs are memory hungry); pixels in [-1, 1] on the CPU."""
        return torch.cat([self.vae.decode(latents[i:i + 1].float().to(self.device)).cpu()
                          for i in range(len(latents))])

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt, num_samples=1, cfg=None, generator=None, aspect_ratio=None, jacobi=False,
                 jacobi_block_size=16, jacobi_th=1e-3, jacobi_max_iter=32, attn_temp=1.0, target_length=None,
                 fps=None, input_image=None, context_length=None, denoiser="auto", noise_std=None,
                 denoising_batch_size=None):
        """Generate num_samples per prompt.

        prompt: str or list of str. cfg: guidance scale (default: the config's cfg). generator: a torch.Generator
        or one per sample (for per-sample seeds). aspect_ratio: 'W:H'. target_length: video frames (default:
        the training length; longer uses a sliding window of the training length, needs jacobi). input_image:
        path or PIL image for image-to-video. denoiser: 'auto' (learned if the model has one), 'learned',
        'score', or 'none' (automatic when a fine-tuned VAE decoder is loaded).
        """
        c = self.config
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        captions = [p for p in prompts for _ in range(num_samples)]
        B = len(captions)
        if B == 0:
            raise UserError("no prompts given")
        cfg = (c.cfg[0] if c.cfg else 0.0) if cfg is None else float(cfg)
        noise_std = c.noise_std if noise_std is None else noise_std
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} samples")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)

        num_frames = target_length if target_length is not None else self.train_frames
        if not self.video and num_frames != 1:
            raise UserError("target_length is for video models; this config has no vid_size")
        video = self.video and num_frames > 1
        if video:
            fps = fps or self.train_fps
            fps = int(fps) if float(fps).is_integer() else fps
        else:
            fps = 0
        h, w = self.pixel_size(aspect_ratio)
        f = self.vae.spatial_factor
        T = self.latent_frames(num_frames) if video else 1
        window = context = None
        train_T = self.latent_frames(self.train_frames) if self.video else 1
        if video and T > train_T:
            if not jacobi:
                raise UserError(f"{num_frames} frames is longer than the {self.train_frames} the model was trained "
                                f"on; sliding-window generation needs --jacobi 1")
            window = train_T
            context = min(16, window - 1) if context_length is None else context_length
            if not 0 < context < window:
                raise UserError(f"context_length must be between 1 and {window - 1} latent frames, got {context}")
        if input_image is not None and not self.video:
            raise UserError("--input_image (image-to-video) needs a video model")

        texts = [self.prompt_text(cap, aspect_ratio, fps if self.video else None, noise_std) for cap in captions]
        y_cond = self.encode_text(texts)
        y = y_cond
        if cfg > 0:
            if y_cond is None:
                raise UserError("classifier-free guidance (cfg > 0) needs a text-conditional model; use --cfg 0")
            null = self.prompt_text("", aspect_ratio, fps if self.video else None, noise_std)
            y = torch.cat([y_cond, self.encode_text([null] * B)])
        C = c.channel_size
        shape = (B, T, C, h // f, w // f) if video else (B, C, h // f, w // f)
        noise = self._noise(shape, generator)
        cond_frames = None
        if input_image is not None:
            pixels = load_input_image(input_image, (h, w)).to(self.device)
            latent = self.vae.encode(pixels, sample=False).cpu()  # (1, C, h', w'): the causal VAE's first frame
            cond_frames = (latent + noise_std * self._noise((B, *latent.shape[1:]), generator))[:, None]
            cond_frames = cond_frames.to(self.device, self.dtype)

        x = self.model.reverse(noise.to(self.device, self.dtype), y, guidance=cfg, attn_temp=attn_temp,
                               jacobi=jacobi, jacobi_block_size=jacobi_block_size, jacobi_th=jacobi_th,
                               jacobi_max_iter=jacobi_max_iter, cond_frames=cond_frames,
                               local_attn_window=window, context_length=context).float()
        if denoiser == "auto":
            denoiser = "none" if self.finetuned_vae else (
                "learned" if self.model.learnable_self_denoiser is not None else "score")
        if denoiser == "learned" and self.model.learnable_self_denoiser is None:
            raise UserError("this checkpoint has no learnable self-denoiser; use the score step instead")
        if denoiser == "none":
            clean = x
        elif denoiser in ("learned", "score"):
            clean = self.denoise(x, y_cond, noise_std, denoiser == "learned", window, denoising_batch_size)
        else:
            raise ValueError(f"denoiser must be auto, learned, score or none, got {denoiser!r}")
        pixels = self.decode(clean)
        out = STARFlowOutput(latents=clean.cpu(), noisy_latents=x.cpu(), prompts=texts, size=(h, w),
                             fps=fps if video else None)
        arrays = to_uint8(pixels.transpose(1, 2) if video else pixels)
        if video:
            out.frames = [[Image.fromarray(frame) for frame in clip] for clip in arrays]
        else:
            out.images = [Image.fromarray(a) for a in arrays]
        return out


def write_video(path, frames, fps):
    """uint8 (T, H, W, 3) -> H.264 MP4 at `fps`; sides padded to even sizes for yuv420p."""
    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    tmp = path + ".tmp.mp4"
    imageio.mimwrite(tmp, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=None,
                     ffmpeg_params=["-crf", "10"], ffmpeg_log_level="error")
    os.replace(tmp, path)


def grid_shape(n, tall=False):
    """(rows, cols): the largest divisor of n not above sqrt(n) is the row count, or the column count if tall
    (the original's layouts: 8 images -> 2x4, 8 videos -> 4x2)."""
    short = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return (n // short, short) if tall else (short, n // short)


def make_grid(arrays, pad=2, tall=False):
    """Tile uint8 arrays (..., H, W, 3) into one, `pad` black pixels around cells; smaller cells sit top-left."""
    rows, cols = grid_shape(len(arrays), tall)
    H, W = max(a.shape[-3] for a in arrays), max(a.shape[-2] for a in arrays)
    grid = np.zeros((*arrays[0].shape[:-3], rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        top, left = pad + (i // cols) * (H + pad), pad + (i % cols) * (W + pad)
        grid[..., top:top + a.shape[-3], left:left + a.shape[-2], :] = a
    return grid, dict(rows=rows, cols=cols, cell_height=H, cell_width=W, pad=pad)
