"""Train STARFlow / STARFlow-V: exact NLL of noise-augmented latents, one process, DDP or FSDP2 under torchrun.

    python train.py --model_config_path configs/tiny_image.yaml --epochs 1
    torchrun --standalone --nproc_per_node 8 train.py --model_config_path configs/starflow_3B_t2i_256x256.yaml \\
        --data /data/shards/train-{0000..0999}.tar --epoch_length 1000000
"""
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

from dataset import EvalItems, TrainData
from transformer_flow import DEPRECATED_KEYS, AttentionBlock
from utils import recipe
from utils import training as T
from utils.checkpoint import EMA_WEIGHTS, FIT_HINT, load_model_weights
from utils.config import BUILT_IN_DATA, SCHEMA, Config, guidance_scale, load_config, print_help, save_config, wants_help
from utils.distributed import all_reduce_mean, barrier, cleanup, init_distributed
from utils.errors import InputWarning, UserError, run_cli
from utils.files import atomic_path, check_output_dir, make_dir, write_text
from utils.image import make_grid, write_png, write_video
from utils.likelihood import mean_bits_per_dim, resolve_noise
from utils.pipeline import STARFlowPipeline
from utils.text_encoder import cut_off_message, load_text_encoder
from utils.vae import load_vae


def parse_config(argv):
    """CLI tokens -> Config; a resumed run starts from its saved config unless a YAML is given."""
    probe = load_config(None, argv)
    if probe.resume_path and not probe.model_config_path:
        cfg = T.resume_config(probe.resume_path, argv)
        if cfg is not None:
            return cfg
    return probe


def job_name(cfg):
    """The original's run naming: dataset, '-wandb_name', or 'a+b' -> dataset-a-<value of key b>."""
    if not cfg.wandb_name:
        return cfg.dataset
    if "+" in cfg.wandb_name:
        prefix, key = cfg.wandb_name.split("+", 1)
        return f"{cfg.dataset}-{prefix}-{getattr(cfg, key, key)}"
    return f"{cfg.dataset}-{cfg.wandb_name}"


def step_generator(seed, index):
    """Randomness of one micro-batch (noise, label drop), a function of (seed, index) only: exact resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index * 7_919 + 17) % (2**63))


def rank_slice(tensor_fn, shape, info, gen):
    """Draw for the whole global batch and keep this rank's rows, so results do not depend on the world size."""
    full = tensor_fn((shape[0] * info.world_size, *shape[1:]), generator=gen)
    return full[info.rank * shape[0]:(info.rank + 1) * shape[0]]


class Run:
    """Everything one training run holds: config, data, frozen encoders, model, optimizers and progress."""

    def __init__(self, cfg, info):
        self.cfg, self.info = cfg, info
        self.main = info.rank == 0
        self.cuda = info.device.type == "cuda"
        seed = cfg.train_seed if cfg.train_seed is not None else time.time_ns() % 2**31
        self.seed = T.broadcast_int(seed, info.device)
        self.run_dir = os.path.join(cfg.logdir, job_name(cfg))
        check_output_dir(self.run_dir, "run folder")
        T.check_run_folder_free(self.run_dir, cfg.resume_path)
        self.val_cfg = self.setup_validation()  # a config error before minutes of loading
        self.setup_encoders()
        self.data = TrainData(cfg, info.rank, info.world_size, self.seed, self.vae.spatial_factor * cfg.patch_size)
        self.heldout = self.heldout_items()
        if cfg.vid_size and self.vae.temporal_factor > 1:
            frames = int(cfg.vid_size.split(":")[0])
            if (frames - 1) % self.vae.temporal_factor:
                raise UserError(f"vid_size {cfg.vid_size}: the VAE compresses time {self.vae.temporal_factor}x, so "
                                f"clips need 1 + {self.vae.temporal_factor}k frames (e.g. "
                                f"{frames - (frames - 1) % self.vae.temporal_factor})")
        self.secondary = self.setup_secondary()
        self.setup_model()
        self.steps_per_epoch = self.data.steps_per_epoch // cfg.acc
        if self.steps_per_epoch == 0:
            raise UserError(f"an epoch has {self.data.steps_per_epoch} batches, fewer than acc={cfg.acc}")
        total = cfg.epochs * self.steps_per_epoch
        warmup = T.warmup_steps(cfg.warmup_steps, self.steps_per_epoch, total)
        self.schedules = {"model": T.WarmupCosine(self.optimizers["model"], warmup, total, cfg.lr, cfg.min_lr)}
        if "denoiser" in self.optimizers:
            self.schedules["denoiser"] = T.WarmupCosine(self.optimizers["denoiser"], warmup, total,
                                                        cfg.denoiser_lr, cfg.min_lr)
        self.step, self.epoch, self.skipped_steps = 0, cfg.resume_epoch, 0
        self.skipped_files = set(self.data.skipped_at_scan)
        self.secondary_pos = [0, 0]
        self.latent_cache, self.text_cache = {}, {}
        self.captions_unchecked = self.main  # until a caption past txt_size is found (rank 0 tells)
        self.sample_captions = cfg.sample_captions.split("|") if cfg.sample_captions else None
        self.data_captions = None  # the first batch's: the sample prompts otherwise (saved, so a resume keeps them)
        self.wandb_id = None
        self.saved_step = self.saved_path = None
        self.resume()

    # ------------------------------------------------------------------------------------------------ setup
    def setup_encoders(self):
        """The VAE first (its factors check the sizes in seconds), then the text encoder (minutes for T5-XL)."""
        cfg, dev = self.cfg, self.info.device
        self.vae = load_vae(cfg.vae, dev, pixel_channels=cfg.channel_size)
        if self.vae.latent_channels != cfg.channel_size:
            raise UserError(f"channel_size {cfg.channel_size} does not match the {self.vae.latent_channels} latent "
                            f"channels of vae '{cfg.vae or 'none'}'; set --channel_size {self.vae.latent_channels}")
        multiple = self.vae.spatial_factor * cfg.patch_size
        if cfg.img_size % multiple:
            raise UserError(f"img_size {cfg.img_size} must be a multiple of VAE factor x patch_size = {multiple}")
        self.text_encoder = None
        if cfg.text and cfg.text != "none":
            self.text_encoder = load_text_encoder(cfg.text, cfg.txt_size, dev)
            if cfg.fsdp and cfg.fsdp_text_encoder and self.info.world_size > 1:
                T.shard_frozen(self.text_encoder.model, self.info)
        elif cfg.txt_size:
            raise UserError("txt_size > 0 needs a text encoder: set --text (a hub id or folder), or --txt_size 0")
        if not cfg.txt_size and any(c > 0 for c in cfg.cfg or []):  # else the first sample grid would fail
            raise UserError(f"an unconditional model (txt_size 0) has no guidance, but cfg is "
                            f"{' '.join(f'{c:g}' for c in cfg.cfg)}; set --cfg 0 (its samples and saved config use it)")

    def setup_secondary(self):
        cfg = self.cfg
        if not cfg.secondary_dataset or cfg.secondary_ratio <= 0:
            return None
        overrides = dict(cfg.to_dict(), data=cfg.secondary_dataset, img_size=cfg.secondary_img_size,
                         vid_size=cfg.secondary_vid_size, batch_size=cfg.secondary_batch_size, data_format="auto")
        for key in ("model_config_path", "holdout"):  # the holdout pairs are colour MNIST's, not a folder's
            overrides.pop(key)
        sec_cfg = load_config(None, overrides)
        if sec_cfg.batch_size % (self.info.world_size * cfg.acc):
            raise UserError(f"secondary_batch_size {sec_cfg.batch_size} is not divisible by world_size x acc")
        return TrainData(sec_cfg, self.info.rank, self.info.world_size, self.seed + 1,
                         self.vae.spatial_factor * cfg.patch_size)

    def setup_validation(self):
        """The config of val_every's held-out items (evaluate.py's, seed 0): val_data, else the test split of a
        built-in format; None when val_every is 0."""
        cfg = self.cfg
        if not cfg.val_every:
            return None
        builtin = cfg.data_format in BUILT_IN_DATA
        if cfg.val_data is None and not builtin:
            raise UserError(f"val_every needs held-out data: give --val_data (a folder or shards, as --data); only the "
                            f"built-in formats ({', '.join(BUILT_IN_DATA)}) hold out their test split")
        if cfg.val_items < self.info.world_size:
            raise UserError(f"val_items {cfg.val_items} is fewer than the {self.info.world_size} ranks; give at least "
                            f"one held-out item a rank")
        # a --val_data folder or shards is detected from its own files, whatever --data is
        where = {} if cfg.val_data is None else dict(data=cfg.val_data, holdout=None, data_format="auto")
        return Config(dict(cfg.to_dict(), seed=0, nll_noise="auto", **where))

    def heldout_items(self):
        """This rank's share of the held-out items, read at every validation; opened now, so that a missing
        --val_data fails before training, not at the first validation."""
        cfg, info = self.val_cfg, self.info
        if cfg is None:
            return None
        try:
            return EvalItems(cfg, self.vae.spatial_factor * cfg.patch_size, info.rank, info.world_size, "test",
                             cfg.seed, cfg.val_items)
        except UserError as e:
            raise UserError(f"val_data: {e}") from None

    @torch.no_grad()
    def validate(self):
        """val_bpd: bits/dim of the first val_items held-out items under the current weights (every rank takes part:
        the model may be sharded)."""
        cfg, info = self.val_cfg, self.info
        self.model.eval()
        pipe = STARFlowPipeline(self.model, self.text_encoder, self.vae, cfg, info.device, torch.float32)
        with self.autocast():
            bpd = mean_bits_per_dim(pipe, cfg, self.heldout, max(1, cfg.batch_size // info.world_size // cfg.acc),
                                    resolve_noise(cfg, pipe), info.device)
        self.model.train()
        return bpd

    def setup_model(self):
        cfg, info = self.cfg, self.info
        torch.manual_seed(self.seed)  # identical initial weights on every rank (FSDP shards local copies)
        txt_dim = self.text_encoder.dim if self.text_encoder else 0
        self.model = recipe.build_model(cfg, cfg.img_size // self.vae.spatial_factor, txt_dim).to(info.device)
        self.resume_kind = self.resume_dir = None
        if cfg.resume_path:
            self.resume_kind, where = T.resolve_resume(cfg.resume_path)
            weights = os.path.join(where, "model.safetensors") if self.resume_kind == "state" else where
            saved = os.path.join(where, "config.yaml")
            fix = (f"A resumed run keeps the model of its {saved}: drop the model flags you changed (channels, "
                   f"layers_per_block, ...); a model of another shape is a new run, without --resume_path"
                   ) if cfg.model_config_path == saved else FIT_HINT
            load_model_weights(self.model, weights, skip=DEPRECATED_KEYS.match, fix=fix)
            self.resume_dir = where
        sharded = T.will_shard(info, cfg.fsdp)
        if cfg.fsdp and not sharded and self.main:
            print("fsdp: 1 with a single process: training the unsharded model")
        self.train_model = T.parallelize(self.model, info, bool(cfg.fsdp), (AttentionBlock,), bf16=self.cuda)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.flow_params = [p for n, p in named if not n.startswith("learnable_self_denoiser")]
        self.denoiser_params = [p for n, p in named if n.startswith("learnable_self_denoiser")]
        # from the loaded weights
        self.ema = T.EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay else None
        self.optimizers = {"model": T.make_optimizer(self.flow_params, cfg.lr, cfg.weight_decay)}
        if self.denoiser_params:
            self.optimizers["denoiser"] = torch.optim.AdamW(self.denoiser_params, lr=cfg.denoiser_lr,
                                                            weight_decay=cfg.weight_decay)
        if self.main:
            n = sum(p.numel() for p in self.flow_params + self.denoiser_params)
            mode = "FSDP2" if sharded else "single process" if info.world_size == 1 else "DDP"
            print(f"model: {n / 1e6:.2f}M trainable parameters ({len(self.denoiser_params)} denoiser tensors); "
                  f"{mode}, world size {info.world_size}, on {info.device}")

    def resume(self):
        if self.resume_kind == "weights":  # bare weights: like the original, start the schedule at resume_epoch
            self.step = self.cfg.resume_epoch * self.steps_per_epoch
            for sched in self.schedules.values():
                sched.load_state_dict({"step_count": self.step})
        if self.resume_kind != "state":
            return
        state = T.load_training_state(self.resume_dir)
        T.restore_optimizers(self.train_model, self.optimizers, state["optimizers"])
        for name, sched in self.schedules.items():
            sched.load_state_dict(state["schedules"][name])
        self.step, self.epoch, self.skipped_steps = state["step"], state["epoch"], state["skipped_steps"]
        self.secondary_pos = list(state.get("secondary_pos", [0, 0]))
        self.skipped_files |= set(state.get("skipped_files", []))
        self.wandb_id = state.get("wandb_id")
        self.data_captions = state.get("data_captions")
        T.set_rng_state(state["rng"])
        average = os.path.join(self.resume_dir, EMA_WEIGHTS)
        if self.ema is not None and os.path.isfile(average):
            self.ema.load(average, self.step - self.skipped_steps)
        elif self.ema is not None and self.main:
            print(f"note: {self.resume_dir} has no {EMA_WEIGHTS} (a run without ema_decay); the moving average "
                  f"starts from the resumed weights")
        if self.main:
            print(f"resumed from {self.resume_dir} at step {self.step} (epoch {self.epoch})")

    # ------------------------------------------------------------------------------------------------- data
    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    @torch.no_grad()
    def encode_pixels(self, pixels, meta):
        """VAE latents of a batch (cached per item when cache_latents); videos arrive as (B, T, 3, H, W)."""
        keys = meta["key"]
        if self.cfg.cache_latents and all(k in self.latent_cache for k in keys):
            return torch.stack([self.latent_cache[k] for k in keys]).to(self.info.device)
        pixels = pixels.to(self.info.device)
        with self.autocast():
            if pixels.dim() == 5:
                latents = self.encode_video(pixels)
            else:
                latents = self.vae.encode(pixels)
        latents = latents.float()
        if self.cfg.cache_latents:
            self.latent_cache.update({k: lat.cpu() for k, lat in zip(keys, latents)})
        return latents

    def encode_video(self, pixels):
        """Plain, last-frame-conditioned or video-to-video encoding (original options), (B,T,3,H,W) in."""
        cfg, vae = self.cfg, self.vae
        if cfg.last_frame_cond:
            last = vae.encode(pixels[:, -4])[:, None]
            return torch.cat([last, vae.encode(pixels[:, :-4].transpose(1, 2))], 1)
        if cfg.video_to_video:
            half = pixels.shape[1] // 2
            target, source = pixels[:, :half], pixels[:, half:]
            both = vae.encode(torch.cat([source, target]).transpose(1, 2))
            return torch.cat(both.chunk(2), 1)
        return vae.encode(pixels.transpose(1, 2))

    @torch.no_grad()
    def encode_text(self, captions, meta, gen):
        """Label drop (one global draw per sample: the null prompt), prompt decoration, frozen encoder."""
        cfg = self.cfg
        keep = rank_slice(torch.rand, (len(captions),), self.info, gen) >= cfg.drop_label
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        if self.text_encoder is None:
            return None
        texts = [recipe.decorate_prompt(cfg, caption, meta["fps"][i], meta["aspect"][i])
                 for i, caption in enumerate(captions)]
        if not cfg.cache_text:
            self.warn_cut_off(texts)
            with self.autocast():
                return self.text_encoder.encode(texts).float()
        new = sorted(set(t for t in texts if t not in self.text_cache))
        if new:
            self.warn_cut_off(new)
            with self.autocast():
                self.text_cache.update(zip(new, self.text_encoder.encode(new).float()))
        return torch.stack([self.text_cache[t] for t in texts])

    def warn_cut_off(self, texts):
        """Once per run, on rank 0: the first caption longer than the text encoder reads, and what it loses."""
        if not self.captions_unchecked:
            return
        cut = next(((text, rest) for text, rest in zip(texts, self.text_encoder.cut_off(texts)) if rest), None)
        if cut:
            self.captions_unchecked = False
            warnings.warn(InputWarning(cut_off_message(self.cfg.txt_size, *cut) + " (said once for all captions)"))

    def batches(self):
        """(epoch, micro-batch) pairs from the resume position onward; secondary batches mixed in by a seeded draw."""
        while self.epoch < self.cfg.epochs:
            start = (self.step - self.epoch * self.steps_per_epoch) * self.cfg.acc
            for n, batch in enumerate(self.data.epoch(self.epoch, max(0, start))):
                if start + n >= self.steps_per_epoch * self.cfg.acc:
                    break
                yield batch
            self.epoch += 1
            yield None  # epoch boundary

    def secondary_batch(self):
        while True:
            epoch, start = self.secondary_pos
            for batch in self.secondary.epoch(epoch, start):
                self.secondary_pos[1] += 1
                return batch
            self.secondary_pos = [epoch + 1, 0]

    # ------------------------------------------------------------------------------------------------ steps
    def micro_step(self, batch, index, sync):
        """Forward/backward of one micro-batch; returns its loss terms (flow and denoiser)."""
        cfg, info = self.cfg, self.info
        gen = step_generator(self.seed, index)
        if self.secondary is not None and torch.rand((), generator=gen) < cfg.secondary_ratio:
            batch = self.secondary_batch()
        pixels, captions, meta = batch
        self.skipped_files.update(meta["skipped"])
        x0 = self.encode_pixels(pixels, meta)
        if x0.dim() == 5 and cfg.drop_image > 0 and torch.rand((), generator=gen) < cfg.drop_image:
            x0, captions = x0[:, 1:], ["(extend) " + c for c in captions]
        if cfg.last_frame_cond:
            captions = ["(last) " + c for c in captions]
        if cfg.video_to_video:
            captions = ["(v2v) " + c for c in captions]
        eps = recipe.unit_noise(cfg.noise_type, x0.shape, lambda fn, shape: rank_slice(fn, shape, info, gen))
        score_target = bool(self.denoiser_params) and cfg.denoiser_target == "score"  # needs grad_x NLL
        x = recipe.noise_augment(x0, cfg.noise_std, eps.to(x0.device)).requires_grad_(score_target)
        y = self.encode_text(captions, meta, gen)
        with T.no_grad_sync(self.train_model, sync):
            with self.autocast():
                z, outputs, logdets = self.train_model(x, y)
                losses = recipe.flow_loss(self.model, z, logdets, outputs, cfg)
            target = recipe.denoiser_target(cfg.denoiser_target, x, x0, cfg.noise_std, z, logdets) \
                if self.denoiser_params else None
            (losses["loss"] / cfg.acc).backward()
            if target is not None:
                with self.autocast():
                    pred = self.train_model(x.detach(), y, mode="denoise")
                    losses["loss_denoiser"] = recipe.denoiser_loss(pred, target)
                (losses["loss_denoiser"] / cfg.acc).backward()
        return {k: v.detach().float() for k, v in losses.items()}

    def optimizer_step(self, micro_batches, first_index):
        """acc micro-batches, then clip, skip-or-step, schedule; returns averaged metrics."""
        cfg = self.cfg
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        totals = {}
        for k, batch in enumerate(micro_batches):
            for name, value in self.micro_step(batch, first_index + k, sync=k == len(micro_batches) - 1).items():
                totals[name] = totals.get(name, 0.0) + value / len(micro_batches)
        norms = {"grad_norm": T.grad_norm_and_clip(self.flow_params, cfg.grad_clip)}
        if self.denoiser_params:
            norms["grad_norm_denoiser"] = T.grad_norm_and_clip(self.denoiser_params, cfg.grad_clip)
        skip = T.should_skip(list(norms.values()), cfg.grad_clip, cfg.grad_skip, self.step, cfg.grad_skip_after)
        if skip:
            self.skipped_steps += 1
        else:
            for opt in self.optimizers.values():
                opt.step()
            if self.ema is not None:
                self.ema.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        lr = self.schedules["model"].lr
        for sched in self.schedules.values():
            sched.step()
        self.step += 1
        metrics = {k: float(all_reduce_mean(v)) for k, v in totals.items()}
        return dict(metrics, **norms, lr=lr, skipped=int(skip))

    # ---------------------------------------------------------------------------------------------- outputs
    def save(self):
        extra = {"epoch": self.epoch, "skipped_steps": self.skipped_steps, "secondary_pos": self.secondary_pos,
                 "skipped_files": sorted(self.skipped_files), "wandb_id": self.wandb_id,
                 "data_captions": self.data_captions,
                 "schedules": {k: s.state_dict() for k, s in self.schedules.items()}}
        path = T.save_checkpoint(self.run_dir, self.step, self.train_model, self.optimizers, self.cfg, extra,
                                 self.main, self.ema)
        barrier()
        self.saved_step, self.saved_path = self.step, path
        return path

    @torch.no_grad()
    def sample(self, tag):
        """A grid of samples from the current weights, and with a moving average one from it too (<tag>_ema); every
        rank takes part: the model may be sharded. Returns the paths (main rank)."""
        cfg = self.cfg
        captions = self.sample_captions or self.data_captions
        if not captions:  # a checkpoint from before data_captions were saved, resumed at an epoch end
            if self.main:
                tqdm.write(f"no sample grid {tag}: no captions seen since the resume (--sample_captions gives some)")
            return []
        captions = [captions[i % len(captions)] for i in range(cfg.train_samples)]
        paths = [self.sample_grid(captions, tag)]
        if self.ema is not None:
            with self.ema.swapped_in():
                paths.append(self.sample_grid(captions, f"{tag}_ema"))
        if not self.main:
            return []
        write_text(os.path.join(self.run_dir, "samples", f"{tag}.txt"), "\n".join(captions) + "\n")
        return paths

    def sample_grid(self, captions, name):
        """samples/<name>.png (and .mp4 of a video model) of the captions, one sample each, seeded by the run."""
        self.model.eval()
        pipe = STARFlowPipeline(self.model, self.text_encoder, self.vae, self.cfg, self.info.device, torch.float32)
        with self.autocast():
            out = pipe(captions, num_samples=1, cfg=guidance_scale(self.cfg),
                       generator=torch.Generator().manual_seed(self.seed))
        self.model.train()
        if not self.main:
            return None
        path = os.path.join(self.run_dir, "samples", f"{name}.png")
        if out.frames is not None:  # PNG: one row of frames per video; MP4: the videos tiled
            clips = [np.stack([np.asarray(f) for f in clip]) for clip in out.frames]
            grid, _ = make_grid([np.concatenate(list(clip), axis=1) for clip in clips], tall=True)
            write_video(path[:-4] + ".mp4", make_grid(clips)[0], max(1, round(out.fps or 8)))
        else:
            grid, _ = make_grid([np.asarray(im) for im in out.images])
        write_png(path, grid)
        return path


def setup_wandb(run, enabled):
    """wandb on rank 0: online with an API key, otherwise offline into the run folder; None when disabled."""
    if not (enabled and run.main):
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    make_dir(run.run_dir, "run folder")
    wb = wandb.init(project="starflow", name=job_name(run.cfg), config=run.cfg.to_dict(), dir=run.run_dir, mode=mode,
                    id=run.wandb_id, resume="allow")
    run.wandb_id = wb.id
    return wb


class TrainLoop:
    """The loop around a Run: accumulation, progress bar, metrics file and wandb, samples and checkpoints at their
    intervals, and the final save."""

    def __init__(self, run):
        self.run, cfg = run, run.cfg
        if run.main:
            make_dir(run.run_dir, "run folder")
            save_config(cfg, os.path.join(run.run_dir, "config.yaml"))
        self.wb = setup_wandb(run, cfg.wandb and not cfg.dry_run)
        self.metrics = T.open_metrics(os.path.join(run.run_dir, "metrics.jsonl"), run.step) \
            if run.main and not cfg.dry_run else None
        total = cfg.epochs * run.steps_per_epoch
        stop_at = min(total, cfg.max_steps) if cfg.max_steps else total
        self.bar = tqdm(total=stop_at, initial=run.step, disable=not run.main, dynamic_ncols=True, desc="train")
        self.tick, self.stopped_by = time.time(), 0
        self.micro_index = run.step * cfg.acc
        self.reported = set()
        self.report_skipped_files()  # those the folder scan dropped, before the first step

    def __call__(self):
        run, pending = self.run, []
        run.model.train()
        with T.StopSignals(announce=run.main) as self.stop:
            for batch in run.batches():
                if batch is None:  # epoch end
                    pending = []
                    self.end_epoch()
                    continue
                pending.append(batch)
                run.data_captions = run.data_captions or batch[1]
                if len(pending) < run.cfg.acc:
                    continue
                metrics = run.optimizer_step(pending, self.micro_index)
                self.micro_index += len(pending)
                pending = []
                if self.after_step(metrics):
                    break
            self.finish()
        if self.stopped_by:
            T.exit_stopped(self.stopped_by, run.step, f"python train.py --resume_path {run.run_dir}", run.main)

    def report_skipped_files(self):
        """Name the unreadable files not named yet (the first five of them)."""
        new = sorted(self.run.skipped_files - self.reported)
        if new and self.run.main:
            more = f" and {len(new) - 5} more" if len(new) > 5 else ""
            tqdm.write(f"skipped {len(new)} unreadable file(s): {', '.join(new[:5])}{more}")
        self.reported.update(new)

    def after_step(self, m):
        """Log one optimizer step, then sample / stop / checkpoint as configured; True ends training."""
        run, cfg = self.run, self.run.cfg
        now = time.time()
        m.update(step=run.step, epoch=run.epoch, samples_per_s=cfg.batch_size / max(now - self.tick, 1e-9))
        if cfg.val_every and run.step % cfg.val_every == 0 and not cfg.dry_run:
            m["val_bpd"] = run.validate()
        self.tick = time.time()  # the held-out pass is not training time
        if self.metrics:
            self.metrics.write(json.dumps(m) + "\n")
            self.metrics.flush()
        self.bar.update(1)
        if run.step % cfg.log_every == 0 or run.step == 1:
            shown = dict(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", img_s=f"{m['samples_per_s']:.1f}")
            self.bar.set_postfix(shown, **({"val_bpd": f"{m['val_bpd']:.4f}"} if "val_bpd" in m else {}))
            if self.wb:
                self.wb.log(m, step=run.step)
        self.report_skipped_files()
        if cfg.dry_run:
            paths = run.sample("dry_run")
            if run.main:
                print(f"dry run: one step (loss {m['loss']:.4f}), sample grid {', '.join(paths) or 'none'}")
            return True
        if cfg.sample_every and run.step % cfg.sample_every == 0:
            self.log_sample(f"step_{run.step:07d}")
        if cfg.max_steps and run.step >= cfg.max_steps:
            return True
        self.stopped_by = self.stop.requested(run.info.device)  # by every rank at every step: a collective
        if self.stopped_by:
            return True
        if cfg.ckpt_every and run.step % cfg.ckpt_every == 0:
            run.save()
        return False

    def end_epoch(self):
        """Sample and checkpoint after an epoch (run.epoch already counts the finished one)."""
        run, cfg = self.run, self.run.cfg
        done = run.epoch - 1
        if cfg.sample_freq and done % cfg.sample_freq == 0:
            self.log_sample(f"epoch_{run.epoch:04d}")
        path = run.save()
        if run.main and cfg.save_every and done % cfg.save_every == 0:
            copies = {"model": "model.safetensors", **({"ema": EMA_WEIGHTS} if run.ema is not None else {})}
            for kind, name in copies.items():
                save_weights_copy(os.path.join(path, name),
                                  os.path.join(run.run_dir, f"{kind}_epoch{run.epoch:04d}.safetensors"))

    def log_sample(self, tag):
        for path in self.run.sample(tag):
            tqdm.write(f"sample grid: {path}")
            if self.wb:
                import wandb
                key = "train_samples_ema" if path.endswith("_ema.png") else "train_samples"
                self.wb.log({key: wandb.Image(path)}, step=self.run.step)

    def finish(self):
        run = self.run
        self.bar.close()
        if not run.cfg.dry_run:
            path = run.save() if run.saved_step != run.step else run.saved_path
            if run.main:
                average = f" and {EMA_WEIGHTS}" if run.ema is not None else ""
                print(f"saved {path}/model.safetensors{average} (step {run.step})")
        report_skips(run)
        if self.wb:
            self.wb.finish()
        if self.metrics:
            self.metrics.close()


def train(cfg, info):
    run = Run(cfg, info)
    TrainLoop(run)()
    return run


def save_weights_copy(weights, dest):
    """Keep a numbered copy of a checkpoint's weights file (copied to a temp name, then renamed)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(weights, tmp)


def report_skips(run):
    files = run.skipped_files
    if run.info.world_size > 1:
        gathered = [None] * run.info.world_size
        torch.distributed.all_gather_object(gathered, sorted(files))
        files = set().union(*gathered)
    if run.main:
        files, steps = len(files), run.skipped_steps  # every rank skips the same steps
        print(f"skipped {files} unreadable file{'s' if files != 1 else ''}, {steps} optimizer step"
              f"{'s' if steps != 1 else ''} with a non-finite or too large gradient")


def check_batch(cfg, world_size):
    """The global batch must split evenly over ranks and accumulation steps (checked before any process group)."""
    micro = world_size * cfg.acc
    if cfg.batch_size % micro:
        raise UserError(f"batch_size {cfg.batch_size} is not divisible by world_size x acc = {world_size} x {cfg.acc}; "
                        f"choose a multiple of {micro}")


def run(argv):
    cfg = parse_config(argv)
    check_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    train(cfg, init_distributed(cfg.device))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print_help(__doc__, "Config keys (in a --model_config_path YAML, or as --key value, which wins)", SCHEMA)
        return 0
    run_cli(run, argv, cleanup=cleanup)


if __name__ == "__main__":
    main()
