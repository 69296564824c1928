"""bf16 agrees with fp32 on the tiny model: NLL, greedy extraction choices, and the cached decoding loop.

Bounds are loose enough for any x86 CPU (bf16 is native with AMX / AVX512-BF16, emulated elsewhere) and
tight enough to catch a broken mixed-precision path (measured here: NLL within 1e-4 relative, 98-100% of
the greedy steps identical, the others near-ties).
"""

import pytest
import torch

from benchmarks.bench_agreement import greedy_agreement
from models.extraction import extract_orders, nll_under_order
from models.orders import is_permutation, random_order
from models.precision import autocast, bf16_pays, cast_for_inference, emulated_bf16_warning, resolve_dtype
from models.sampling import SamplerSettings, sample
from tests.conftest import QUIET, SMALL_DATA, TOKENIZER_CKPT, copy_run, run_cli, stage_configs, tiny_preset
from tests.test_transformer import CLASSES, VOCAB, N, tiny_net

BF16 = torch.bfloat16


def data(b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, N), generator=g)
    return tokens, torch.randint(0, CLASSES + 1, (b,), generator=g), random_order(b, N, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_nll_within_one_percent(seed):
    net = tiny_net(seed=seed)
    tokens, cond, order = data(seed=seed)
    with torch.no_grad():
        fp32 = nll_under_order(net, tokens, order, cond)
        bf16 = nll_under_order(net, tokens, order, cond, dtype=BF16)
        cast = nll_under_order(cast_for_inference(net, BF16), tokens, order, cond)
    assert bf16.dtype == torch.float32  # logits and the NLL stay fp32
    for other in (bf16, cast):
        assert float((other.mean() - fp32.mean()).abs() / fp32.mean()) < 0.01


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_greedy_extraction_makes_the_same_choices(seed):
    net = tiny_net(seed=seed)
    tokens, cond, _ = data(seed=seed)
    greedy = extract_orders(net, tokens, cond)
    same, regret = greedy_agreement(net, tokens, cond, greedy, BF16)
    assert same >= 0.9 and regret < 0.05  # other picks are near-ties
    assert greedy_agreement(net, tokens, cond, greedy, None) == (1.0, 0.0)  # fp32 against itself
    orders = extract_orders(net, tokens, cond, dtype=BF16)
    assert is_permutation(orders) and (orders == greedy).float().mean() > 0.5


@pytest.mark.parametrize("policy", ["raster", "confidence"])
def test_bf16_cached_decoding_matches_the_bf16_forward(policy):
    net = tiny_net("absolute", "rope")
    cond = torch.tensor([0, 2, CLASSES])
    out = sample(net, cond, SamplerSettings(policy=policy), generator=torch.Generator().manual_seed(0),
                 return_logits=True, dtype=BF16)
    assert out.logits.dtype == torch.float32 and is_permutation(out.order)
    with torch.no_grad():
        forward = cast_for_inference(net, BF16)(out.tokens, out.order, cond)
        with autocast("cpu", BF16):
            mixed = net(out.tokens, out.order, cond)
    torch.testing.assert_close(out.logits, forward, atol=0.1, rtol=0.02)  # bf16 rounding, same computation
    torch.testing.assert_close(out.logits, mixed, atol=0.25, rtol=0.05)


def test_cast_for_inference_leaves_the_network_alone():
    net = tiny_net()
    assert cast_for_inference(net, None) is net and cast_for_inference(net, torch.float32) is net
    copy = cast_for_inference(net, BF16)
    assert copy is not net and next(copy.parameters()).dtype == BF16
    assert next(net.parameters()).dtype == torch.float32 and not copy.training


def test_precision_names():
    assert resolve_dtype("bf16") is BF16 and resolve_dtype("bf16-mixed") is BF16
    assert resolve_dtype("fp32") is None and resolve_dtype(torch.float32) is None and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        resolve_dtype("fp16")
    assert isinstance(bf16_pays("cpu"), bool) and bf16_pays("meta") is False


def test_precision_settings_choose_the_dtype(monkeypatch):
    """`precision` in the sampler settings is the same as passing the dtype; auto follows the device."""
    from models import precision

    net, cond = tiny_net(seed=3), torch.tensor([0, 1, 2])
    by_setting = sample(net, cond, SamplerSettings(precision="bf16"), generator=torch.Generator().manual_seed(0))
    by_dtype = sample(net, cond, SamplerSettings(), generator=torch.Generator().manual_seed(0), dtype=BF16)
    assert torch.equal(by_setting.tokens, by_dtype.tokens) and torch.equal(by_setting.order, by_dtype.order)
    for pays in (True, False):
        monkeypatch.setattr(precision, "bf16_pays", lambda device, pays=pays: pays)
        assert precision.resolve_dtype("auto") == (BF16 if pays else None)
    with pytest.raises(ValueError, match="sampler.precision"):
        SamplerSettings(precision="fp16")


@pytest.mark.parametrize("pays", [True, False])
def test_bf16_training_on_a_cpu_that_emulates_it_is_named_in_one_line(pays, tokenizer_run, tmp_path, monkeypatch,
                                                                       caplog):
    """`--trainer.precision bf16-mixed` where bf16 is emulated (an AVX2-only CPU: ~50x slower matmuls than fp32)
    logs one warning that names the fix; fp32, and bf16 where it is native, log nothing."""
    import run
    from models import precision

    monkeypatch.setattr(precision, "bf16_pays", lambda device: pays)
    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    monkeypatch.setattr(run.OARCLI, "_run_subcommand", lambda self, subcommand: None)
    for trainer_precision in ("32-true", "bf16-mixed"):
        caplog.clear()
        run_cli("fit", *stage_configs("any_order"), *tiny_preset("any_order"), *SMALL_DATA, *QUIET,
                "--data.init_args.tokenizer_ckpt", TOKENIZER_CKPT, "--trainer.precision", trainer_precision)
        named = [r.message for r in caplog.records if "no native bf16" in r.message]
        assert len(named) == (trainer_precision == "bf16-mixed" and not pays)
        assert all("--trainer.precision 32-true" in m for m in named)
    assert (emulated_bf16_warning("bf16-true", "cpu") is None) == pays and emulated_bf16_warning("32", "cpu") is None
