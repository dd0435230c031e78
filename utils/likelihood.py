"""Exact likelihood of data under a flow, evaluate.py's bits/dim protocol (README, Evaluation): the flow's input
for data items, the NLL of a batch, and the mean bits/dim of a set of items over the ranks (train.py's held-out
score)."""
import torch

from transformer_flow import Model
from utils import distributed, recipe
from utils.errors import UserError
from utils.metrics import LEVEL, bits_per_dim, dequantize, quantize
from utils.vae import PixelSpace


def resolve_noise(cfg, pipe):
    """'dequantize' or 'train' for this model; dequantization is only defined for 8-bit pixels."""
    pixel = isinstance(pipe.vae, PixelSpace)
    noise = cfg.nll_noise if cfg.nll_noise != "auto" else "dequantize" if pixel else "train"
    if noise == "dequantize" and not pixel:
        raise UserError("--nll_noise dequantize is for pixel-space models (8-bit levels); a latent model's NLL is in "
                        "latent space with its training noise: use --nll_noise train (what auto picks)")
    if noise == "train" and cfg.noise_std <= 0:
        raise UserError("--nll_noise train adds the config's noise_std, which is 0; use --nll_noise dequantize")
    return noise


def model_input(pipe, cfg, pixels, indices, noise):
    """The flow's input for data pixels: VAE latents (posterior mean) or pixels, dequantized or noise-augmented;
    the noise of item i is drawn from seed (seed, i), so it depends on neither batching nor ranks."""
    x = pipe.vae.encode((pixels.transpose(1, 2) if pixels.dim() == 5 else pixels).to(pipe.device), sample=False)
    x = x.float()
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + i) for i in indices]

    def draw(fn, shape):
        return torch.stack([fn(shape[1:], generator=g) for g in gens]).to(x.device)

    if noise == "dequantize":
        return dequantize(quantize(x), draw(torch.rand, x.shape))
    return recipe.noise_augment(x, cfg.noise_std, recipe.unit_noise(cfg.noise_type, x.shape, draw))


@torch.no_grad()
def nll_of(pipe, x, y):
    """-log p(x | y) per sample in nats."""
    z, _, logdets = pipe.model(x.to(pipe.device, pipe.dtype), y)
    return Model.sample_nll(z, logdets).cpu()


def batches(items, size):
    """Runs of up to `size` consecutive items that share a shape, fps and aspect bucket (so they stack)."""
    batch = []
    for item in items:
        if batch and (len(batch) == size or _kind(batch[0]) != _kind(item)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _kind(item):
    _, pixels, _, meta = item
    return tuple(pixels.shape), meta["fps"], meta["aspect"]


def mean_bits_per_dim(pipe, cfg, items, batch_size, noise, device):
    """Mean bits/dim of `items` (each rank's share of an EvalItems) over all ranks. Every rank runs as many passes
    as the busiest one (the extra ones on its last batch, not counted), so a sharded model's ranks run together."""
    mine = list(batches(items, batch_size))
    if not mine:
        raise UserError(f"no held-out items for rank {distributed.rank()}: the data has fewer items than ranks")
    passes = distributed.max_over_ranks(len(mine), device)
    level = LEVEL if isinstance(pipe.vae, PixelSpace) else None
    total = torch.zeros(2, dtype=torch.float64)  # sum of bits/dim, items
    for k in range(passes):
        idx, pixels, captions, metas = zip(*mine[min(k, len(mine) - 1)])
        x = model_input(pipe, cfg, torch.stack(pixels), idx, noise)
        texts = [recipe.decorate_prompt(cfg, c, m["fps"], m["aspect"]) for c, m in zip(captions, metas)]
        nll = nll_of(pipe, x, pipe.encode_text(texts))
        if k < len(mine):
            total += torch.tensor([float(bits_per_dim(nll, x[0].numel(), level).sum()), len(idx)],
                                  dtype=torch.float64)
    total = distributed.all_reduce_mean(total.to(device)).cpu()  # the ratio of means is the ratio of sums
    return float(total[0] / total[1])
