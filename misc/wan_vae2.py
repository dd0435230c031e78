"""Wan2.1 / Wan2.2 video VAE as STARFlow-V uses it: diffusers' AutoencoderKLWan plus latent normalisation.

The network itself is diffusers' (no copy here). This adapter adds what the official checkpoints were trained on:
per-channel latent normalisation and a temporal scale on every latent frame after the first (the ':0.6' suffix).
"""
import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from utils.errors import UserError


class WanVAE(nn.Module):
    """pixels (B,3,F,H,W) in [-1,1] <-> latents (B,T,C,h,w), T = 1 + (F-1)/4; 4-D tensors are single images."""

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
