"""The typed experiment file: every fault is one line naming the fix, found before anything is planned or
trained; defaults are stated once; what differs by data source is the source's to say."""

import dataclasses
import importlib.util
import json
import re

import pytest
import yaml

from datamodules.sources import DataSource, SunsetSource
from experiments import runner
from experiments.spec import ROOT, Budget, ExperimentError, from_dict, load_experiment

SMOKE = ROOT / "experiments" / "smoke.yaml"


def smoke_with(tmp_path, change) -> str:
    """smoke.yaml with `change(dict)` applied, written to a temporary file."""
    exp = yaml.safe_load(SMOKE.read_text())
    change(exp)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return str(path)


def set_(path: str, value):
    """A change: set the dotted `path` (list items by index) to `value`."""
    def change(exp):
        *parents, last = path.split(".")
        node = exp
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return change


FAULTS = [
    (set_("budget.stepz", 3), "budget: unknown keys ['stepz']"),
    (set_("budget.steps", 0), "budget.steps: a whole number >= 1"),
    (set_("budget.val_images", None), "budget.train_images and budget.val_images: give both"),
    (set_("data", "nowhere"), "data: no configs/data/nowhere.yaml"),
    (set_("preset", "huge"), "preset: no configs/model/ar/huge.yaml"),
    (set_("models.raster.stage", "rastr"), "models.raster.stage: 'rastr' is not one of"),
    (set_("models.distill.init_from", "nobody"), "models.distill.init_from: name a model listed before it"),
    (set_("models.raster.init_from", "any_order"), "models.raster: init_from and extract are for stage distill"),
    (set_("arms.0.model", "nobody"), "arm 'raster AR': model 'nobody' is not one of models"),
    (set_("arms.0.sampler", {"policy": "rastr"}), "arm 'raster AR': sampler:"),
    (set_("arms.0.sampler", {"polisy": "raster"}), "arm 'raster AR': sampler:"),
    (set_("arms.0.sampler", {"policy": "confidence", "choice_temperature": "auto"}), "choice_temperature auto"),
    (set_("arms.1.name", "raster AR"), "arms: names must differ"),
    (set_("paired", [["raster AR", "nobody"]]), "paired: ['raster AR', 'nobody'] must name two arms"),
    (set_("tokenizer", "nowhere/tok.ckpt"), "tokenizer"),
    (set_("colour", "blue"), "unknown keys ['colour']"),
]


@pytest.mark.parametrize(("change", "said"), FAULTS, ids=[f[1][:40] for f in FAULTS])
def test_a_fault_anywhere_in_the_file_is_one_line_before_anything_runs(change, said, tmp_path):
    with pytest.raises(ExperimentError, match=None) as err:
        load_experiment(smoke_with(tmp_path, change), [])
    assert said in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit) as stop:  # the runner: that line, and nothing written
        runner.main([smoke_with(tmp_path, change), "--out", str(tmp_path / "runs")])
    assert str(stop.value.code).startswith("error: ") and said in str(stop.value.code)
    assert not (tmp_path / "runs").exists()


def test_a_pinned_file_with_other_content_is_refused_naming_both_hashes(tmp_path):
    tokenizer = tmp_path / "tok.ckpt"
    tokenizer.write_bytes(b"one tokenizer")
    with pytest.raises(ExperimentError, match="has sha256 .* not the pinned 0000.*--artefacts"):
        load_experiment(SMOKE, [f"tokenizer={{path: {tokenizer}, sha256: '{'0' * 64}'}}"])
    with pytest.raises(ExperimentError, match="tokenizer.sha256: 64 hex digits, in quotes"):
        load_experiment(SMOKE, [f"tokenizer={{path: {tokenizer}, sha256: {'0' * 64}}}"])  # YAML reads a number
    with pytest.raises(ExperimentError, match="feature_net .* not found"):
        load_experiment(SMOKE, [f"feature_net={{path: {tmp_path / 'none.pt'}}}"])


def test_budget_defaults_are_stated_once_and_recorded_whole():
    exp = load_experiment(SMOKE, [])
    assert exp.budget.sample_batch == Budget.sample_batch == 100 and exp.budget.sample_seed == 0  # not in smoke.yaml
    again = from_dict(json.loads(json.dumps(exp.as_dict())))  # experiment.json round trip
    assert again == exp and dataclasses.asdict(again.budget)["nll_images"] == 16


def test_the_data_source_says_how_a_split_of_given_sizes_is_made():
    """Sunsets are rendered at exactly train + val images; a fixed set keeps the first of a split and caps val."""
    assert SunsetSource.split_overrides({}, 30, 10) == {"source.init_args.num_images": 40, "val_fraction": 0.25}

    class Fixed(DataSource):
        def __init__(self, size: int):
            self.size = size

        def __len__(self) -> int:
            return self.size

    assert Fixed.split_overrides({"size": 100}, 60, 10) == {"val_fraction": 0.4, "max_val_images": 10}
    assert Fixed.split_overrides({"size": 100}, 95, 10) == {"val_fraction": 0.1, "max_val_images": 10}
    assert SunsetSource().scene_hues == 8 and SunsetSource.has_scenes()
    assert Fixed(1).scene_hues == 0 and not Fixed.has_scenes()


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "experiments").glob("*.yaml"))]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_the_docs_show_names_a_module_and_an_experiment_file_that_exist(doc):
    text = doc.read_text()
    quickstart = "python benchmarks/compare_orders.py --quick"  # the quickstart command, kept (a shim)
    assert "python benchmarks/" not in text.replace(quickstart, "") and "benchmarks/experiments/" not in text
    for module in re.findall(r"python -m ([\w.]+)", text):
        assert importlib.util.find_spec(module) is not None, module
    for name in re.findall(r"\bexperiments/(\w+\.yaml)", text):
        assert (ROOT / "experiments" / name).is_file(), name
