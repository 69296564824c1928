"""NLL under the three orders (evaluation.nll) and its mean over held-out sequences; the per-sequence
maths is tested in tests/test_extraction.py."""

import pytest
import torch

from evaluation.nll import mean_nll_bits, nll_under_orders
from models.extraction import extract_orders, nll_under_order
from models.orders import random_order, raster_order
from tests.test_transformer import CLASSES, VOCAB, N, tiny_net

COND = torch.tensor([1, 0, CLASSES])


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, N), generator=torch.Generator().manual_seed(seed))


def test_the_three_orders_are_raster_a_seeded_random_order_and_the_inferred_one():
    net, tokens = tiny_net(), images()
    bits = nll_under_orders(net, tokens, COND, torch.Generator().manual_seed(7), score="max_prob")
    assert set(bits) == {"raster", "random", "inferred"} and all(v.shape == (3,) for v in bits.values())
    expected = {"raster": raster_order(3, N),
                "random": random_order(3, N, generator=torch.Generator().manual_seed(7)),
                "inferred": extract_orders(net, tokens, COND, score="max_prob")}
    for name, order in expected.items():
        torch.testing.assert_close(bits[name], nll_under_order(net, tokens, order, COND), atol=1e-6, rtol=0)
    again = nll_under_orders(net, tokens, COND, torch.Generator().manual_seed(7), inferred=False)
    assert set(again) == {"raster", "random"} and torch.equal(again["random"], bits["random"])


def test_mean_nll_bits_is_the_mean_over_sequences_whatever_the_batch_size():
    net, tokens = tiny_net().train(), images(5, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole = mean_nll_bits(net, tokens, labels, seed=0, batch_size=5)
    split = mean_nll_bits(net, tokens, labels, seed=0, batch_size=2)
    assert set(whole) == {"nll_raster", "nll_random", "nll_inferred"} and net.training  # its mode comes back
    with torch.no_grad():
        direct = float(nll_under_order(net.eval(), tokens, raster_order(5, N), labels).mean())
    assert split["nll_raster"] == pytest.approx(direct, abs=1e-5) and whole["nll_raster"] == pytest.approx(direct)
    assert whole["nll_inferred"] == pytest.approx(split["nll_inferred"], abs=1e-5)  # per-sequence orders
    assert mean_nll_bits(net, tokens, labels, seed=0, batch_size=2) == split  # seeded: the same every time
