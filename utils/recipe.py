"""The STARFlow recipe: what the flow is trained on, and how its samples become clean latents.

transformer_flow.py is the flow itself (an exact density and its inverse). Around it, STARFlow trains on noisy
latents and removes that noise after sampling; this module is that recipe, and train.py and the pipeline both go
through it, so the two cannot drift apart:
- noise augmentation: x = x0 + noise_std * eps, eps ~ N(0, 1) (or U(-1, 1) to dequantise pixels);
- the loss: the flow's NLL per dimension, weighted by noise_std / 0.3 when the prompt names the noise level;
- the learnable self-denoiser: its target ((sigma^2 / 0.3) * grad_x NLL, or (x - x0) / 0.3) and its step
  x - 0.3 * prediction;
- denoising a sample: that learned step, score (Tweedie) steps with the flow itself, or none (a decoder
  fine-tuned on noisy latents takes it over);
- prompts: the fps line, noise level and aspect text the official models saw, and the null prompt of guidance;
- the path between two pictures' noise (slerp) that interpolation decodes.
"""
import math

import torch
import torch.nn.functional as F

from transformer_flow import Model
from utils.config import model_kwargs
from utils.errors import UserError

# the denoiser predicts (sigma^2 / 0.3) * score, so x - 0.3 * prediction = x + sigma^2 score
LEARNED_DENOISER_STEP = 0.3
NOISE_LEVEL_REFERENCE = 0.3  # with cond_noise_level the NLL is weighted by noise_std / 0.3
DENOISERS = ("auto", "learned", "score", "none")


def build_model(cfg, latent_size, txt_dim=0):
    """The Model a config describes (on the current default device); a combination of keys that no model has
    (FlowConfig's checks: widths that do not split into heads, ...) is one UserError."""
    try:
        return Model(**model_kwargs(cfg, latent_size, txt_dim))
    except (ValueError, TypeError) as e:
        raise UserError(f"the config describes no valid model: {e}") from None


# ------------------------------------------------------------------------------------------------ prompts
def format_prompt(caption, fps=None, noise_std=None, aspect_ratio=None):
    """Decorate a caption exactly as the official models saw it: fps line, noise level prefix, aspect suffix."""
    text = caption
    if fps is not None:
        text = f"A video with {fps} fps:\n{text}\n" if fps > 0 else f"An image:\n{text}\n"
    if noise_std is not None:
        text = f"Noise Level {int(noise_std * 1000)}:\n{text}"
    if aspect_ratio is not None:
        text = f"{text}\n in a {aspect_ratio} aspect ratio.\n"
    return text


def decorate_prompt(cfg, caption, fps=0, aspect_ratio=None, noise_std=None):
    """The caption as the config's model is trained on it: the fps line (fps_cond; fps 0 is an image), the noise
    level (cond_noise_level; default the config's noise_std), the aspect text (mix_aspect; default 1:1)."""
    fps = int(fps) if fps is not None and float(fps).is_integer() else fps
    return format_prompt(caption, fps=fps if cfg.fps_cond else None,
                         noise_std=((cfg.noise_std if noise_std is None else noise_std)
                                    if cfg.cond_noise_level else None),
                         aspect_ratio=(aspect_ratio or "1:1") if cfg.mix_aspect else None)


def null_prompt(cfg, fps=0, aspect_ratio=None, noise_std=None):
    """The unconditional prompt (guidance's second branch, and a dropped label in training): '' decorated alike."""
    return decorate_prompt(cfg, "", fps, aspect_ratio, noise_std)


# ----------------------------------------------------------------------------------------------- training
def unit_noise(noise_type, shape, draw):
    """Augmentation noise before scaling: N(0, 1), or U(-1, 1) for 'uniform'; draw(fn, shape) samples torch.randn
    or torch.rand with the caller's random stream."""
    return draw(torch.rand, shape) * 2 - 1 if noise_type == "uniform" else draw(torch.randn, shape)


def noise_augment(x0, noise_std, eps):
    """The flow's input: clean latents plus noise_std times unit noise."""
    return x0 + noise_std * eps


def loss_weight(cfg):
    """Per-sample NLL weight: noise_std / 0.3 when the prompt carries the noise level (cond_noise_level)."""
    return cfg.noise_std / NOISE_LEVEL_REFERENCE if cfg.cond_noise_level else None


def flow_loss(model, z, logdets, outputs, cfg):
    """{'loss', 'loss_z', 'loss_logdet'}: the weighted NLL per dimension plus the latent-norm penalty."""
    return model.get_loss(z, logdets, outputs=outputs, weights=loss_weight(cfg),
                          latent_norm_regularization=cfg.latent_norm_regularization)


def denoiser_target(kind, x, x0, noise_std, z=None, logdets=None):
    """What the learnable self-denoiser learns to predict for noisy input x, so that x - step * prediction is the
    denoised x. 'score' (STARFlow-V): (sigma^2 / step) * grad_x NLL(x | y), the flow's own Tweedie estimate
    (keeps the graph of z); 'clean': (x - x0) / step, the clean latents x0 regressed from the data, which the
    flow's density does not limit."""
    if kind == "clean":
        return ((x - x0) / LEARNED_DENOISER_STEP).detach().float()
    (grad,) = torch.autograd.grad(Model.summed_nll(z, logdets), x, retain_graph=True)
    return (noise_std ** 2 / LEARNED_DENOISER_STEP) * grad.detach()


def denoiser_loss(prediction, target):
    return F.mse_loss(prediction.float(), target)


# ----------------------------------------------------------------------------------------------- sampling
def slerp(a, b, fractions):
    """Points at `fractions` of the great-circle arc from a to b (one row per fraction): the path through Gaussian
    noise that keeps its norm, where the straight line shrinks two independent draws to 1/sqrt(2) of it midway."""
    # the angle and the weights in Python floats (float64 on any device: MPS has no float64 tensors); at t = 0 and 1
    # the weights are exactly (1, 0) and (0, 1), so the ends are a and b themselves
    cos = float(a.flatten().float() @ b.flatten().float()) / max(float(a.float().norm() * b.float().norm()), 1e-30)
    omega = math.acos(min(1.0, max(-1.0, cos)))
    if omega < 1e-6:  # (nearly) parallel: the arc is the line
        weights = [(1 - t, t) for t in fractions]
    else:
        weights = [(math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega))
                   for t in fractions]
    return torch.stack([wa * a + wb * b for wa, wb in weights])


def choose_denoiser(requested, has_learned, finetuned_decoder=False):
    """'auto' -> 'none' when a decoder fine-tuned on noisy latents decodes, else 'learned' when the model has a
    self-denoiser, else 'score'; an explicit choice is checked against the model."""
    if requested not in DENOISERS:
        raise ValueError(f"denoiser must be one of {', '.join(DENOISERS)}, got {requested!r}")
    if requested == "auto":
        return "none" if finetuned_decoder else "learned" if has_learned else "score"
    if requested == "learned" and not has_learned:
        raise ValueError("this model has no learnable self-denoiser (learnable_self_denoiser: 0); use 'score'")
    return requested


def denoise_step(model, x, y, noise_std, method, dtype, score_steps=1):
    """One denoising pass on noisy latents x (float32 out): the learned step, or `score_steps` score steps.

    The first score step is Tweedie's estimate x + sigma^2 grad log p(x); each further one climbs log p on from
    there with the same step, which is safe because the Hessian of -log p of sigma-noisy data is at most 1 / sigma^2,
    so the steps go up to a mode of the noisy density: the clean picture, for data much sharper than sigma.
    """
    if method == "learned":
        return x.float() - LEARNED_DENOISER_STEP * model.denoise(x.to(dtype), y).float()
    for _ in range(score_steps):
        x = model.score_denoise(x.to(dtype), y, noise_std)
    return x.float()


def denoise(model, x, y, noise_std, method, dtype, window=None, overlap=None, batch_size=None, score_steps=1):
    """Remove the noise_std-noise of sampled latents with `method` ('learned', 'score' or 'none'; 'score' takes
    `score_steps` steps).

    Videos longer than `window` latent frames go in windows that overlap by `overlap` frames (default window - 1);
    every window sees the noisy latents, and only frames not yet written are taken from each window.
    """
    if method == "none":
        return x.float()
    out = torch.empty_like(x, dtype=torch.float32)
    batch_size = batch_size or len(x)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], None if y is None else y[i:i + batch_size]
        if x.dim() == 4 or window is None or x.shape[1] <= window:
            out[i:i + batch_size] = denoise_step(model, xb, yb, noise_std, method, dtype, score_steps)
            continue
        stride = max(1, window - min(overlap or window - 1, window - 1))
        out[i:i + batch_size, :window] = denoise_step(model, xb[:, :window], yb, noise_std, method, dtype,
                                                      score_steps)
        done = window
        while done < x.shape[1]:
            end = min(done + stride, x.shape[1])
            step = denoise_step(model, xb[:, end - window:end], yb, noise_std, method, dtype, score_steps)
            out[i:i + batch_size, done:end] = step[:, window - (end - done):]
            done = end
    return out
