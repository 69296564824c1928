"""The benchmark scripts run end to end in their tiniest setting and write every row with a numeric ratio."""

import json
import math

import pytest
import torch

from benchmarks import bench_ar, bench_extraction, bench_precision
from benchmarks.timing import median_ratio, time_alternately


def test_time_alternately_rotates_and_returns_medians():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    samples = []
    medians = time_alternately(fns, repeats=3, warmup=1, samples=samples)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert len(medians) == 2 and all(len(s) == 3 for s in samples)
    with pytest.raises(ValueError):
        time_alternately(fns, repeats=0)


def test_median_ratio_pairs_repeats():
    # a bimodal load: the separate medians would give 3.0 / 1.1, the paired ratios say 1.0 (mostly)
    a, b = [1.0, 3.0, 3.0, 1.0, 3.0], [1.0, 3.0, 1.1, 1.0, 3.0]
    assert median_ratio(a, b) == 1.0


def _check(path, prefixes):
    payload = json.loads(path.read_text())
    names = [row["name"] for row in payload["rows"]]
    assert [n[:3] for n in names] == [p for p in prefixes for _ in ("bf16", "fp32")]  # both dtypes, side by side
    assert [n.rsplit(" [", 1)[1] for n in names] == ["bf16]", "fp32]"] * len(prefixes)
    for row in payload["rows"]:
        assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["a_median_s"] > 0 and row["b_median_s"] > 0 and isinstance(row["passed"], bool)
        assert len(row["a_samples_s"]) == len(row["b_samples_s"]) >= 1
    return payload


def test_bench_ar_smoke(tmp_path, capsys):
    bench_ar.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "ar.json"), "--dtype", "fp32", "bf16"])
    payload = _check(tmp_path / "ar.json", ["(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)", "(i)", "(j)"])
    rows = {row["name"][:3] + row["extra"]["dtype"]: row for row in payload["rows"]}
    assert rows["(b)fp32"]["extra"]["identical_outputs"]
    assert rows["(c)bf16"]["extra"]["matmul_gflops_per_s"] > 0 and rows["(c)fp32"]["extra"]["matmul_gflops_per_s"] > 0
    assert rows["(i)fp32"]["extra"]["width"] > rows["(c)fp32"]["extra"]["width"]  # (i) is the wider preset
    out = capsys.readouterr().out
    assert "| benchmark |" in out and "| benchmark | goal | fp32 | bf16 |" in out


@pytest.mark.parametrize("pays", [True, False])
def test_bench_precision_states_the_goal_by_what_auto_picks(pays, tmp_path, capsys, monkeypatch):
    """bf16 / fp32 rows; the goal follows the device's verdict (bf16 must be faster where auto picks it)."""
    monkeypatch.setattr(bench_precision, "bf16_pays", lambda device: pays)
    bench_precision.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "p.json")])
    payload = json.loads((tmp_path / "p.json").read_text())
    assert [r["name"][:4] for r in payload["rows"]] == ["(p1)", "(p2)", "(p3)"]
    for row in payload["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["goal_op"] == ("<=" if pays else ">=")
        assert row["passed"] == (row["ratio"] <= 1 if pays else row["ratio"] >= 1)
    assert f"precision auto picks {'bf16' if pays else 'fp32'} here" in capsys.readouterr().out


def test_bench_extraction_smoke(tmp_path, capsys):
    bench_extraction.main(["--smoke", "--threads", "1", "--json", str(tmp_path / "ex.json")])
    payload = _check(tmp_path / "ex.json", ["(a)", "(b)", "(c)", "(d)"])
    assert payload["rows"][1]["extra"]["identical_orders"]  # (a) [fp32]
    assert {r["extra"].get("next_pos_layer") for r in payload["rows"] if r["name"].startswith("(d)")} == {1}
    for dtype in ("fp32", "bf16"):
        for key in ("fashion_mnist_train_with_flips_s", "fashion_mnist_train_two_cores_s",
                    "next_pos_layer_late_two_cores_s"):
            assert payload["projection"][dtype][key] > 0
    assert "Fashion-MNIST" in capsys.readouterr().out


def test_sampling_flops_formula():
    # one token, one layer: a single candidate attending to itself
    d, h, v = 4, 16, 10
    assert bench_ar.sampling_flops(1, 1, d, 1, h, v) == 8 * d * d + 4 * d * h + 4 * d + 2 * d * v


@pytest.mark.parametrize("policy", ["raster", "random", "confidence"])
def test_legacy_loop_samples_what_the_new_loop_samples(policy):
    """Row (f) times equal work: with the same token draw, today's loop and commit 461859e's agree."""
    from benchmarks.legacy_decode import legacy_sample
    from models.sampling import TokenSampler, sample
    from tests.test_transformer import CLASSES, tiny_net

    net, cond = tiny_net(seed=3), torch.tensor([0, 1, CLASSES])
    tokens, order = legacy_sample(net, cond, policy, torch.Generator().manual_seed(5), draw=TokenSampler())
    new = sample(net, cond, policy, generator=torch.Generator().manual_seed(5))
    assert torch.equal(tokens, new.tokens) and torch.equal(order, new.order)


def test_presets_come_from_the_config_files():
    from benchmarks.harness import ar_preset

    base, source = ar_preset("base")
    assert source == "configs/model/ar/base.yaml" and (base["width"], base["depth"], base["heads"]) == (768, 14, 12)
    assert ar_preset("small")[0]["width"] == 256
    with pytest.raises(SystemExit, match="configs/model/ar/nope.yaml"):
        ar_preset("nope")


def test_order_content_refuses_an_experiment_without_suns(tmp_path):
    """The sun and cloud steps exist on synthetic data only: another data set is one error line."""
    import json

    from experiments import order_content

    exp = {"name": "e", "data": "fashion_mnist", "preset": "tiny", "budget": {"steps": 1, "samples": 1}, "models": {},
           "arms": []}
    (tmp_path / "experiment.json").write_text(json.dumps(exp))
    with pytest.raises(SystemExit, match="synthetic data only"):
        order_content.main([str(tmp_path)])


def test_bench_variants_smoke(tmp_path):
    """Every variant is timed against the default, with its parameter count; raster arms sample in raster order."""
    from benchmarks import bench_variants

    bench_variants.main(["--smoke", "--threads", "1", "--dtype", "fp32", "--json", str(tmp_path / "v.json")])
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    trained = {r["name"].split(", ", 1)[1].rsplit(" / ", 1)[0] for r in rows if r["name"].startswith("(v1)")}
    assert trained == set(list(bench_variants.VARIANTS)[1:])
    for row in rows:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        if row["name"].startswith("(v1)"):
            assert row["extra"]["params"] > 0 and row["extra"]["params_share"] > 0  # smoke sizes: llama rounds up
    assert not any(r["name"].startswith("(v3)") and "raster" in r["name"] for r in rows)
