"""The four-arm comparison script end to end in --smoke mode (tiny presets, 64 synthetic images).

Checks the plumbing, not the numbers: the table has the four arms with numeric FID and NLL columns,
the JSON and the figure are written, and a second run reuses every finished stage.
"""

import json

import pytest

from benchmarks import compare_orders

pytestmark = pytest.mark.slow  # ~15-30 s on a 2-core CPU: five in-process stages and the evaluation


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as {arm: {column: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_smoke_comparison_writes_table_json_png_and_reuses_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = compare_orders.main(["--smoke", "--threads", "1"])

    rows = table_rows((tmp_path / "results" / "synthetic.md").read_text())
    arms = [arm for arm, *_ in compare_orders.ARMS]
    assert len(arms) == 4 and set(arms) <= set(rows)
    for arm in arms:
        for column in ("FID ↓", "KID ↓", "NLL raster", "NLL random", "NLL inferred"):
            float(rows[arm][column])  # numeric (one seed: no ± part)
    assert rows["any-order AR, random order"]["NLL inferred"] == rows[arms[2]]["NLL inferred"]  # one model
    assert "real images (reference)" in rows

    payload = json.loads((tmp_path / "results" / "synthetic.json").read_text())
    assert set(payload["summary"]) == set(arms)
    assert payload["sampler"][arms[0]]["policy"] == "raster"
    assert payload["sampler"][arms[3]]["num_samples"] == 16
    assert (tmp_path / "results" / "synthetic_samples.png").stat().st_size > 0
    assert all(v != "reused" for v in first["stage_times"].values())

    capsys.readouterr()
    second = compare_orders.main(["--smoke", "--threads", "1"])
    assert set(second["stage_times"]) == set(first["stage_times"])
    assert all(v == "reused" for v in second["stage_times"].values())
    assert "seed 0: reused" in capsys.readouterr().out  # the evaluation is cached too
    assert second["summary"] == first["summary"]
