"""Training options of the AR modules: the raster-to-random curriculum."""

import pytest
import torch

from lightning_modules.any_order import AnyOrderModule
from models.orders import is_permutation, raster_order
from models.transformer import OrderedTransformer


def module(**kwargs) -> AnyOrderModule:
    return AnyOrderModule(OrderedTransformer(16, (4, 4), num_classes=2, width=16, depth=1, heads=2), **kwargs)


def test_curriculum_share_rises_from_the_start_share_to_one():
    m = module(curriculum_steps=100, curriculum_start=0.2)
    assert [m.random_share(s) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_curriculum_orders_in_training_only():
    m = module(curriculum_steps=100, curriculum_start=0.0)  # step 0 (no trainer): every order raster
    batch = {"tokens": torch.zeros(32, 4, 4, dtype=torch.long)}
    assert torch.equal(m.orders_for(batch, "train"), raster_order(32, 16))
    val = m.orders_for(batch, "val")
    assert is_permutation(val) and not torch.equal(val, raster_order(32, 16))
    off = module().orders_for(batch, "train")
    assert not (off == raster_order(32, 16)).all(dim=1).any()


def test_curriculum_settings_checked():
    with pytest.raises(ValueError, match="curriculum_start"):
        module(curriculum_steps=10, curriculum_start=1.5)


@pytest.mark.parametrize("key,value", [("gumbel_schedule", "cosine"), ("random_first", -1), ("precision", "fp16")])
def test_extraction_settings_checked(key, value):
    from lightning_modules.any_order import ExtractionSettings

    with pytest.raises(ValueError, match=rf"model\.init_args\.extraction\.{key} = "):
        ExtractionSettings(**{key: value})


@pytest.mark.parametrize("world_size", [1, 2])
def test_ddp_ranks_draw_different_training_orders(world_size):
    """`seed_everything` seeds every DDP rank alike; the module offsets the generator by the rank at the start of
    training, so two ranks train on different orders (a single process is left as seeded)."""
    from types import SimpleNamespace

    batch, orders = {"tokens": torch.zeros(8, 4, 4, dtype=torch.long)}, []
    for rank in range(2):
        torch.manual_seed(3)
        m = module()
        m._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, global_step=0)
        m.on_train_start()
        orders.append(m.orders_for(batch, "train"))
    assert torch.equal(orders[0], orders[1]) == (world_size == 1)
