"""Process-group setup that works under plain `python` (one process) and `torchrun` (gloo on CPU, nccl on CUDA)."""
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def pick_device(name="auto", local_rank=0):
    """'auto' -> cuda:local_rank, else mps, else cpu; an explicit name is used as given."""
    if name and name != "auto":
        if name == "cuda":
            return torch.device("cuda", local_rank)
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init_distributed(device="auto"):
    """Join the torchrun process group if launched by torchrun; otherwise rank 0 of a world of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_mean(tensor):
    """Average a tensor over ranks in place (identity without a process group)."""
    if is_dist():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def all_gather_arrays(array):
    """Every rank's numpy array, in rank order, on every rank ([array] without a process group)."""
    if not is_dist():
        return [array]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, array)
    return parts


def gather_interleaved(array):
    """All ranks' rows in item order, when rank r holds items r, r + W, r + 2W, ... of a numpy array (every rank
    gets the whole; the identity without a process group)."""
    parts = all_gather_arrays(array)
    if len(parts) == 1:
        return array
    out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype)  # rank 0 has most
    for r, part in enumerate(parts):
        if len(part):
            out[r::len(parts)] = part
    return out
