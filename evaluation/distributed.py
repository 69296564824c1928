"""Sharing evaluation work over torch.distributed processes (pure torch; (0, 1) without a process group).

The samples of a metric are cut into chunks; process r of W takes the chunks r, r + W, r + 2W, ...
(`evaluation.sampling.generate_batches`), so W processes together generate exactly the samples of one
process with the same chunk size. These helpers say which share is this process's and combine results.
"""

import torch
import torch.distributed as dist


def process_share() -> tuple[int, int]:
    """(rank, world size) of this process in the default torch.distributed group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_chunk_size(num: int, batch_size: int, world_size: int) -> int:
    """`batch_size`, or less so that `num` (>= world_size) samples make >= world_size chunks (one per process)."""
    return max(1, min(batch_size, num // world_size))


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if `flag` is True in every process (a collective: every process must call it)."""
    if process_share()[1] == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all processes (a collective); `value` itself without torch.distributed."""
    if process_share()[1] == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
