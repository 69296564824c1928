# Shapes: b batch, n tokens, h/w token grid, H/W image size, M samples.
"""Batched, seeded sampling for evaluation: the one loop every metric and figure draws its samples with.

`sample_images` is the one way a network and its tokenizer turn labels into images (the training module's
callbacks and the sampling job both call it). The loops rely on the AR module's sampling interface (duck-typed,
no Lightning needed):
`module.generate(labels (b,), generator=None, policy=None, choice_generator=None) -> {"images": uint8
(b,3,H,W), "step_map": long (b,h,w), "order": long (b,n), "labels": (b,)}`, `module.device` and
`module.num_classes`. Chunk j of the labels is sampled with generators seeded `seed + j`, so a chunk's
samples do not depend on which process draws it (`evaluation.distributed`).
"""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from models.orders import order_to_step_map
from models.sampling import SamplerSettings, choice_generator, sample


@torch.no_grad()
def sample_images(net, tokenizer, labels: torch.Tensor, settings: SamplerSettings,
                  generator: torch.Generator | None = None, choice_generator: torch.Generator | None = None) -> dict:
    """Sample token grids for `labels` (b,) with `settings` (choice_temperature resolved) and decode them.

    Returns:
        dict with images uint8 (b,3,H,W), tokens (b,h,w), order (b,n), step_map (b,h,w), labels (b,).
    """
    out = sample(net, labels, settings, generator=generator, choice_generator=choice_generator)
    h, w = net.grid_size
    tokens = out.tokens.view(-1, h, w)
    images = tokenizer.decode_indices(tokens).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return {"images": images, "tokens": tokens, "order": out.order, "step_map": order_to_step_map(out.order, h, w),
            "labels": labels}


def cycle_labels(num: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., C-1, 0, 1, ... (all zeros when unconditional, C = 0): long (num,)."""
    return torch.arange(num) % num_classes if num_classes > 0 else torch.zeros(num, dtype=torch.long)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for sampling; the module's previous train/eval mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def generate_batches(
    module, labels: torch.Tensor, batch_size: int, seed: int, policy: str | None = None,
    rank: int = 0, world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Generate samples for `labels` in chunks of `batch_size`; chunk j with generators seeded from `seed + j`.

    With `world_size > 1`, only the chunks j with j % world_size == rank (this process's share). The
    generators live on the module's device because samplers draw on that device (a CPU generator cannot
    drive CUDA sampling). Call inside `eval_mode(module)`.

    Yields:
        The module's `generate` output for each chunk of this share, on the module's device.
    """
    for j, chunk in enumerate(labels.split(batch_size)):
        if j % world_size == rank:
            generator = torch.Generator(device=module.device).manual_seed(seed + j)
            yield module.generate(chunk.to(module.device), generator=generator, policy=policy,
                                  choice_generator=choice_generator(seed + j, module.device))


def sample_set(module, num: int, batch_size: int, seed: int) -> dict:
    """`num` samples with labels cycling over the classes (`generate_batches`), on the CPU, timed.

    Returns:
        {"images": uint8 (M,3,H,W), "step_maps": (M,h,w), "labels": (M,), "seconds": float}.
    """
    labels = cycle_labels(num, module.num_classes)
    start = time.perf_counter()
    with eval_mode(module):
        outs = [{k: v.cpu() for k, v in out.items()} for out in generate_batches(module, labels, batch_size, seed)]
    seconds = time.perf_counter() - start
    return {"images": torch.cat([o["images"] for o in outs]), "step_maps": torch.cat([o["step_map"] for o in outs]),
            "labels": labels, "seconds": seconds}
