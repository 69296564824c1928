"""The four-arm comparison script in --smoke mode (tiny presets, 64 synthetic images; slow).

The end-to-end tests check the plumbing, not the numbers: the table has the four arms with numeric FID
and NLL columns and the two real-image rows (tokenizer ceiling, held-out reference), the JSON and the
figure are written, a second run reuses every finished stage, and the untinted unconditional variant
runs with the analyser's columns but without class accuracy. The feature network and the metrics are
tested in tests/test_evaluation.py.
"""

import json

import pytest

from benchmarks import compare_eval, compare_orders


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as {arm: {column: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.mark.slow  # ~15-30 s on a 2-core CPU: five in-process stages and the evaluation
def test_smoke_comparison_writes_table_json_png_and_reuses_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = compare_orders.main(["--smoke", "--threads", "1"])

    rows = table_rows((tmp_path / "results" / "synthetic.md").read_text())
    arms = [arm for arm, *_ in compare_orders.ARMS]
    assert len(arms) == 4 and set(arms) <= set(rows)
    for arm in arms:
        for column in ("FID ↓", "KID ↓", "class acc. ↑", "NLL raster", "NLL random", "NLL inferred",
                       "consistency ↑", "sun found", "clouds found"):
            float(rows[arm][column])  # numeric (one seed: no ± part)
    assert rows["any-order AR, random order"]["NLL inferred"] == rows[arms[2]]["NLL inferred"]  # one model
    for row in (compare_eval.CEILING, compare_eval.REFERENCE):  # real held-out images: image columns, no NLL
        assert float(rows[row]["FID ↓"]) >= 0 and float(rows[row]["class acc. ↑"]) >= 0
        assert rows[row]["NLL raster"] == "–"
    assert float(rows[compare_eval.REFERENCE]["consistency ↑"]) == 1.0  # the analyser reads real sunsets

    payload = json.loads((tmp_path / "results" / "synthetic.json").read_text())
    assert set(payload["summary"]) == set(arms)
    assert set(payload["rows"]) == {compare_eval.CEILING, compare_eval.REFERENCE}
    assert payload["feature_net"]["label_head"] == "hue" and "sun_x" in payload["feature_net"]["scores"]
    assert payload["sampler"][arms[0]]["policy"] == "raster"
    assert payload["sampler"][arms[3]]["num_samples"] == 16
    assert (tmp_path / "results" / "synthetic_samples.png").stat().st_size > 0
    assert not any(t["reused"] for t in first["stage_times"].values())

    capsys.readouterr()
    second = compare_orders.main(["--smoke", "--threads", "1"])
    assert set(second["stage_times"]) == set(first["stage_times"])
    assert all(t["reused"] for t in second["stage_times"].values())
    assert "seed 0: reused" in capsys.readouterr().out  # the evaluation is cached too
    assert second["summary"] == first["summary"]


@pytest.mark.slow  # ~15-30 s: the same pipeline on the untinted, unconditional sunsets
def test_smoke_comparison_on_the_untinted_unconditional_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = compare_orders.main(["--smoke", "--threads", "1", "--data", "synthetic_untinted"])
    text = (tmp_path / "results" / "synthetic_untinted.md").read_text()
    rows = table_rows(text)
    assert "0 classes" in text and "class acc. ↑" not in rows[compare_eval.REFERENCE]  # unconditional
    for column in ("consistency ↑", "sun found", "clouds found"):  # treated as synthetic
        float(rows[compare_orders.ARMS[0][0]][column])
    assert float(rows[compare_eval.REFERENCE]["consistency ↑"]) == 1.0
    assert result["feature_net"]["label_head"] is None and "cloud_tint" in result["feature_net"]["heads"]
