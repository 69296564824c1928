"""Tokenizer stage: quantizer maths, network shapes, checkpoint round trip, Lightning plumbing."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from callbacks.reconstructions import ReconstructionGrid
from lightning_modules.tokenizer import TokenizerModule
from models.checkpoint import load_net
from models.discriminator import PatchDiscriminator
from models.quantizer import VectorQuantizer
from models.tokenizer import VQAutoencoder
from tests.ddp import with_retries

# The tests run the "tiny" size preset itself.
PRESET = Path(__file__).parents[1] / "configs/model/tokenizer/tiny.yaml"
TINY = yaml.safe_load(PRESET.read_text())["model"]["init_args"]["net"]["init_args"]


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields in [-1, 1], (n,3,size,size)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


class ImageDicts(Dataset):
    """Image-mode batches as the DataModule yields them (see docs/DESIGN.md)."""

    def __init__(self, n: int = 8, size: int = 32) -> None:
        self.images = smooth_images(n, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": torch.tensor(0), "index": torch.tensor(i)}


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("kind", ["l2", "ema"])
def test_quantizer_indices_in_range(kind):
    q = VectorQuantizer(64, 8, kind=kind)
    z = torch.randn(2, 8, 4, 4)
    for train in (True, False):
        q.train(train)
        out = q(z)
        assert out.indices.shape == (2, 4, 4) and out.quantized.shape == z.shape
        assert 0 <= out.indices.min() and out.indices.max() < 64
        assert out.usage.shape == (64,) and out.usage.sum() == 32
        assert 1.0 <= out.perplexity <= 64.0
    torch.testing.assert_close(q.lookup(out.indices), out.quantized)
    assert torch.equal(q.nearest(z), out.indices)


@pytest.mark.parametrize("kind", ["l2", "ema"])
def test_straight_through_reaches_encoder(kind):
    net = VQAutoencoder(**TINY, quantizer=kind)
    x = smooth_images(2)
    F.mse_loss(net(x).recon, x).backward()
    assert net.encoder.layers[0].weight.grad.abs().sum() > 0
    codebook_grad = net.quantizer.codebook.weight.grad if kind == "l2" else None
    assert codebook_grad is None  # the reconstruction loss alone never trains the codes


def test_l2_codebook_loss_trains_codes():
    q = VectorQuantizer(16, 4, kind="l2")
    out = q(torch.randn(2, 4, 3, 3))
    (out.codebook_loss + out.commit_loss).backward()
    assert q.codebook.weight.grad.abs().sum() > 0


def test_ema_codebook_updates_only_in_training():
    q = VectorQuantizer(16, 4, kind="ema", restart_dead_codes=False)
    z = torch.randn(4, 4, 3, 3)
    before = q.codebook.weight.clone()
    q.eval()
    q(z)
    assert torch.equal(q.codebook.weight, before)
    q.train()
    q(z)
    assert not torch.equal(q.codebook.weight, before)


def test_dead_code_restart_replaces_unused_code():
    q = VectorQuantizer(16, 4, kind="l2")
    q.usage_ema.fill_(1.0)
    q.usage_ema[3] = 0.0  # code 3 was never used
    z = torch.randn(2, 4, 3, 3)
    before = q.codebook.weight.clone()
    q.eval()
    q(z)
    assert torch.equal(q.codebook.weight, before)  # no restarts outside training
    q.train()
    q(z)
    changed = (q.codebook.weight != before).any(dim=1)
    assert changed.tolist() == [i == 3 for i in range(16)]
    # The new code is one of the batch's (normalised) encoder vectors.
    batch = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    assert torch.cdist(q.codebook.weight[3:4], batch).min() < 1e-5


@pytest.mark.parametrize("channel_mult,downsample", [((1, 2, 2), 4), ((1, 2, 2, 2), 8), ((1, 1, 2, 2, 2), 16)])
def test_encode_decode_shapes(channel_mult, downsample):
    net = VQAutoencoder(**{**TINY, "channel_mult": channel_mult}).eval()
    assert net.downsample == downsample and net.vocab_size == 64
    x = smooth_images(2, size=32)
    h, w = net.grid_size(32)
    assert (h, w) == (32 // downsample, 32 // downsample) == net.grid_size((32, 32))
    tokens = net.encode(x)
    assert tokens.shape == (2, h, w) and tokens.dtype == torch.long
    images = net.decode_indices(tokens)
    assert images.shape == x.shape and images.abs().max() <= 1
    assert net(x).recon.shape == x.shape
    with pytest.raises(ValueError):
        net.grid_size(30)


def test_checkpoint_round_trip(tmp_path):
    net = VQAutoencoder(**{**TINY, "channel_mult": (1, 2)}, quantizer="ema")
    net.train()(smooth_images(4))  # move the EMA buffers away from their initial values
    module = TokenizerModule(net)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["net_spec"]["init_args"]["channel_mult"] == [1, 2]
    torch.save(ckpt, tmp_path / "tok.ckpt")
    loaded = load_net(tmp_path / "tok.ckpt")
    net.eval()
    x = smooth_images(2, seed=1)
    tokens = net.encode(x)
    assert torch.equal(loaded.encode(x), tokens)
    torch.testing.assert_close(loaded.decode_indices(tokens), net.decode_indices(tokens))


@pytest.mark.parametrize("gan_weight", [0.0, 0.1])
def test_module_fast_dev_run(gan_weight):
    disc = PatchDiscriminator(channels=8, num_layers=2)
    module = TokenizerModule(VQAutoencoder(**TINY), gan_weight=gan_weight, discriminator=disc, gan_start_step=0)
    disc_before = [p.clone() for p in disc.parameters()]
    loader = DataLoader(ImageDicts(8), batch_size=4)
    # Not fast_dev_run=2: its max_steps=2 would end the GAN run after one batch, before validation,
    # because under manual optimisation Lightning counts generator and discriminator steps.
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader, loader)
    assert module.automatic_optimization == (gan_weight == 0)
    assert trainer.global_step == (2 if gan_weight == 0 else 4)
    disc_moved = any(not torch.equal(a, b) for a, b in zip(disc_before, disc.parameters(), strict=True))
    assert disc_moved == (gan_weight > 0)
    metrics = trainer.callback_metrics
    for name in (
        "train/loss",
        "val/loss",
        "val/rec_loss",
        "val/psnr",
        "val/perplexity",
        "val/codebook_usage",
    ):
        assert torch.isfinite(metrics[name]), name
    assert 0 < metrics["val/codebook_usage"] <= 1


def test_lpips_without_weights_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="perceptual_weight: 0"):
        TokenizerModule(VQAutoencoder(**TINY), perceptual_weight=1.0, lpips_weights_path=str(tmp_path / "no.pth"))


def test_reconstruction_grid_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = TokenizerModule(VQAutoencoder(**TINY))
    loader = DataLoader(ImageDicts(8), batch_size=4)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        enable_checkpointing=False,
        callbacks=[ReconstructionGrid(num_images=3)],
    )
    trainer.fit(module, loader, loader)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "val/reconstructions" in events.Tags()["images"]
    image = events.Images("val/reconstructions")[0]
    assert image.width > image.height  # one row of originals above one row of reconstructions


@pytest.mark.slow
def test_tiny_tokenizer_overfits():
    torch.manual_seed(0)
    net = VQAutoencoder(**TINY)
    x = smooth_images(8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(200):
        out = net(x)
        loss = F.mse_loss(out.recon, x) + F.l1_loss(out.recon, x) + out.commit_loss + out.codebook_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    mse = F.mse_loss((net.decode_indices(net.encode(x)) + 1) / 2, (x + 1) / 2)
    assert 10 * math.log10(1 / mse.item()) > 25


def _ddp_quantizer_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for kind in ("l2", "ema"):
        torch.manual_seed(0)  # same initial codebook on both ranks, as DDP guarantees
        q = VectorQuantizer(32, 4, kind=kind).train()
        q.usage_ema.fill_(1.0)
        q.usage_ema[:4] = 0.0  # four dead codes to restart
        torch.manual_seed(rank)  # each rank sees different data and draws different restart picks
        for _ in range(3):
            q(torch.randn(2, 4, 3, 3))
        torch.save(q.state_dict(), f"{out_dir}/{kind}-rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_quantizer_buffers_identical_across_ddp_ranks(tmp_path):
    def spawn(folder):
        torch.multiprocessing.spawn(_ddp_quantizer_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2)

    folder = with_retries(spawn, tmp_path)
    for kind in ("l2", "ema"):
        state0, state1 = (torch.load(folder / f"{kind}-rank{r}.pt") for r in range(2))
        for key in state0:
            assert torch.equal(state0[key], state1[key]), f"{kind}: {key}"
