"""`python -m experiments.report.gap`: the gap of each any-order model to the raster model of its block, from
the validation curves alone."""

import json

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from experiments.report.gap import main


def trained(root, name, train_order, block, curves):
    folder = root / "seed0" / name
    folder.mkdir(parents=True)
    net = {"class_path": "models.transformer.OrderedTransformer", "init_args": {"block": block}}
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"init_args": {"net": net,
                                                                                "train_order": train_order}}}))
    for run in curves:  # one events file per process: a resumed run writes a second one
        writer = SummaryWriter(str(folder))
        for tag, points in run.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()


def test_the_gap_is_taken_at_the_last_step_against_the_raster_model_of_the_same_block(tmp_path, capsys):
    trained(tmp_path, "raster_gpt", "raster", "gpt", [{"val/nll_raster": [(499, 3.0), (999, 2.5)],
                                                       "val/nll_random": [(999, 11.0)]}])
    trained(tmp_path, "raster_llama", "raster", "llama", [{"val/nll_raster": [(999, 2.25)]}])
    trained(tmp_path, "any_gpt", "random", "gpt", [{"val/nll_random": [(499, 4.0)]},
                                                   {"val/nll_random": [(499, 4.0), (999, 3.25)]}])  # resumed
    trained(tmp_path, "any_llama", "random", "llama", [{"val/nll_random": [(999, 3.0)], "val/nll_raster": [(999, 9)]}])
    (tmp_path / "seed0" / "tokenizer").mkdir()  # not an AR model: no config, ignored
    rows = {r["model"]: r for r in main([str(tmp_path), "--out", str(tmp_path / "gap.png")])}
    assert set(rows) == {"raster_gpt", "raster_llama", "any_gpt", "any_llama"}
    assert rows["any_gpt"]["gap"] == pytest.approx(0.75) and rows["any_gpt"]["raster_model"] == "raster_gpt"
    assert rows["any_llama"]["gap"] == pytest.approx(0.75) and rows["any_llama"]["raster_model"] == "raster_llama"
    assert rows["raster_gpt"]["nll"] == pytest.approx(2.5) and rows["raster_gpt"]["gap"] is None
    assert (tmp_path / "gap.png").stat().st_size > 0
    assert json.loads((tmp_path / "gap.json").read_text())[0]["model"] in rows
    assert "gap +0.750 (to raster_gpt)" in capsys.readouterr().out


def test_a_folder_without_the_seed_is_named(tmp_path):
    with pytest.raises(SystemExit, match="seed0 does not exist"):
        main([str(tmp_path), "--out", str(tmp_path / "gap.png")])
