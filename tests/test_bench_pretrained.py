"""benchmarks/bench_pretrained.py (issue 27) runs end to end in its tiniest setting; its FLOP count adds up."""

import json
import math

import pytest

from benchmarks import bench_pretrained


@pytest.mark.parametrize("part, rows", [("converted", ["(c1)", "(c2)"]), ("randar", ["(r1)", "(r2)", "(r3)"]),
                                        ("fixture", ["(f1)"])])
def test_bench_pretrained_smoke(part, rows, tmp_path, capsys):
    bench_pretrained.main([part, "--smoke", "--threads", "1", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    payload = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"][: len(rows[0])] for r in payload["rows"]] == rows
    for row in payload["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["a_median_s"] > 0 and row["b_median_s"] > 0
    info = payload["info"]["fp32"]
    if part == "converted":
        assert info["identical_logits"]  # the converted copy holds the native network's weights
    if part == "randar":
        assert info["train_tokens_per_s"] > 0 and info["extraction_images_per_s"] > 0
    if part == "fixture":
        assert info["fixture_s_per_image"] > 0 and info["fixture_tokens"] == 16
        assert info["randar_l_256"]["exact"]["candidate_queries"] == 32896
        assert "| exact | 32,896 |" in capsys.readouterr().out


def test_extraction_flops_counts_every_candidate_query():
    d, h, v = 4, 16, 10
    one = 8 * d * d + 6 * d * h
    # one token: the class token once (1 key), then one candidate (2 keys: the class token and itself) and the head
    assert bench_pretrained.extraction_flops(1, d, 1, h, v) == (one + 4 * d + one + 8 * d + 2 * d * v, 1)
    assert bench_pretrained.extraction_flops(256, d, 1, h, v)[1] == 256 * 257 // 2  # 32,896
    assert bench_pretrained.extraction_flops(256, d, 1, h, v, k=4)[1] == sum(256 - 4 * s for s in range(64))
    # a shortlist of 8 with a full ranking every 8 passes: 32 full rankings, 224 passes of 8 (or fewer at the end)
    full = sum(256 - t for t in range(0, 256, 8))
    assert bench_pretrained.extraction_flops(256, d, 1, h, v, shortlist=8, refresh=8)[1] == full + 224 * 8 - 28
