"""Training machinery: parallel wrapping (FSDP2 / DDP), AdamW + warmup-cosine schedule, gradient clip/skip,
and atomic, exactly-resumable training-state checkpoints."""
import contextlib
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import uuid

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from utils.checkpoint import EMA_WEIGHTS, load_state_dict_file, save_weights, torch_load
from utils.config import given_keys, load_config, save_config
from utils.distributed import max_over_ranks
from utils.errors import UserError, disk_error
from utils.files import make_dir, write_text

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------------------ parallelism
def parallelize(model, info, fsdp, layer_types, bf16):
    """FSDP2: fully_shard each layer of `layer_types`, then the root; otherwise DDP, or the model itself.

    A single process shards only inside a process group it joined (FSDP2 on one GPU, as bench/gpu_check.py runs
    it). Returns the module to call for training; parameters and state dicts are read from it directly.
    """
    if not will_shard(info, fsdp) and info.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for module in model.modules():
            if isinstance(module, layer_types):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        model.register_forward_hook(copy_view_outputs, prepend=True)  # before FSDP2's own hook on the outputs
        return model
    from torch.nn.parallel import DistributedDataParallel

    # The self-denoiser and the flow are trained by separate backward passes; each leaves the other's params unused.
    unused = getattr(model, "learnable_self_denoiser", None) is not None
    return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def copy_view_outputs(module, args, output):
    """The root's outputs with every view that needs a gradient copied. FSDP2 hooks these tensors for backward and
    warns of each view among them (an in-place op on one would drop its hook): the flow returns its steps' outputs
    as reshaped views of its token tensors, a few MB a batch."""
    if isinstance(output, (list, tuple)):
        return type(output)(copy_view_outputs(module, args, o) for o in output)
    if isinstance(output, torch.Tensor) and output.requires_grad and output._base is not None:
        return output.clone()
    return output


def will_shard(info, fsdp):
    """Whether parallelize applies FSDP2: asked for, and several ranks or a joined process group."""
    return bool(fsdp) and (info.world_size > 1 or dist.is_initialized())


def shard_frozen(module, info):
    """FSDP2-shard a frozen module (the text encoder) so each rank holds only a slice of its weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=init_device_mesh(info.device.type, (info.world_size,)))
    return module


def no_grad_sync(module, sync):
    """Enable/disable gradient reduction for accumulation micro-steps (FSDP2 or DDP); returns a context."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if hasattr(module, "no_sync") and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------- optimizer and schedule
def make_optimizer(params, lr, weight_decay, betas=(0.9, 0.95)):
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def warmup_steps(configured, steps_per_epoch, total_steps):
    """The warmup_steps key: as given, or by default one epoch but at most 10% of the scheduled steps."""
    return configured if configured is not None else min(steps_per_epoch, total_steps // 10)


class WarmupCosine:
    """Linear warmup from min(min_lr, 1e-6) to max_lr, then cosine decay to min_lr at total_steps.

    The LR is a pure function of the step, so resuming only needs the step counter.
    """

    def __init__(self, optimizer, warmup_steps, total_steps, max_lr, min_lr):
        self.optimizer, self.warmup, self.total = optimizer, max(0, warmup_steps), max(1, total_steps)
        self.max_lr, self.min_lr, self.start_lr = max_lr, min_lr, min(min_lr, 1e-6)
        self.step_count = 0
        self._apply()

    def lr_at(self, step):
        if step < self.warmup:
            return self.start_lr + (self.max_lr - self.start_lr) * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    def step(self):
        self.step_count += 1
        self._apply()

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self):
        return {"step_count": self.step_count}

    def load_state_dict(self, state):
        self.step_count = int(state["step_count"])
        self._apply()


def grad_norm_and_clip(params, clip):
    """Total gradient norm over params (global under FSDP); clips to `clip` when clip > 0."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def should_skip(norms, grad_clip, grad_skip, step, skip_after=100):
    """A step is skipped when a gradient norm is non-finite, or (grad_skip, from step skip_after) above grad_clip."""
    if not all(math.isfinite(n) for n in norms):
        return True
    return bool(grad_skip and grad_clip > 0 and step >= skip_after and max(norms) > grad_clip)


class EMA:
    """An exponential moving average of a model's parameters, as DiT keeps one: average = decay * average +
    (1 - decay) * parameter after every optimizer step. Kept in float32, sharded like the parameters under FSDP2.
    With `warmup` the decay of the n-th update (from 0) is min(decay, (1 + n) / (10 + n)), TensorFlow's num_updates
    rule: early averages follow the weights instead of holding on to their initial values."""

    def __init__(self, model, decay, warmup=False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().float().clone() for p in self.params]

    def current_decay(self):
        """The decay the next update applies."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.averages, [p.detach().float() for p in self.params], 1 - self.current_decay())
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """The model's parameters replaced by their averages inside the block (to sample them), restored after."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, average in zip(self.params, self.averages):  # one by one: DTensor has no _foreach_copy_
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, weights in zip(self.params, trained):
                    p.copy_(weights)

    def full_state(self, model_state, is_main):
        """model_state (the full state dict, on the main rank) with each parameter replaced by its average; a
        collective under FSDP, so every rank calls it."""
        state = dict(model_state) if is_main else None
        for name, average in zip(self.names, self.averages):
            full = average.full_tensor() if isinstance(average, DTensor) else average
            if is_main:
                state[name] = full.to("cpu", model_state[name].dtype)
        return state

    @torch.no_grad()
    def load(self, path, updates):
        """The averages from an ema.safetensors (every rank reads the file and keeps its own shard), and the count
        of updates behind them (the file's, else `updates`: files from before the count was kept)."""
        state = load_state_dict_file(path, "moving average")
        with safe_open(path, "pt") as f:
            self.updates = int((f.metadata() or {}).get("ema_updates", updates))
        missing = [n for n in self.names if n not in state]
        if missing:
            raise UserError(f"{path} lacks the average of {len(missing)} parameters ({', '.join(missing[:3])}, ...): "
                            f"it is not this model's; remove it to start the average from the resumed weights")
        for name, average in zip(self.names, self.averages):
            full = state[name].float()
            if isinstance(average, DTensor):
                full = distribute_tensor(full.to(average.device), average.device_mesh, average.placements,
                                         src_data_rank=None)
            average.copy_(full)


# ------------------------------------------------------------------------------------------- checkpoints
def full_model_state(model):
    """Full (unsharded) model state dict on CPU; a collective under FSDP, so every rank must call it."""
    return get_model_state_dict(model, options=FULL)


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np.random.get_state()[0], np.random.get_state()[1].tolist(), *np.random.get_state()[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir, step, model, optimizers, cfg, extra, is_main, ema=None):
    """Write checkpoints/step_NNNNNNN/{model.safetensors, ema.safetensors (with an EMA), training_state.pt,
    config.yaml}, then point checkpoints/latest at it with an atomic rename; older step folders are removed
    afterwards.

    Collective under FSDP (full state dicts are gathered), so every rank calls it.
    """
    model_state = full_model_state(model)
    ema_state = ema.full_state(model_state, is_main) if ema is not None else None
    optim_states = {name: get_optimizer_state_dict(model, opt, options=FULL) for name, opt in optimizers.items()}
    if not is_main:
        return None
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:07d}")
    tmp = f"{final}.{uuid.uuid4().hex[:12]}.tmp"  # unique: a second writer never shares it
    make_dir(tmp, "checkpoint folder")
    try:
        save_weights(model_state, os.path.join(tmp, "model.safetensors"), metadata={"step": str(step)})
        if ema_state is not None:
            save_weights(ema_state, os.path.join(tmp, EMA_WEIGHTS), metadata={
                "step": str(step), "ema_decay": str(ema.decay), "ema_updates": str(ema.updates)})
        with open(os.path.join(tmp, "training_state.pt"), "wb") as f:  # a file object keeps the OSError's errno
            torch.save({"step": step, "optimizers": optim_states, "rng": rng_state(), **extra}, f)
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = os.path.join(root, f"latest.{uuid.uuid4().hex[:12]}.tmp")
        os.symlink(os.path.basename(final), link)
        os.replace(link, os.path.join(root, "latest"))
    except BaseException as e:  # the previous checkpoint and `latest` stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        found = e if isinstance(e, UserError) else disk_error(e, tmp) if isinstance(e, Exception) else None
        if found is None:
            raise
        raise UserError(f"checkpoint of step {step} not written ({found}); checkpoints/latest still points at the "
                        f"previous one") from None
    for name in os.listdir(root):
        if name.startswith(("step_", "latest.")) and name != os.path.basename(final):
            path = os.path.join(root, name)
            os.remove(path) if os.path.islink(path) else shutil.rmtree(path, ignore_errors=True)
    return final


def open_metrics(path, step):
    """metrics.jsonl for appending, without the lines of steps after `step` (redone after an interruption) and
    without a line that a kill cut short, so every step appears once."""
    kept = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            kept = [line for line in f if _logged_step(line) is not None and _logged_step(line) <= step]
    write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
    return open(path, "a", encoding="utf-8")


def _logged_step(line):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def resolve_resume(path):
    """('state', folder) for a training-state checkpoint (a run folder, checkpoints/, latest or step_N folder),
    or ('weights', file) for bare model weights (.pth / .safetensors)."""
    path = os.path.expanduser(str(path))
    for root in (path, os.path.join(path, "checkpoints")):
        steps = sorted(glob.glob(os.path.join(root, "step_[0-9]*[0-9]")), reverse=True)
        # `latest` first; without it (a kill between renames) the newest step folder, complete by construction
        for candidate in [root, os.path.join(root, "latest"), *steps]:
            if os.path.isfile(os.path.join(candidate, "training_state.pt")):
                return "state", os.path.realpath(candidate)
    if os.path.isfile(path):
        return "weights", path
    raise UserError(f"--resume_path {path} is neither a training checkpoint (a folder with training_state.pt, "
                    "or a run folder holding checkpoints/latest) nor a weights file")


def check_run_folder_free(run_dir, resume_path, entry="train.py"):
    """A new run may not start in a run folder that holds another's checkpoints (it would replace them, and cut
    its metrics.jsonl back); resuming that run, from any of its checkpoints, may."""
    try:
        kind, held = resolve_resume(run_dir)
    except UserError:
        return  # no checkpoint there
    if resume_path:
        kind, where = resolve_resume(resume_path)
        if kind == "state" and where.startswith(os.path.realpath(run_dir) + os.sep):
            return
    raise UserError(f"run folder {run_dir} already holds a run (checkpoint {held}); continue it with python "
                    f"{entry} --resume_path {run_dir}, or start a new run in another folder (--wandb_name NAME or "
                    f"--logdir DIR)")


def resume_config(resume_path, argv, extra_keys=None, run_depth=1):
    """Config of a run being resumed: its saved config.yaml, updated by the command line. Unless --logdir is given,
    its logdir is the folder that holds the run folder now (run_depth levels up: <logdir>[/vae]/<run>), so a run
    that was moved or copied goes on where it is, not where it was made."""
    kind, where = resolve_resume(resume_path)
    if kind != "state":
        return None
    cfg = load_config(os.path.join(where, "config.yaml"), argv, extra_keys=extra_keys)
    if "logdir" not in given_keys(argv):
        logdir = os.path.dirname(os.path.dirname(where))  # the run folder of <run>/checkpoints/step_N
        for _ in range(run_depth):
            logdir = os.path.dirname(logdir)
        cfg.logdir = logdir
    return cfg


def load_training_state(folder):
    """The training state of a checkpoint folder, read weights-only (never unpickling code)."""
    try:
        return torch_load(os.path.join(folder, "training_state.pt"), "training state")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {folder}/training_state.pt ({type(e).__name__}); the checkpoint is damaged, "
                        "resume from an earlier one or from the weights only") from None


def restore_optimizers(model, optimizers, states):
    for name, opt in optimizers.items():
        set_optimizer_state_dict(model, opt, states[name], options=StateDictOptions(full_state_dict=True))


def broadcast_int(value, device):
    """Rank 0's integer on every rank (e.g. a clock-derived seed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CAN_BLOCK_SIGNALS = hasattr(signal, "pthread_sigmask")  # POSIX; not on Windows


def leave_stop_signals(worker_id):
    """DataLoader workers ignore SIGINT and SIGTERM, which a terminal or a cluster sends to every process of a job:
    the training process checkpoints first, then shuts them down (a worker killed first would end it). They start
    with the two blocked (start_workers), so one that comes before this runs is dropped here, not fatal."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    if CAN_BLOCK_SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader):
    """iter(loader), its worker processes started with SIGINT and SIGTERM blocked (held for this process until
    they are up)."""
    if not CAN_BLOCK_SIGNALS:
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


class StopSignals:
    """`with StopSignals(announce) as stop:` turns SIGINT and SIGTERM (Ctrl-C, a cluster's preemption notice) into
    a request that the loop checks after each step, `stop.requested(device)`, to save a checkpoint and exit. A
    second Ctrl-C acts as before (it stops at once); a second SIGTERM does not, since a cluster sends one to every
    process and torchrun passes its own on (a cluster's SIGKILL ends the grace period anyway)."""

    def __init__(self, announce=True):
        self.announce, self.received, self.previous = announce, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {s: signal.signal(s, self._catch) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _catch(self, signum, frame):
        if self.received == signum:  # the same request again
            return
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self.previous[signum])
        if self.announce:
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint to resume "
                  f"from{again}", file=sys.stderr, flush=True)

    def requested(self, device):
        """The signal any rank received (0: none), the same on every rank, so that all stop at the same step."""
        return max_over_ranks(self.received, device)


def exit_stopped(signum, step, resume, main=True):
    """After the checkpoint of a run stopped by a signal: say (on rank 0) how to resume it, and exit with the
    status the signal would have given."""
    if main:
        print(f"stopped by {signal.Signals(signum).name} at step {step}; resume it exactly with: {resume}",
              file=sys.stderr)
    sys.exit(128 + signum)
