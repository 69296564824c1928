"""Evaluation callbacks under DDP and at the end of training; the FID callback removed from the command line.

The two-process test runs this file as a script (`python tests/test_eval_ddp.py OUT DEVICES BACKBONE`):
Lightning's DDP starts the second process by running the same command again. Each process records what
it generated and the metrics it holds, so the test compares them with a one-process run of the same script.
The CLI tests run the any-order stage config in-process with a tiny model and a custom FID feature
network (`tests.test_eval_callbacks.ColourStats`): no Inception weights exist here.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from lightning.pytorch import Callback, LightningDataModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks.fid import FIDCallback
from callbacks.lpips import LPIPSDiversityCallback
from callbacks.order_dump import OrderDumpCallback
from evaluation.distributed import share_chunk_size
from tests.conftest import REPO, SMALL_DATA, copy_run, fit, typed_in
from tests.ddp import ATTEMPTS, TIMEOUT_S, free_port, is_infrastructure_failure
from tests.test_eval_callbacks import ColourStats, FakeAR, FakeData, make_trainer, smooth_images

NUM_SAMPLES, BATCH = 12, 4  # 3 chunks of 4: two for one process, one for the other
RUN = Path("runs/any_order")


# ---- the script: a fit of a fake AR module with FID (+KID) and LPIPS every epoch, stopped by max_steps ---------
class RecordingAR(FakeAR):
    """Records every chunk it generates: (global step, generator seed, labels, images)."""

    def __init__(self):
        super().__init__(num_classes=3, kind="smooth")
        self.generated = []

    def generate(self, labels, generator=None, policy=None, choice_generator=None) -> dict:
        out = super().generate(labels, generator=generator, policy=policy, choice_generator=choice_generator)
        self.generated.append((self.trainer.global_step, generator.initial_seed(), labels.clone(), out["images"]))
        return out


class RandomRows(LightningDataModule):
    """32 rows: with `limit_train_batches=2` every epoch is 2 steps, on one process or two."""

    def _loader(self):
        return DataLoader(torch.randn(32, 4), batch_size=4)

    train_dataloader = val_dataloader = _loader

    def real_images(self, num: int, split: str = "val") -> torch.Tensor:
        return smooth_images(num, torch.Generator().manual_seed(1234))


class Recorder(Callback):
    """Saves `rank<R>.pt` in `out` when training ends: metrics after each validation and at the end, samples."""

    def __init__(self, out: str):
        self.out, self.metrics = Path(out), []

    def _record(self, trainer, when: str) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and k != "val/loss"}
        self.metrics.append((when, trainer.global_step, values))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "validation")

    def on_train_end(self, trainer, pl_module) -> None:  # after the metric callbacks' on_train_end
        self._record(trainer, "end")
        record = {"world_size": trainer.world_size, "metrics": self.metrics, "generated": pl_module.generated}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def script(out: str, devices: int, backbone: str) -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # a random backbone's activations decay into slow denormal floats
    warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
    callbacks = [
        FIDCallback(every_n_epochs=1, num_samples=NUM_SAMPLES, batch_size=BATCH, feature_extractor=ColourStats(),
                    kid=True),
        LPIPSDiversityCallback(every_n_epochs=1, samples_per_class=3, num_classes_to_eval=3, net_type="squeeze",
                               weights_path=backbone),
        Recorder(out),
    ]
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      max_steps=3, max_epochs=10, limit_train_batches=2, limit_val_batches=1, logger=False,
                      callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(RecordingAR(), datamodule=RandomRows())


# ---- (1) two processes share the samples and agree on the values of one process --------------------------------
def run_script(root: Path, devices: int, backbone: Path) -> list[dict]:
    """Run the script in a fresh folder on a fresh port; retried when the process group fails to start."""
    for attempt in range(1, ATTEMPTS + 1):
        out = root / f"attempt{attempt}"
        out.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
        command = [sys.executable, str(Path(__file__).resolve()), str(out), str(devices), str(backbone)]
        result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode == 0 or not is_infrastructure_failure(result.stderr, result.returncode):
            break
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def chunks_at(record: dict, step: int) -> dict[int, tuple]:
    """The chunks generated at a global step by FID (4 samples each), by generator seed."""
    return {seed: (labels, images) for s, seed, labels, images in record["generated"] if s == step
            and len(labels) == BATCH}


@pytest.mark.slow
def test_two_processes_share_the_samples_and_log_the_one_process_values(tmp_path):
    backbone = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), backbone)
    [single] = run_script(tmp_path / "one", 1, backbone)
    ranks = run_script(tmp_path / "two", 2, backbone)
    assert [r["world_size"] for r in ranks] == [2, 2]
    expected = single["metrics"]
    assert [(when, step) for when, step, _ in expected] == [("validation", 2), ("end", 3)]  # stopped mid-epoch
    assert len(chunks_at(single, 3)) == 3  # the end-of-training values come from fresh samples, not step 2's
    for when, _, values in expected:
        assert set(values) == {"val/fid", "val/kid", "val/lpips_diversity"}, (when, values)
        assert values["val/fid"] > 0
    for rank in ranks:  # every process holds every value, equal to the one-process value
        assert [(when, step) for when, step, _ in rank["metrics"]] == [("validation", 2), ("end", 3)]
        for (_, _, got), (_, _, want) in zip(rank["metrics"], expected, strict=True):
            assert got.keys() == want.keys()
            for name in want:
                assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
    for step in (2, 3):  # FID's samples: each process a share, together exactly the one-process samples
        shares = [chunks_at(rank, step) for rank in ranks]
        assert all(shares) and not set(shares[0]) & set(shares[1])
        union = shares[0] | shares[1]
        whole = chunks_at(single, step)
        assert sorted(union) == sorted(whole) and sum(len(labels) for labels, _ in union.values()) == NUM_SAMPLES
        for seed, (labels, images) in whole.items():
            assert torch.equal(union[seed][0], labels) and torch.equal(union[seed][1], images)


def test_share_chunk_size_gives_every_process_a_chunk():
    for world in range(1, 9):
        for num in range(world, 60):
            for batch in range(1, 12):
                size = share_chunk_size(num, batch, world)
                assert 1 <= size <= batch and -(-num // size) >= world, (num, batch, world)
    assert share_chunk_size(256, 64, 2) == 64 and share_chunk_size(256, 64, 8) == 32


# ---- (2) an evaluation at the final step is not repeated when training ends ------------------------------------
def test_an_evaluation_at_the_final_step_is_reused(tmp_path):
    fid = FIDCallback(every_n_epochs=1, num_samples=NUM_SAMPLES, batch_size=BATCH, feature_extractor=ColourStats())
    dump = OrderDumpCallback(every_n_epochs=1, num_samples=6)
    trainer = make_trainer(tmp_path, [fid, dump], max_epochs=1)
    model = RecordingAR()
    trainer.fit(model, datamodule=FakeData())
    assert [(step, len(labels)) for step, _, labels, _ in model.generated] == [(2, 4)] * 3 + [(2, 6)]  # once each
    assert "val/fid" in trainer.callback_metrics
    orders = Path(trainer.default_root_dir) / "orders"
    epoch, final = np.load(orders / "epoch_0.npz"), np.load(orders / "final.npz")
    assert all(np.array_equal(epoch[k], final[k]) for k in epoch.files if k != "epoch")  # the same samples


def test_no_final_evaluation_under_fast_dev_run(tmp_path):
    fid = FIDCallback(every_n_epochs=10, num_samples=NUM_SAMPLES, batch_size=BATCH, feature_extractor=ColourStats())
    trainer = Trainer(fast_dev_run=2, accelerator="cpu", callbacks=[fid, OrderDumpCallback(every_n_epochs=10)],
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    model = RecordingAR()
    trainer.fit(model, datamodule=FakeData())
    assert trainer.global_step == 2 and not model.generated and "val/fid" not in trainer.callback_metrics
    assert not (tmp_path / "orders").exists()


# ---- (3) through the CLI: FID and the order dump run when a max_steps fit ends; FID removable ---------------------
FID_ARGS = ("--fid.init_args.feature_extractor", "tests.test_eval_callbacks.ColourStats",
            "--fid.init_args.num_samples", "8", "--fid.init_args.batch_size", "8")
MAX_STEPS = ("--trainer.max_steps", "3", "--trainer.max_epochs", "5")  # 2 steps an epoch: stops mid-epoch 1


def scalar_steps(log_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_stage_configs_give_fid_its_own_key():
    for stage in ("any_order", "raster", "distill"):
        config = {**typed_in(stage, "fid"), **typed_in(stage, "trainer")}
        assert config["fid"]["class_path"] == "callbacks.fid.FIDCallback", stage
        assert not [c for c in config["trainer"]["callbacks"] if "FIDCallback" in c["class_path"]], stage


def test_fid_and_order_dump_run_when_a_max_steps_fit_ends(tokenizer_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    cli = fit("any_order", *MAX_STEPS, *FID_ARGS, "--fid.init_args.every_n_epochs", "10")
    assert cli.trainer.global_step == 3
    assert np.isfinite(float(cli.trainer.callback_metrics["val/fid"]))
    assert scalar_steps(RUN, "val/fid") == [3]  # not due in any epoch: only the end-of-training value
    dump = np.load(RUN / "orders" / "final.npz")
    assert int(dump["global_step"]) == 3 and dump["orders"].shape[0] == 16
    assert not list((RUN / "orders").glob("epoch_*.npz"))  # every_n_epochs 5 was never due


@pytest.mark.parametrize("switch", [("--fid", "null"), ("--fid.init_args.every_n_epochs", "0")])
def test_fid_removed_or_disabled_from_the_command_line(switch, tokenizer_run, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_run(tokenizer_run, tmp_path))
    cli = fit("any_order", *MAX_STEPS, *FID_ARGS, *switch)
    saved = yaml.safe_load((RUN / "config.yaml").read_text())
    fids = [c for c in cli.trainer.callbacks if isinstance(c, FIDCallback)]
    if switch[1] == "null":
        assert saved["fid"] is None and not fids
    else:
        assert saved["fid"]["init_args"]["every_n_epochs"] == 0 and len(fids) == 1
    assert "val/fid" not in cli.trainer.callback_metrics and scalar_steps(RUN, "val/fid") == []
    assert (RUN / "orders" / "final.npz").is_file()  # the rest of the run is unchanged


def test_stages_without_fid_build_no_fid_callback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = fit("tokenizer", *SMALL_DATA)
    assert not [c for c in cli.trainer.callbacks if c is None or isinstance(c, FIDCallback)]


if __name__ == "__main__":
    script(sys.argv[1], int(sys.argv[2]), sys.argv[3])
