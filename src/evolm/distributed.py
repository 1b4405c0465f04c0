"""torch.distributed glue: each process evaluates a share of the population; only fitnesses travel."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size), starting a process group when launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device_name(requested: str) -> str:
    """Under torchrun each process takes its own GPU."""
    if requested in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return requested


def member_share(population: int, rank: int, size: int) -> list[int]:
    """A contiguous block of members for this process; blocks differ in size by at most one."""
    return list(range(rank * population // size, (rank + 1) * population // size))


def gather_fitness(local: dict[int, float], population: int, device: torch.device) -> torch.Tensor:
    """The full fitness vector on every process, from each process's {member: fitness}."""
    full = torch.zeros(population, dtype=torch.float64, device=device)
    for member, value in local.items():
        full[member] = value
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)  # each member is filled by exactly one process
    return full.cpu()



def main_value(value: float, device: torch.device) -> float:
    """The first process's `value` on every process: what they must decide alike (each clock differs a little)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    shared = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(shared, src=0)
    return float(shared.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
