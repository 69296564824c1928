"""NLL under the four orders (evaluation.nll) and its mean over held-out sequences; the per-sequence
maths is tested in tests/test_extraction.py."""

import itertools

import pytest
import torch

from evaluation.nll import mean_nll_bits, nll_under_orders
from models.extraction import ExtractionSettings, extract_orders, nll_under_order
from models.orders import random_order, raster_order
from models.transformer import OrderedTransformer
from tests.test_transformer import CLASSES, VOCAB, N, tiny_net

COND = torch.tensor([1, 0, CLASSES])


def images(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, N), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score", ["true_prob", "max_prob"])
def test_the_orders_are_raster_a_seeded_random_order_the_inferred_one_and_the_own_one(score):
    net, tokens = tiny_net(), images()
    bits = nll_under_orders(net, tokens, COND, torch.Generator().manual_seed(7), score=score)
    assert set(bits) == {"raster", "random", "inferred", "own"} and all(v.shape == (3,) for v in bits.values())
    expected = {"raster": raster_order(3, N),
                "random": random_order(3, N, generator=torch.Generator().manual_seed(7)),
                "inferred": extract_orders(net, tokens, COND, ExtractionSettings(score=score)),
                "own": extract_orders(net, tokens, COND, ExtractionSettings(score="max_prob"))}
    for name, order in expected.items():
        torch.testing.assert_close(bits[name], nll_under_order(net, tokens, order, COND), atol=1e-6, rtol=0)
    again = nll_under_orders(net, tokens, COND, torch.Generator().manual_seed(7), inferred=False)
    assert set(again) == {"raster", "random"} and torch.equal(again["random"], bits["random"])


def test_the_own_order_gives_a_likelihood_and_the_inferred_order_does_not():
    """Over every sequence of a 2x2 grid with 3 codes, the probabilities under the own order sum to 1 (each
    choice sees only the tokens before it); those under the true-prob inferred order sum to more (the
    order peeks at the answer), so its NLL flatters the model."""
    torch.manual_seed(0)
    net = OrderedTransformer(3, (2, 2), CLASSES, 32, 1, 2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    tokens = torch.tensor(list(itertools.product(range(3), repeat=4)))
    cond = torch.ones(len(tokens), dtype=torch.long)
    bits = nll_under_orders(net, tokens, cond, torch.Generator().manual_seed(0), score="true_prob")
    total = {name: float(torch.exp2(-4 * b.double()).sum()) for name, b in bits.items()}
    assert total["own"] == pytest.approx(1.0, abs=1e-4)
    assert total["raster"] == pytest.approx(1.0, abs=1e-4)
    assert total["inferred"] > 1.05


def test_mean_nll_bits_is_the_mean_over_sequences_whatever_the_batch_size():
    net, tokens = tiny_net().train(), images(5, seed=3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    whole = mean_nll_bits(net, tokens, labels, seed=0, batch_size=5)
    split = mean_nll_bits(net, tokens, labels, seed=0, batch_size=2)
    assert set(whole) == {"nll_raster", "nll_random", "nll_inferred", "nll_own"} and net.training  # its mode comes back
    with torch.no_grad():
        direct = float(nll_under_order(net.eval(), tokens, raster_order(5, N), labels).mean())
    assert split["nll_raster"] == pytest.approx(direct, abs=1e-5) and whole["nll_raster"] == pytest.approx(direct)
    assert whole["nll_inferred"] == pytest.approx(split["nll_inferred"], abs=1e-5)  # per-sequence orders
    assert mean_nll_bits(net, tokens, labels, seed=0, batch_size=2) == split  # seeded: the same every time
