"""Tables that can grow on any machine (issue 26, point 4): the shared artefacts published beside the results
and pinned by content, each stage's processor kind recorded, and a table that mixes kinds flagged."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from datamodules.sources import SunsetSource
from datamodules.token_cache import file_sha256
from evaluation.feature_cache import feature_net_for
from experiments import runner
from experiments.artefacts import publish_artefacts
from experiments.jobs import GivenFile
from experiments.machine import cpu_model, processor_kind
from experiments.plan import feature_net_path, plan
from experiments.report import write_report
from experiments.spec import ROOT, load_experiment

SMOKE = ROOT / "experiments" / "smoke.yaml"


def planned(tmp_path, *overrides):
    exp = load_experiment(SMOKE, list(overrides))
    jobs, _ = plan(exp, tmp_path / "runs" / exp.name, exp.seeds)
    return exp, {j.name: j for j in jobs}


def test_each_stage_records_its_processor_kind_in_done_json_and_experiment_json(tmp_path):
    exp, jobs = planned(tmp_path)
    jobs["raster (seed 0)"].command()  # a start: done.json (unfinished) with this machine's kind
    jobs["raster (seed 0)"].mark_finished(1.0)
    state = json.loads((jobs["raster (seed 0)"].folder / "done.json").read_text())
    assert state["processors"] == [processor_kind()] and state["finished"]
    root = tmp_path / "runs" / exp.name
    root.mkdir(parents=True, exist_ok=True)
    runner.record(exp, root, list(jobs.values()))
    stages = json.loads((root / "experiment.json").read_text())["stages"]
    assert stages["raster (seed 0)"]["processors"] == [processor_kind()] and stages["tokenizer"]["processors"] == []


def test_a_stage_forced_onto_cpu_processes_records_the_cpu_even_on_a_gpu_machine(tmp_path, monkeypatch):
    monkeypatch.setattr("experiments.jobs.processor_kind", lambda: "GPU Some Card")
    _, jobs = planned(tmp_path, "models.raster.processes=2")  # raster: DDP over two CPU processes
    assert jobs["raster (seed 0)"].processor() == cpu_model() != "GPU Some Card"
    assert jobs["any_order (seed 0)"].processor() == "GPU Some Card"


def test_published_artefacts_pin_the_next_run_by_content(tmp_path, capsys):
    exp, jobs = planned(tmp_path)
    root = tmp_path / "runs" / exp.name
    tokenizer, features = jobs["tokenizer"].product, feature_net_path(exp, root.parent)
    for path, content in ((tokenizer, b"tokenizer weights"), (features, b"feature network")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    exp.stages = {"tokenizer": {"processors": ["CPU kind A"]}, "rows": {"processors": ["CPU kind A"]}}
    manifest = publish_artefacts(exp, root, tmp_path / "results" / "smoke")
    assert manifest["tokenizer"]["sha256"] == file_sha256(tokenizer) and manifest["tokenizer"]["bytes"] == 17
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("tokenizer:", "feature_net:"))]
    pins = yaml.safe_load("\n".join(printed))  # the lines to paste into the experiment file
    assert set(pins) == {"tokenizer", "feature_net"} and all(len(p["sha256"]) == 64 for p in pins.values())
    sets = [f"{what}={{path: {p['path']}, sha256: '{p['sha256']}'}}" for what, p in pins.items()]
    pinned, pinned_jobs = planned(tmp_path / "elsewhere", *sets)
    given = pinned_jobs["tokenizer"]
    assert isinstance(given, GivenFile) and given.finished() and given.processors() == ["CPU kind A"]
    assert given.product.read_bytes() == b"tokenizer weights"
    assert feature_net_path(pinned, tmp_path / "elsewhere") == tmp_path / "results" / "smoke" / "artefacts" / \
        "feature_net.pt"
    assert pinned_jobs["raster (seed 0)"].key() != jobs["raster (seed 0)"].key()  # keyed by the pinned content


def test_a_pinned_feature_network_that_does_not_fit_the_data_stops_instead_of_retraining(tmp_path):
    source = SunsetSource(num_images=16, image_size=16)
    dm = SimpleNamespace(source=source, split_indices=lambda: (torch.arange(8), torch.arange(8, 16)))
    path, check = tmp_path / "features.pt", torch.arange(8, 12)
    feature_net_for(dm, path, epochs=1, feature_images=16, check=check)
    before = path.read_bytes()
    feature_net_for(dm, path, epochs=1, feature_images=16, check=check, pinned=True)  # fits: used as it is
    with pytest.raises(ValueError, match=r"pinned feature network .* \(its epochs differ\)"):
        feature_net_for(dm, path, epochs=2, feature_images=16, check=check, pinned=True)
    assert path.read_bytes() == before  # never trained again over the published file


def write_run(root, stages: dict) -> None:
    exp = {"name": "e", "seeds": [0], "budget": {"samples": 10, "steps": 4}, "data": "synthetic", "preset": "tiny",
           "models": {"m": {"stage": "any_order"}}, "arms": [{"name": "a", "model": "m"}], "stages": stages}
    (root / "seed0" / "eval").mkdir(parents=True)
    (root / "experiment.json").write_text(json.dumps(exp))
    rows = {"rows": {"real images (reference)": {"fid": 2.0}}, "feature_name": "f"}
    (root / "rows.json").write_text(json.dumps(rows))
    (root / "seed0" / "eval" / "m.json").write_text(json.dumps({"metrics": {"a": {"fid": 5.0}}, "step": None}))


@pytest.mark.parametrize("kinds", [["AMD EPYC (AVX512-BF16)"], ["AMD EPYC (AVX512-BF16)", "Intel Xeon (AMX)"]])
def test_the_report_flags_a_table_whose_stages_ran_on_more_than_one_processor_kind(kinds, tmp_path):
    stages = {"tokenizer": {"processors": kinds[:1]}, "m (seed 0)": {"processors": kinds[-1:]}}
    write_run(tmp_path, stages)
    result = write_report(tmp_path, "cmd")
    text = (tmp_path / "report.md").read_text()
    assert ("more than one processor kind" in text) == (len(kinds) > 1)
    assert f"{kinds[-1]} ({3 - len(kinds)} stages)" in text and result["stage_processors"]["tokenizer"] == kinds[:1]
