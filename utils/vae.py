"""Frozen VAEs behind one interface: SD-style AutoencoderKL, Wan2.1/2.2 AutoencoderKLWan, or pixel space ('none').

`load_vae(spec)` takes a hub id or local folder, optionally with a ':<temporal scale>' suffix
(e.g. 'Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6'). Every VAE maps pixels in [-1,1], (B,3,H,W) or (B,3,F,H,W),
to normalised latents (B,C,h,w) or (B,T,C,h,w) and back, and exposes spatial_factor, temporal_factor,
latent_channels.
"""
import importlib
import json
import os

import torch
from safetensors import safe_open
from torch import nn

from utils.checkpoint import check_fit, fetch_hint, from_pretrained, load_state_dict_file, looks_like_path
from utils.errors import UserError

VAE_CLASSES = ("AutoencoderKL", "AutoencoderKLWan")  # diffusers classes, imported on first use (pixel space needs none)
FINETUNED_METADATA_KEY = "starflow_finetuned_decoder"  # the safetensors metadata of finetune_decoder.py's results


class ImageVAE(nn.Module):
    """SD-style AutoencoderKL: posterior sample, then (z - shift) * scaling_factor; videos are encoded per frame."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = vae.config.scaling_factor
        self.shift_factor = vae.config.shift_factor or 0.0
        self.latent_channels = vae.config.latent_channels
        self.spatial_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.temporal_factor = 1

    @torch.no_grad()
    def encode(self, pixels, generator=None, sample=True):
        video = pixels.dim() == 5
        x = pixels.transpose(1, 2).flatten(0, 1) if video else pixels
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        z = ((z - self.shift_factor) * self.scaling_factor).float()
        return z.unflatten(0, (pixels.shape[0], -1)) if video else z

    def decode(self, latents):
        video = latents.dim() == 5
        z = latents.flatten(0, 1) if video else latents
        z = z / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return x.unflatten(0, (latents.shape[0], -1)).transpose(1, 2) if video else x


class WanVAE(nn.Module):
    """Wan2.1 / Wan2.2 AutoencoderKLWan as STARFlow-V uses it: pixels (B,3,F,H,W) in [-1,1] <-> latents (B,T,C,h,w),
    T = 1 + (F-1)/4; 4-D tensors are single images.

    What the official checkpoints were trained on, beyond diffusers' network: per-channel latent normalisation
    and a temporal scale on every latent frame after the first (the ':0.6' suffix).
    """

    def __init__(self, vae, temporal_scale=1.0):
        super().__init__()
        self.vae = vae
        self.temporal_scale = float(temporal_scale)
        self.latent_channels = vae.config.z_dim
        self.spatial_factor = vae.config.scale_factor_spatial
        self.temporal_factor = vae.config.scale_factor_temporal
        shape = (1, self.latent_channels, 1, 1, 1)
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(shape), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(shape), persistent=False)

    def _frame_scale(self, num_frames, like):
        """Per-latent-frame factor: 1 for the first (image) frame, temporal_scale for the rest."""
        scale = torch.full((1, num_frames, 1, 1, 1), self.temporal_scale, dtype=like.dtype, device=like.device)
        scale[:, 0] = 1.0
        return scale

    @torch.no_grad()
    def encode(self, pixels, generator=None, sample=True):
        video = pixels.dim() == 5
        x = pixels if video else pixels.unsqueeze(2)
        frames = x.shape[2]
        if (frames - 1) % self.temporal_factor:
            raise UserError(f"the Wan VAE needs 1 + {self.temporal_factor}k frames, got {frames}; "
                            f"use e.g. {frames - (frames - 1) % self.temporal_factor} frames")
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = (posterior.mean - self.latents_mean) / self.latents_std
        if sample:
            # The official pipeline adds the posterior noise after normalising only the mean; the checkpoints
            # were trained on latents made this way, so keep it.
            from diffusers.utils.torch_utils import randn_tensor

            eps = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + posterior.std * eps
        z = z.permute(0, 2, 1, 3, 4).float()
        if not video:
            return z[:, 0]
        return z * self._frame_scale(z.shape[1], z)

    def decode(self, latents):
        video = latents.dim() == 5
        z = latents if video else latents.unsqueeze(1)
        if video:
            z = z / self._frame_scale(z.shape[1], z)
        z = z.permute(0, 2, 1, 3, 4) * self.latents_std + self.latents_mean
        pixels = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return pixels if video else pixels[:, :, 0]


class PixelSpace(nn.Module):
    """No VAE: the flow models pixels directly, RGB (3 channels) or grey (1 channel: the mean of RGB, shown as grey);
    videos are only moved to (B,T,C,H,W) layout."""
    spatial_factor = 1
    temporal_factor = 1

    def __init__(self, channels=3):
        super().__init__()
        if channels not in (1, 3):
            raise UserError(f"pixel space (vae: none) has 3 (RGB) or 1 (grey) channels; set --channel_size 3 or 1, "
                            f"not {channels}")
        self.latent_channels = channels

    def encode(self, pixels, generator=None, sample=True):
        pixels = pixels.float()
        if self.latent_channels == 1:
            pixels = pixels.mean(1, keepdim=True)
        return pixels.transpose(1, 2) if pixels.dim() == 5 else pixels

    def decode(self, latents):
        pixels = latents.transpose(1, 2).float() if latents.dim() == 5 else latents.float()
        return pixels.expand(-1, 3, *pixels.shape[2:]) if self.latent_channels == 1 else pixels


def parse_vae_spec(spec):
    """'name[:temporal_scale]' -> (name, temporal_scale); a suffix that is not a number belongs to the name."""
    name, _, suffix = spec.rpartition(":")
    try:
        return name, float(suffix)
    except ValueError:
        return spec, 1.0


def _find_vae(name):
    """(class name, subfolder) of the VAE at `name`: the repo root or its 'vae' subfolder (diffusers pipelines)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        nested = not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae"))
        subfolders = ["vae"] if nested else [None]
    else:
        subfolders = [None, "vae"]
    for subfolder in subfolders:
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            config = from_pretrained(_ConfigOnly, name, "VAE", **kwargs)
        except UserError as e:
            error = e
            continue
        class_name = config.get("_class_name")
        if class_name not in VAE_CLASSES:
            raise UserError(f"VAE '{name}' is a {class_name}; supported: {', '.join(VAE_CLASSES)} or 'none'")
        return class_name, subfolder
    if os.path.isdir(path) or looks_like_path(name):
        raise error
    raise UserError(f"cannot load VAE '{name}': it is not on disk (no config.json at the root or in vae/). "
                    f"{fetch_hint(name)}; a diffusers pipeline repo needs only its VAE: add --include \"vae/*\"")


class _ConfigOnly:
    """Adapter so config reading goes through the same error handling as weight loading."""

    @staticmethod
    def from_pretrained(name, **kwargs):
        from diffusers import AutoencoderKL

        return AutoencoderKL.load_config(name, **kwargs)


def load_vae(spec, device="cpu", dtype=torch.float32, finetuned=None, pixel_channels=3):
    """Build the frozen VAE named by `spec` (hub id, folder, optional ':scale' suffix, or 'none': pixel space with
    `pixel_channels` channels).

    `finetuned`: a file of fine-tuned weights (safetensors/.pth state dict, keys with or without 'vae.') or a
    save_pretrained folder, e.g. a decoder trained to decode noisy latents (finetune_decoder.py).
    """
    if spec is None or str(spec).lower() == "none":
        if finetuned:
            raise UserError("--finetuned_vae needs a VAE; the config has vae: none (pixel space)")
        return PixelSpace(pixel_channels)
    name, temporal_scale = parse_vae_spec(str(spec))
    class_name, subfolder = _find_vae(name)
    cls = getattr(importlib.import_module("diffusers"), class_name)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if finetuned and os.path.isdir(finetuned):
        vae = from_pretrained(cls, finetuned, "fine-tuned VAE", torch_dtype=dtype)
    else:
        vae = from_pretrained(cls, name, "VAE", torch_dtype=dtype, **kwargs)
    if finetuned and not os.path.isdir(finetuned):
        load_vae_weights(vae, finetuned)
    vae = vae.to(device).eval().requires_grad_(False)
    if class_name == "AutoencoderKLWan":
        return WanVAE(vae, temporal_scale).to(device)
    if temporal_scale != 1.0:
        raise UserError(f"VAE spec '{spec}': a ':{temporal_scale}' temporal scale only applies to Wan video VAEs")
    return ImageVAE(vae)


def finetuned_noise_std(path):
    """The noise_std that finetune_decoder.py fine-tuned a decoder file at; None for other files and folders."""
    if not str(path).endswith(".safetensors"):
        return None
    with safe_open(path, "pt") as f:
        info = (f.metadata() or {}).get(FINETUNED_METADATA_KEY)
    try:
        return float(json.loads(info)["noise_std"])
    except (TypeError, ValueError, KeyError):  # no metadata, or another tool's
        return None


def load_vae_weights(vae, path):
    """Load fine-tuned weights into a diffusers VAE: the whole VAE or only some of its modules (finetune_decoder.py
    stores decoder + post_quant_conv); keys may carry the 'vae.' prefix of a wrapper."""
    state = load_state_dict_file(path, "fine-tuned VAE")
    state = {k[4:] if k.startswith("vae.") else k: v for k, v in state.items()}
    modules = {k.split(".")[0] for k in state}
    expected = {k: v for k, v in vae.state_dict().items() if k.split(".")[0] in modules}
    check_fit(expected, state, f"fine-tuned VAE '{path}'", "Was it fine-tuned from this config's `vae:`?")
    vae.load_state_dict(state, strict=False)  # check_fit matched every key of the modules the file holds
