"""Orders and the KV-cached sampler: cached logits equal the full forward; sampler equals its reference."""

import pytest
import torch

from models.choice import ChoiceNoise
from models.logits import top_k_filter, top_p_filter
from models.orders import (
    is_permutation,
    known_first,
    order_to_step_map,
    random_order,
    raster_order,
    unwritten_cells,
)
from models.sampling import (
    ClassifierFreeGuidance,
    ConfidencePolicy,
    NoGuidance,
    SamplerSettings,
    TokenSampler,
    decode,
    make_guidance,
    naive_confidence_sample,
    sample,
)
from tests.test_transformer import CLASSES, GRID, VARIANTS, VOCAB, N, tiny_net

COND = torch.tensor([0, 2, CLASSES])  # the last row is unconditional


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def guided_forward(net, tokens, order, cond, cfg_scale):
    """Full-forward logits (b, n, v) of an order, with classifier-free guidance."""
    logits = net(tokens, order, cond)
    if cfg_scale == 1.0:
        return logits
    uncond = net(tokens, order, torch.full_like(cond, net.null_class))
    return uncond + cfg_scale * (logits - uncond)


# ------------------------------------------------------------------------------------------ orders
def test_raster_and_random_orders():
    assert torch.equal(raster_order(2, 5), torch.arange(5).repeat(2, 1))
    a, b = random_order(8, N, gen(1)), random_order(8, N, gen(1))
    assert torch.equal(a, b) and is_permutation(a)
    assert len({tuple(row.tolist()) for row in a}) == 8  # rows differ
    assert not is_permutation(torch.tensor([[0, 1, 1, 3]]))


def test_order_to_step_map_is_the_inverse():
    order = random_order(3, 12, gen())
    steps = order_to_step_map(order, 3, 4)
    assert steps.shape == (3, 3, 4)
    assert torch.equal(steps.flatten(1).gather(1, order), torch.arange(12).expand(3, 12))


def test_unwritten_cells_and_known_first():
    written = torch.tensor([[True, False, False, True], [False, True, False, True]])
    assert unwritten_cells(written, 2).tolist() == [[1, 2], [0, 2]]
    order = torch.tensor([[3, 2, 1, 0], [2, 1, 0, 3]])
    assert known_first(order, written).tolist() == [[0, 3, 2, 1], [1, 3, 2, 0]]


# ------------------------------------------------------------------------------- logit processing
def test_logit_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[True, False, False, True]]
    assert torch.equal(top_k_filter(logits, 0), logits)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(top_p_filter(probs, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(probs, 0.0)).tolist() == [[False, True, True, True]]
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    draws = TokenSampler(temperature=1e-3)(logits.expand(50, 4), gen())
    assert (draws == 1).all()


# ------------------------------------------------------------------ cached logits equal full forward
@pytest.mark.parametrize("policy", ["raster", "random", "confidence"])
@pytest.mark.parametrize("next_pos,own_pos,block", VARIANTS)
def test_cached_logits_equal_forward(policy, next_pos, own_pos, block):
    net = tiny_net(next_pos, own_pos, block=block)
    out = sample(net, COND, policy, generator=gen(), return_logits=True)
    assert is_permutation(out.order)
    # forward on the returned order and tokens reproduces every step's logits: the tokens sit at the
    # cells the order names, and the cache saw exactly what the full forward sees
    torch.testing.assert_close(out.logits, net(out.tokens, out.order, COND), atol=1e-5, rtol=0)


def test_fixed_policies():
    net = tiny_net()
    assert torch.equal(sample(net, COND, "raster", generator=gen()).order, raster_order(3, N))
    order = random_order(3, N, gen(5))
    assert torch.equal(sample(net, COND, "given", order=order, generator=gen()).order, order)
    a, b = (sample(net, COND, "random", generator=gen(s)).order for s in (1, 2))
    assert torch.equal(a, sample(net, COND, "random", generator=gen(1)).order) and not torch.equal(a, b)
    with pytest.raises(ValueError):
        sample(net, COND, "confidence", order=order)


@pytest.mark.parametrize("policy", ["random", "confidence"])
def test_cached_logits_equal_forward_with_cfg(policy):
    net = tiny_net("absolute", "rope")
    out = sample(net, COND, SamplerSettings(policy, cfg_scale=3.0), generator=gen(), return_logits=True)
    expected = guided_forward(net, out.tokens, out.order, COND, 3.0)
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------- cached equals naive sampler
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(score="neg_entropy"),
        dict(cfg_scale=2.5, top_k=6),
        dict(temperature=0.7, top_p=0.8),
        dict(choice_temperature=2.0),
        dict(choice_temperature=1.0, choice_schedule="constant", random_first=3, cfg_scale=2.0),
        dict(score="sampled", top_k=5),
        dict(score="margin"),
        dict(score="least_confident", choice_temperature=0.5),
    ],
)
@pytest.mark.parametrize("next_pos,own_pos,next_pos_layer,block",
                         [("relative", "learned", 0, "gpt"), ("absolute", "rope", 0, "gpt"),
                          ("absolute", "learned", 1, "gpt"), ("target_rope", "rope", 0, "llama"),
                          ("instruction", "rope", 0, "llama")])
def test_confidence_sample_equals_naive(kwargs, next_pos, own_pos, next_pos_layer, block):
    net = tiny_net(next_pos, own_pos, seed=1, next_pos_layer=next_pos_layer, block=block)
    settings = SamplerSettings(**kwargs)
    fast = sample(net, COND, settings, generator=gen(7), choice_generator=gen(8), return_logits=True)
    slow = naive_confidence_sample(net, COND, settings, generator=gen(7), choice_generator=gen(8))
    assert torch.equal(fast.order, slow.order)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-5, rtol=0)


def test_confidence_choice_is_the_most_confident_cell():
    net = tiny_net()
    out = sample(net, COND, "confidence", generator=gen(), return_logits=True)
    policy = ConfidencePolicy("max_prob")
    written = torch.zeros(3, N, dtype=torch.bool)
    for t in [0, 5, 11]:
        written[:] = False
        written.scatter_(1, out.order[:, :t], True)
        cells = unwritten_cells(written, N - t)
        trials = [net(out.tokens, torch.cat([out.order[:, :t], cells[:, j : j + 1]], 1), COND)[:, -1] for j in
                  range(N - t)]
        best = cells.gather(1, policy.choose(torch.stack(trials, 1))[:, None]).squeeze(1)
        assert torch.equal(best, out.order[:, t])


# -------------------------------------------------------------------------------------- guidance
def test_cfg_scale_one_equals_no_guidance():
    net = tiny_net()
    assert isinstance(make_guidance(net, 1.0), NoGuidance)
    sampler = TokenSampler()
    plain = decode(net, COND, ConfidencePolicy(), NoGuidance(), sampler, gen(3))
    cfg_one = ClassifierFreeGuidance(net.null_class, 1.0)  # the 2b-row path, forced
    doubled = decode(net, COND, ConfidencePolicy(), cfg_one, sampler, gen(3))
    assert torch.equal(plain.tokens, doubled.tokens) and torch.equal(plain.order, doubled.order)
    guided = sample(net, COND, SamplerSettings(cfg_scale=4.0), generator=gen(3))
    assert not torch.equal(plain.tokens, guided.tokens)


# ------------------------------------------------------------------------------------- inpainting
@pytest.mark.parametrize("policy", ["confidence", "random"])
def test_inpainting_keeps_known_cells(policy):
    net = tiny_net()
    g = gen(4)
    known_tokens = torch.randint(0, VOCAB, (3, *GRID), generator=g)
    known_mask = torch.zeros(3, N, dtype=torch.bool)
    known_mask.scatter_(1, random_order(3, N, g)[:, :6], True)  # 6 known cells, different per row
    out = sample(
        net, COND, SamplerSettings(policy, cfg_scale=2.0), generator=g, known_tokens=known_tokens,
        known_mask=known_mask.view(3, *GRID), return_logits=True,
    )
    assert is_permutation(out.order)
    flat = known_tokens.flatten(1)
    assert torch.equal(out.tokens[known_mask], flat[known_mask])
    first = out.order[:, :6]
    assert known_mask.gather(1, first).all() and (first.diff(dim=1) > 0).all()  # known first, raster
    expected = guided_forward(net, out.tokens, out.order, COND, 2.0)
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=0)


def test_inpainting_edge_cases():
    net = tiny_net()
    known_tokens = torch.randint(0, VOCAB, (3, N), generator=gen())
    everything = sample(net, COND, known_tokens=known_tokens, known_mask=torch.ones(3, N, dtype=torch.bool))
    assert torch.equal(everything.tokens, known_tokens) and torch.equal(everything.order, raster_order(3, N))
    none_known = torch.zeros(N, dtype=torch.bool)  # one mask for the whole batch
    nothing = sample(net, COND, generator=gen(), known_tokens=known_tokens, known_mask=none_known)
    assert torch.equal(nothing.tokens, sample(net, COND, generator=gen()).tokens)
    uneven = torch.zeros(3, N, dtype=torch.bool)
    uneven[0, 0] = True  # rows may know different numbers of cells (tests/test_editing.py tests it in full)
    out = sample(net, COND, generator=gen(), known_tokens=known_tokens, known_mask=uneven)
    assert out.tokens[0, 0] == known_tokens[0, 0] and out.order[0, 0] == 0
    with pytest.raises(ValueError, match="known_tokens"):
        sample(net, COND, known_mask=uneven)


# -------------------------------------------------------------------------------- order-choice noise
def test_greedy_choice_ignores_the_choice_generator():
    """T = 0: the greedy sampler, whatever choice generator is passed, and that generator is not used."""
    net = tiny_net(seed=2)
    greedy = sample(net, COND, generator=gen(3))
    choices = gen(9)
    again = sample(net, COND, SamplerSettings(choice_temperature=0.0), generator=gen(3), choice_generator=choices)
    assert torch.equal(greedy.order, again.order) and torch.equal(greedy.tokens, again.tokens)
    assert torch.equal(choices.get_state(), gen(9).get_state())


def test_choice_noise_leaves_the_token_draws_alone():
    """The noise has its own generator: the token generator is consumed exactly as by the greedy choice."""
    net = tiny_net(seed=2)
    tokens_greedy, tokens_noisy = gen(3), gen(3)
    greedy = sample(net, COND, generator=tokens_greedy)
    noisy = sample(net, COND, SamplerSettings(choice_temperature=3.0), generator=tokens_noisy,
                   choice_generator=gen(4))
    assert not torch.equal(greedy.order, noisy.order)
    assert torch.equal(tokens_greedy.get_state(), tokens_noisy.get_state())


@pytest.mark.parametrize("settings", [SamplerSettings(choice_temperature=1e6, choice_schedule="constant"),
                                      SamplerSettings(random_first=N)])
def test_huge_choice_noise_writes_cells_in_uniformly_random_order(settings):
    """Every cell is as likely at every step: counts of the first cell and the mean step map are flat."""
    net = tiny_net(seed=2)
    rows = 480
    cond = torch.arange(rows) % (CLASSES + 1)
    out = sample(net, cond, settings, generator=gen(3), choice_generator=gen(4))
    assert is_permutation(out.order)
    first = torch.bincount(out.order[:, 0], minlength=N).float()  # expected 30 per cell, sd ~5.4
    assert first.min() >= 10 and first.max() <= 55, first.tolist()
    mean_step = order_to_step_map(out.order, *GRID).float().mean(0)  # expected (N-1)/2 = 7.5, sd ~0.21
    assert (mean_step - (N - 1) / 2).abs().max() < 1.5, mean_step
    greedy = sample(net, cond, generator=gen(3))
    assert torch.bincount(greedy.order[:, 0], minlength=N).max() > 60  # the greedy choice is far from uniform


def test_linear_schedule_anneals_to_greedy():
    noise = ChoiceNoise(2.0, "linear")
    assert noise.temperature_at(0, N) == 2.0 and noise.temperature_at(N // 2, N) == 1.0
    assert noise.temperature_at(N, N) == 0.0
    assert ChoiceNoise(2.0, "constant").temperature_at(N - 1, N) == 2.0
    per_row = noise.temperature_at(torch.tensor([0, 4]), torch.tensor([8, 8]))
    torch.testing.assert_close(per_row, torch.tensor([2.0, 1.0]))


def test_sampled_score_keeps_the_token_it_scored():
    """MaskGIT's rule: each candidate's token is drawn, scored by its log-probability, and kept if chosen.

    With greedy tokens (top_k 1) the drawn token is the most likely one, so the order is max_prob's.
    """
    net = tiny_net(seed=2)
    sampled = sample(net, COND, SamplerSettings(score="sampled", top_k=1), generator=gen(3))
    max_prob = sample(net, COND, SamplerSettings(score="max_prob", top_k=1), generator=gen(3))
    assert torch.equal(sampled.order, max_prob.order) and torch.equal(sampled.tokens, max_prob.tokens)
    varied = sample(net, COND, SamplerSettings(score="sampled"), generator=gen(3))
    assert not torch.equal(varied.order, max_prob.order)


@pytest.mark.parametrize("key,value", [("temperature", 0.0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -1),
                                       ("score", "entropy"), ("policy", "spiral"), ("choice_temperature", -1.0),
                                       ("choice_temperature", "hot"),
                                       ("choice_schedule", "cosine"), ("random_first", -2)])
def test_impossible_settings_name_their_key(key, value):
    with pytest.raises(ValueError, match=rf"model\.init_args\.sampler\.{key} must be"):
        SamplerSettings(**{key: value})


def test_auto_choice_temperature_is_resolved_before_sampling():
    auto = SamplerSettings(choice_temperature="auto")  # valid: the LightningModule resolves it
    with pytest.raises(ValueError, match="resolved"):
        sample(tiny_net(), COND, auto, generator=gen(0))
    assert auto.resolved(2.5).choice_temperature == 2.5 and auto.choice_temperature == "auto"  # a copy
    assert SamplerSettings(choice_temperature=0.5).resolved(2.5).choice_temperature == 0.5  # a number stays


def test_mixed_order_share():
    from models.orders import mixed_order

    none, every = mixed_order(64, N, 0.0, gen()), mixed_order(64, N, 1.0, gen())
    assert torch.equal(none, raster_order(64, N)) and is_permutation(every)
    assert not (every == raster_order(64, N)).all(dim=1).any()
    half = mixed_order(400, N, 0.5, gen())
    raster_rows = int((half == raster_order(400, N)).all(dim=1).sum())
    assert 140 < raster_rows < 260 and is_permutation(half)  # expected 200, sd 10
