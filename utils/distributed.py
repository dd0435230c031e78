"""Process setup that works under plain `python` (one process) and `torchrun` (gloo on CPU, nccl on CUDA)."""
import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name="auto", local_rank=0):
    """'auto' -> cuda:local_rank, else mps, else cpu; an explicit name is used as given, once this machine is
    known to have it (UserError otherwise)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name and name != "auto":
        try:
            device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        except (RuntimeError, TypeError):
            raise UserError(f"device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
                raise UserError(f"device '{name}': this machine has no usable CUDA GPU (torch {torch.__version__} "
                                f"built {build}); use --device auto or cpu")
            if (device.index or 0) >= count:
                raise UserError(f"device '{name}' (cuda:{device.index or 0}) does not exist: this machine has "
                                f"{count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        elif device.type == "mps" and not _mps_available():
            raise UserError(f"device '{name}': Apple MPS is not available here; use --device auto or cpu")
        elif device.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"device '{name}' is not supported; use auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def retain_freed_memory():
    """Keeps freed host memory in the process, as PyTorch's CUDA allocator keeps GPU memory. By default glibc maps
    every block above a threshold (128 KB, rising to at most 32 MB) afresh and hands the free top of its heap back to
    the OS, so a CPU run page-faults its large temporaries in again at every step: 8000 faults a demo score step
    (about a sixth of its time), 3 million per 100 images through Inception. Returns whether it applied (glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # the mmap threshold first: setting either threshold stops glibc adjusting both, and a trim threshold alone
    # would leave every block above 128 KB mapped afresh; builds that refuse 1 GB take glibc's own 32 MB maximum
    if not (mallopt(M_MMAP_THRESHOLD, 2 ** 30) or mallopt(M_MMAP_THRESHOLD, 2 ** 25)):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def init_distributed(device="auto"):
    """Join the torchrun process group if launched by torchrun; otherwise rank 0 of a world of 1. The process keeps
    the host memory it frees (retain_freed_memory)."""
    retain_freed_memory()
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


def broadcast_object(obj):
    """Rank 0's `obj` (picklable) on every rank; itself without a process group."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value, device):
    """The largest of an int, or of each int of a list (one all-reduce), over ranks (the value itself without a
    process group)."""
    if not is_dist():
        return value
    tensor = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist() if isinstance(value, list) else int(tensor.item())


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
