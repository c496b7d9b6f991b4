"""torchrun details of the trainer: starting and leaving the process group, wrapping the model in
DistributedDataParallel, and what the processes agree on (a flag any raised, the gathered prediction rows)."""

import atexit
import gc
import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

# B and A (buffers) are the same on every process by construction: DDP need not broadcast them before each forward.
# forward_sync_buffers=False replaces broadcast_buffers=False where torch has it (it still syncs them once, at
# construction: harmless); older torch releases that requirements.txt admits have only broadcast_buffers.
NO_BUFFER_SYNC_PER_FORWARD = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group; returns this process's device (on CUDA without an index, GPU LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    # gloo too on GPU: the estimate's sample count and CPU accumulators are CPU tensors
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    atexit.register(leave)  # also when the run stops early, with sys.exit
    return device


def leave() -> None:
    """Destroy torch.distributed's process group, after freeing what may still hold its collective work (the DDP
    wrapper keeps its last all-reduce, and a reference cycle can keep an object alive until a collection): a work
    object or gloo thread destroyed during interpreter shutdown instead aborts the process with "terminate called
    without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def finish() -> None:
    """Once every process is done, leave the process group cleanly."""
    dist.barrier()
    leave()


def wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The model under DDP: gradients all-reduced in backward, buffers not re-broadcast before each forward."""
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **NO_BUFFER_SYNC_PER_FORWARD)


def largest(value: int) -> int:
    """The largest of every process's value (the value itself without torchrun): a flag that one process raised,
    known to all. A CPU tensor, so on GPU it goes through gloo and costs no device sync."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    agreed = torch.tensor(int(value))
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed)


def gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """Every process's rows (each with an "index"), on every process, in the order of their indices."""
    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])
