"""The whole OAR chain from released models, on the converted tiny fixtures, through the public commands (issue 27):
convert -> tokenize an ImageNet-style folder -> sample (RandAR: confidence order; GPT: raster) -> extract orders ->
distill one step -> sample -> edit. The data is configs/data/imagenet.yaml on a folder of 30 tiny images in 10
class subfolders at 8 px (the fixture VQ's downsampling 2 gives the fixture GPT's 4x4 grid).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_net
from tests.conftest import QUIET, config, run_cli
from tests.test_pretrained import FIXTURES, TINY_AR, run_convert

NUM_CLASSES, PER_CLASS, SIZE = 10, 3, 8
DATA = ("--config", config("data/imagenet"), "--data.init_args.source.init_args.root", "images",
        "--data.init_args.source.init_args.image_size", str(SIZE), "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "4", "--data.init_args.val_fraction", "0.2")
CPU = ("--trainer.accelerator", "cpu")


def write_folder(root: Path) -> None:
    """10 class subfolders of 3 smooth 12x12 PNGs each (resized to 8x8 by the source)."""
    gen = np.random.default_rng(0)
    ramp = np.linspace(0, 1, 12)[:, None, None]
    for c in range(NUM_CLASSES):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            top, bottom = gen.uniform(0, 255, (2, 1, 1, 3))
            image = (top * (1 - ramp) + bottom * ramp).repeat(12, axis=1)
            Image.fromarray(image.round().astype(np.uint8)).save(folder / f"{i}.png")


def predict(stage: str, ckpt: Path, *extra):
    return run_cli("predict", "--config", config(stage), *DATA, *QUIET, *CPU, "--ckpt_path", ckpt, *extra)


def samples(folder: str) -> dict:
    with np.load(Path("runs") / folder / "samples.npz") as data:
        return {k: data[k] for k in data.files}


def test_released_models_run_the_whole_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "images")
    # 1. convert
    pre = Path("pretrained")
    run_convert(FIXTURES / "llamagen_vq_tiny.pt", pre / "vq.ckpt")
    run_convert(FIXTURES / "llamagen_gpt_tiny.pt", pre / "gpt.ckpt", "--tokenizer", pre / "vq.ckpt", *TINY_AR)
    run_convert(FIXTURES / "randar_tiny.safetensors", pre / "randar.ckpt", "--tokenizer", pre / "vq.ckpt", *TINY_AR)
    vq = load_net(pre / "vq.ckpt")

    # 2. sample from the converted RandAR (confidence order) and GPT (raster), before any token cache exists
    predict("sample", pre / "randar.ckpt", "--data.init_args.num_samples", "4")
    first = samples("sample")
    assert first["images"].shape == (4, SIZE, SIZE, 3) and first["tokens"].max() < vq.vocab_size
    decoded = vq.decode_indices(torch.from_numpy(first["tokens"]).long())  # the recorded tokenizer decodes them
    assert np.array_equal(first["images"], decoded.add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy())
    assert not Path("cache").exists()  # sampling reads no token cache
    predict("sample", pre / "gpt.ckpt", "--data.init_args.num_samples", "2", "--model.init_args.sampler.policy",
            "raster", "--trainer.logger.init_args.save_dir", "runs/sample_gpt")
    assert (samples("sample_gpt")["orders"].reshape(2, -1) == np.arange(16)).all()  # written in raster order

    # 3. tokenize the folder and extract the orders of every training image and its mirror image
    predict("extract_orders", pre / "randar.ckpt")
    [cache] = Path("cache").glob("tokens-*.pt")
    tokens = torch.load(cache, weights_only=True)["tokens"]
    assert tokens.shape == (NUM_CLASSES * PER_CLASS, 2, 4, 4)
    from datamodules.sources import ImageFolderSource

    source = ImageFolderSource("images", image_size=SIZE)
    images = torch.stack([source[i][0] for i in range(len(source))]).float() / 127.5 - 1
    assert torch.equal(tokens[:, 0].long(), vq.encode(images)) and torch.equal(tokens[:, 1].long(),
                                                                              vq.encode(images.flip(-1)))
    orders = torch.load("runs/extracted_orders/orders.pt", weights_only=True)
    done = orders["done"]
    assert done.sum() == 2 * 24  # 24 training images (val_fraction 0.2 of 30), two views each
    assert (orders["orders"][done].long().sort(-1).values == torch.arange(16)).all()  # permutations

    # 4. distill one step from the converted RandAR (init_from), then sample and edit with the result
    run_cli("fit", "--config", config("distill"), *DATA, *QUIET, *CPU, "--model.init_args.init_from",
            pre / "randar.ckpt", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--fid", "null")
    distilled = Path("runs/distill/checkpoints/last.ckpt")
    ckpt = torch.load(distilled, weights_only=True)
    assert ckpt["global_step"] == 1 and ckpt["tokenizer"]["path"] == str(pre / "vq.ckpt")
    predict("sample", distilled, "--data.init_args.num_samples", "4", "--trainer.logger.init_args.save_dir",
            "runs/sample_distilled")
    assert samples("sample_distilled")["images"].shape == (4, SIZE, SIZE, 3)
    predict("edit", distilled, "--data.init_args.max_predict_images", "2", "--model.init_args.edit.samples_per_image",
            "1")
    predict("edit", pre / "gpt.ckpt", "--data.init_args.max_predict_images", "2", "--model.init_args.sampler.policy",
            "raster", "--model.init_args.edit.samples_per_image", "1", "--trainer.logger.init_args.save_dir",
            "runs/edit_gpt")
    for folder in ("edit", "edit_gpt"):
        with np.load(Path("runs") / folder / "edits.npz") as edits:
            assert len(edits["inputs"]) == 2 and edits["outputs"].shape[-3:] == (SIZE, SIZE, 3)

    # 5. FID of N samples against reference statistics (here of a colour-statistics feature net, for speed)
    from tests.test_eval_callbacks import ColourStats

    real = torch.stack([source[i][0] for i in range(len(source))])
    features = ColourStats()(real).double().numpy()
    np.savez("ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    cli = run_cli("test", "--config", config("distill"), *DATA, *QUIET, *CPU, "--ckpt_path", distilled,
                  "--model.init_args.init_from", pre / "randar.ckpt", "--trainer.limit_test_batches", "1",
                  "--fid.init_args.num_samples", "12", "--fid.init_args.reference_stats", "ref.npz",
                  "--fid.init_args.feature_extractor", "tests.test_eval_callbacks.ColourStats")
    assert np.isfinite(float(cli.trainer.callback_metrics["test/fid"]))


@pytest.mark.parametrize("stage", ["sample", "edit"])
def test_converted_gpt_refuses_any_order_but_raster(tmp_path, monkeypatch, stage):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "images")
    run_convert(FIXTURES / "llamagen_vq_tiny.pt", "vq.ckpt")
    run_convert(FIXTURES / "llamagen_gpt_tiny.pt", "gpt.ckpt", "--tokenizer", "vq.ckpt", *TINY_AR)
    with pytest.raises(ValueError, match="only write in raster order, not confidence"):  # asked for explicitly
        predict(stage, Path("gpt.ckpt"), "--data.init_args.max_predict_images", "1",
                "--data.init_args.num_samples", "1", "--model.init_args.sampler.policy", "confidence")
    cli = predict(stage, Path("gpt.ckpt"), "--data.init_args.max_predict_images", "1",
                  "--data.init_args.num_samples", "1")  # policy auto: a raster model writes in raster order
    assert cli.model.sampler.policy == "raster"
