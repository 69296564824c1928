"""A stopped sampling or editing job resumes from its finished batches (`fileio.batch_shards`): the rerun of the same
command computes only the batches still missing and writes the files an uninterrupted run writes; other settings
reuse nothing; a finished job leaves no shards behind. (The same under a stop signal: tests/test_stopping.py.)
"""

import json
import logging

import numpy as np
import pytest
import torch

from fileio.batch_shards import BatchShards
from lightning_modules.edit import EditModule
from lightning_modules.predict import SampleModule
from tests.conftest import QUIET, SMALL_DATA, STAGE1_CKPT, config, copy_run, predict, run_cli


# ---- the shard store ----------------------------------------------------------------------------------------------
def test_a_saved_batch_loads_back_under_the_same_key_only(tmp_path):
    shards = BatchShards(tmp_path / "parts", {"checkpoint": "abc", "sampler": {"cfg_scale": 1.0}})
    out = {"tokens": torch.arange(6).view(2, 3), "names": ["a.png", "b.png"]}
    assert shards.load({"seed": [0, 1]}) is None
    shards.save({"seed": [0, 1]}, out)
    back = shards.load({"seed": [0, 1]})
    assert torch.equal(back["tokens"], out["tokens"]) and back["names"] == out["names"]
    assert shards.load({"seed": [2, 3]}) is None  # another batch
    assert BatchShards(tmp_path / "parts", {"checkpoint": "abc", "sampler": {"cfg_scale": 2.0}}).load(
        {"seed": [0, 1]}) is None  # other settings
    made_from = json.loads((shards.folder / "made_from.json").read_text())
    assert made_from["sampler"] == {"cfg_scale": 1.0}
    assert not list(shards.folder.glob("*.tmp")) and not list(shards.folder.glob(".*"))


def test_a_damaged_shard_is_deleted_and_its_batch_computed_again(tmp_path, caplog):
    shards = BatchShards(tmp_path / "parts", {"k": 1})
    shards.save([4, 5], {"x": torch.ones(3)})
    (file,) = shards.folder.glob("batch-*.pt")
    file.write_bytes(file.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, logger="oar.shards"):
        assert shards.load([4, 5]) is None
    assert not file.exists() and "computed again" in caplog.text


def test_clear_removes_the_shards_and_an_empty_folder_only(tmp_path):
    mine, other = BatchShards(tmp_path / "parts", {"k": 1}), BatchShards(tmp_path / "parts", {"k": 2})
    mine.save([0], {"x": torch.zeros(1)})
    other.save([0], {"x": torch.zeros(1)})
    mine.clear()
    assert not mine.folder.exists() and other.folder.is_dir()  # another setting's shards stay
    other.clear()
    assert not (tmp_path / "parts").exists()


# ---- the jobs -----------------------------------------------------------------------------------------------------
class Stop(RuntimeError):
    pass


def count_batches(monkeypatch, module, stop_after: int | None = None) -> list:
    """Count the batches `module` computes (not those it loads); raise Stop after `stop_after` of them."""
    calls, original = [], module.run_batch

    def run_batch(self, batch):
        if stop_after is not None and len(calls) == stop_after:
            raise Stop("stopped")
        calls.append(1)
        return original(self, batch)

    monkeypatch.setattr(module, "run_batch", run_batch)
    return calls


SAMPLE = ("--data.init_args.num_samples", "6", "--data.init_args.batch_size", "2")  # 3 batches


def sample_files(folder) -> dict:
    data = np.load(folder / "runs" / "sample" / "samples.npz")
    return {k: data[k] for k in ("images", "tokens", "orders", "labels")}


def test_a_stopped_sampling_job_resumes_from_its_batches_and_writes_the_uninterrupted_samples(stage1_run, tmp_path,
                                                                                              monkeypatch):
    whole = copy_run(stage1_run, tmp_path / "whole")
    monkeypatch.chdir(whole)
    predict("sample", STAGE1_CKPT, *SAMPLE)
    assert not (whole / "runs" / "sample" / "samples.parts").exists()  # a finished job leaves no shards

    stopped = copy_run(stage1_run, tmp_path / "stopped")
    monkeypatch.chdir(stopped)
    with monkeypatch.context() as m:
        count_batches(m, SampleModule, stop_after=2)
        with pytest.raises(Stop):
            predict("sample", STAGE1_CKPT, *SAMPLE)
    assert len(list((stopped / "runs" / "sample" / "samples.parts").rglob("batch-*.pt"))) == 2
    assert not (stopped / "runs" / "sample" / "samples.npz").exists()

    with monkeypatch.context() as m:
        computed = count_batches(m, SampleModule)
        predict("sample", STAGE1_CKPT, *SAMPLE)  # the same command
    assert len(computed) == 1
    resumed, reference = sample_files(stopped), sample_files(whole)
    assert all(np.array_equal(resumed[k], reference[k]) for k in reference)
    assert not (stopped / "runs" / "sample" / "samples.parts").exists()


def test_other_sampler_settings_reuse_no_batch(stage1_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    with monkeypatch.context() as m:
        count_batches(m, SampleModule, stop_after=2)
        with pytest.raises(Stop):
            predict("sample", STAGE1_CKPT, *SAMPLE)
    with monkeypatch.context() as m:
        computed = count_batches(m, SampleModule)
        predict("sample", STAGE1_CKPT, *SAMPLE, "--model.init_args.sampler.temperature", "0.9")
    assert len(computed) == 3
    parts = tmp_path / "runs" / "sample" / "samples.parts"
    assert len(list(parts.rglob("batch-*.pt"))) == 2  # the first settings' shards stay for their own rerun


def test_a_stopped_editing_job_resumes_from_its_batches(stage1_run, tmp_path, monkeypatch):
    edit = ("predict", "--config", config("edit"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT,
            "--data.init_args.batch_size", "2", "--data.init_args.max_predict_images", "5")  # 3 batches
    whole = copy_run(stage1_run, tmp_path / "whole")
    monkeypatch.chdir(whole)
    run_cli(*edit)
    stopped = copy_run(stage1_run, tmp_path / "stopped")
    monkeypatch.chdir(stopped)
    with monkeypatch.context() as m:
        count_batches(m, EditModule, stop_after=1)
        with pytest.raises(Stop):
            run_cli(*edit)
    with monkeypatch.context() as m:
        computed = count_batches(m, EditModule)
        run_cli(*edit)
    assert len(computed) == 2
    resumed, reference = (np.load(f / "runs" / "edit" / "edits.npz") for f in (stopped, whole))
    for key in ("inputs", "masks", "outputs", "tokens", "step_maps", "index", "names"):
        assert np.array_equal(resumed[key], reference[key]), key
    assert not (stopped / "runs" / "edit" / "edits.parts").exists()
