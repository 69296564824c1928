"""The four-arm comparison script: its feature network with torchmetrics' FID/KID (fast), and the
whole script in --smoke mode (tiny presets, 64 synthetic images; slow).

The end-to-end test checks the plumbing, not the numbers: the table has the four arms with numeric FID
and NLL columns, the JSON and the figure are written, and a second run reuses every finished stage.
"""

import json

import pytest
import torch

from benchmarks import compare_orders
from benchmarks.compare_eval import build_fid_kid, fid_kid
from models.feature_net import SmallConvNetFeatures, accuracy, train_classifier


def two_class_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark images (class 0) and bright images (class 1) with noise: uint8 (n,3,32,32), labels (n,)."""
    labels = torch.arange(n) % 2
    base = (60 + 120 * labels).view(n, 1, 1, 1).float()
    noise = torch.randn(n, 3, 32, 32, generator=generator) * 20
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


def test_feature_net_trains_and_serves_torchmetrics_fid_kid():
    gen = torch.Generator().manual_seed(0)
    images, labels = two_class_images(64, gen)
    net = SmallConvNetFeatures(num_classes=2, width=8, feature_dim=16)
    info = train_classifier(net, images, labels, max_epochs=10, batch_size=16)
    assert info["steps"] == 40 and not info["capped"] and not net.training  # BatchNorm running stats settle
    assert accuracy(net, images, labels) > 0.9
    assert net(images[:5]).shape == (5, 16)
    with pytest.raises(TypeError):
        net(images.float())  # uint8 in [0, 255] only: the convention of FID/KID with normalize=False

    metrics = build_fid_kid(net, None, m=16)
    dark, bright = images[labels == 0], images[labels == 1]
    same = fid_kid(metrics, dark[:16], dark[16:])
    different = fid_kid(metrics, dark, bright)
    assert different["fid"] > 10 * max(same["fid"], 1e-3) and different["kid"] > same["kid"]
    assert not net.training  # the metrics keep the network's BatchNorm in eval mode


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
        for column in ("FID ↓", "KID ↓", "NLL raster", "NLL random", "NLL inferred"):
            float(rows[arm][column])  # numeric (one seed: no ± part)
    assert rows["any-order AR, random order"]["NLL inferred"] == rows[arms[2]]["NLL inferred"]  # one model
    assert "real images (reference)" in rows

    payload = json.loads((tmp_path / "results" / "synthetic.json").read_text())
    assert set(payload["summary"]) == set(arms)
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
