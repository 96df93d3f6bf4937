"""Data-parallel runs: the torch.distributed process group torchrun / accelerate launch describe, and
the all-reduce that makes every rank hold the same summed chunks."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ..core.methods import ChunkSums
from ..core.models import resolve_device


def process_group():
    """torch.distributed when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextlib.contextmanager
def distributed(device=None):
    """Within the block, the process group torchrun / accelerate launch describe in the environment
    (joined when WORLD_SIZE > 1 and not yet joined: nccl on CUDA, gloo otherwise); yields
    (rank, world_size, this rank's device) and leaves the group afterwards if it joined it."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    joined = world > 1 and dist.is_available() and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    group = process_group()
    try:
        yield (group.get_rank(), group.get_world_size(), dev) if group is not None else (0, 1, dev)
    except BaseException:
        if joined:  # no barrier: the other ranks may be inside another collective
            dist.destroy_process_group()
        raise
    if joined:
        dist.barrier()  # no rank tears the group down while another still talks on it
        dist.destroy_process_group()


def all_reduce(dist, total: ChunkSums, rows: dict[int, dict], computed: list[int], device):
    """Every rank's sums added (one all-reduce of a flat float64 vector); ranks without chunks take
    the shapes from the others; per-prompt rows (by chunk) and the chunks computed are gathered.
    Returns (total, rows, computed) as every rank now holds them."""
    world = dist.get_world_size()
    schemas = [None] * world
    local = ({k: list(v.shape) for k, v in sorted(total.sums.items())}, total.meta) if total.count else None
    dist.all_gather_object(schemas, (local, rows, computed))
    shapes, meta = next((s[0] for s in schemas if s[0] is not None), ({}, {}))
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([(total.sums[k].double().reshape(-1) if k in total.sums else torch.zeros(math.prod(shape),
                       dtype=torch.float64)).to(comm) for k, shape in shapes.items()]
                     + [torch.tensor([float(total.count)], dtype=torch.float64, device=comm)])
    dist.all_reduce(flat)
    flat = flat.cpu()
    sums, at = {}, 0
    for k, shape in shapes.items():
        size = math.prod(shape)
        sums[k] = flat[at: at + size].reshape(shape)
        at += size
    all_rows = {i: r for _, rs, _ in schemas for i, r in rs.items()}
    return (ChunkSums(sums, round(float(flat[-1])), meta), all_rows,
            sorted(i for *_, c in schemas for i in c))
