"""Zero-shot editing (issue 11): known cells per row in the decoding loop, the masks, class editing, the CLI.

The sampler tests pin the maths on the tiny net of tests/test_transformer.py: rows with different numbers
of known cells decode exactly as a cache-free recompute and as each row decoded alone, and known cells
never change. The CLI tests run `predict --config configs/edit.yaml` on the fixture pipeline.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_modules.editing import EditMasks, EditSettings, edit_classes, edit_images
from models.checkpoint import load_net
from models.masks import (
    border_cells,
    check_regenerated,
    generated_steps,
    image_mask_cells,
    random_cells,
    token_mask,
)
from models.orders import is_permutation, random_order, raster_order
from models.sampling import SamplerSettings, naive_confidence_sample, sample
from models.tokenizer import VQAutoencoder
from tests.conftest import QUIET, REPO, SMALL_DATA, STAGE1_CKPT, TOKENIZER_CKPT, config, copy_run, run_cli
from tests.test_transformer import CLASSES, GRID, VOCAB, N, tiny_net

COND = torch.tensor([0, 2, CLASSES, 1])  # the third row is unconditional


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


COUNTS = [(0, 3, 7, 12), (2, 5, 5, 9)]  # known cells per row: none in one row; or 2 for all (the prefill) and more


def uneven_known(counts: tuple[int, ...] = COUNTS[0], seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Known tokens (b, n) and a mask with counts[i] known cells, scattered, in row i."""
    tokens = torch.randint(0, VOCAB, (len(counts), N), generator=gen(seed))
    mask = torch.zeros(len(counts), N, dtype=torch.bool)
    for row, count in enumerate(counts):
        mask[row, random_order(1, N, gen(seed + row))[0, :count]] = True
    return tokens, mask


# ----------------------------------------------------------------------------- any mask per row
CASES = [
    ("confidence", "first", dict(cfg_scale=2.0)),
    ("confidence", "first", dict(choice_temperature=2.0, random_first=2, score="neg_entropy")),
    ("confidence", "first", dict(shortlist=3, refresh=4)),
    ("confidence", "first", dict(score="sampled", top_k=5)),
    ("random", "first", dict(cfg_scale=2.0)),
    ("random", "in_order", dict()),
    ("raster", "in_order", dict(cfg_scale=2.0)),
    ("raster", "first", dict()),
]


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("policy,placement,kwargs", CASES)
@pytest.mark.parametrize("next_pos,block", [("absolute", "gpt"), ("target_rope", "llama"), ("instruction", "llama")])
def test_uneven_known_cells_equal_the_naive_recompute(policy, placement, kwargs, counts, next_pos, block):
    """The KV-cached loop (prefill + per-row known steps) gives the tokens, order and logits of a full recompute."""
    net, (tokens, known) = tiny_net(next_pos, "rope", seed=1, block=block), uneven_known(counts)
    settings = SamplerSettings(policy, **kwargs)
    args = dict(known_tokens=tokens, known_mask=known, known_placement=placement)
    fast = sample(net, COND, settings, generator=gen(7), choice_generator=gen(8), return_logits=True, **args)
    slow = naive_confidence_sample(net, COND, settings, generator=gen(7), choice_generator=gen(8), **args)
    assert is_permutation(fast.order)
    assert torch.equal(fast.order, slow.order) and torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logits, slow.logits, atol=1e-4, rtol=0)
    assert torch.equal(fast.tokens[known], tokens[known])  # known cells are never changed
    if placement == "first":  # each row's known cells come first, in raster order
        for row, count in enumerate(known.sum(dim=1).tolist()):
            assert torch.equal(fast.order[row, :count], known[row].nonzero()[:, 0])


@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("policy,placement", [("confidence", "first"), ("given", "first"), ("given", "in_order")])
def test_uneven_masks_equal_a_per_row_loop(policy, placement, counts):
    """With greedy tokens and choices, each row of a batch with different masks decodes as that row alone."""
    net, (tokens, known) = tiny_net(seed=2), uneven_known(counts)
    order = random_order(len(COND), N, gen(5))
    settings = SamplerSettings(policy, top_k=1, cfg_scale=2.0)
    given = dict(order=order) if policy == "given" else {}
    batch = sample(net, COND, settings, known_tokens=tokens, known_mask=known, known_placement=placement, **given)
    for row in range(len(COND)):
        one = slice(row, row + 1)
        alone = sample(net, COND[one], settings, known_tokens=tokens[one], known_mask=known[one],
                       known_placement=placement, **({"order": order[one]} if given else {}))
        assert torch.equal(batch.tokens[one], alone.tokens) and torch.equal(batch.order[one], alone.order), row


def test_in_order_editing_is_teacher_forced_raster():
    """The raster baseline's edit: raster order, each known cell kept at its step, logits as the raster forward."""
    net, (tokens, known) = tiny_net(seed=3), uneven_known()
    out = sample(net, COND, "raster", generator=gen(), known_tokens=tokens, known_mask=known,
                 known_placement="in_order", return_logits=True)
    assert torch.equal(out.order, raster_order(len(COND), N))  # a masked cell sees only the known cells before it
    assert torch.equal(out.tokens[known], tokens[known])
    torch.testing.assert_close(out.logits, net(out.tokens, out.order, COND), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="fixed order"):
        sample(net, COND, "confidence", known_tokens=tokens, known_mask=known, known_placement="in_order")


# ------------------------------------------------------------------------------------------ masks
def test_masks_build_the_right_cells():
    grid, size = (8, 8), 32  # 4 pixels a cell
    cells = lambda mask: {tuple(c) for c in mask.nonzero().tolist()}  # noqa: E731
    block = lambda rows, cols: {(r, c) for r in rows for c in cols}  # noqa: E731
    assert cells(token_mask("center", grid, size)) == block(range(2, 6), range(2, 6))
    assert cells(token_mask("center", grid, size, center_fraction=0.25)) == block(range(3, 5), range(3, 5))
    assert cells(token_mask("left", grid, size)) == block(range(8), range(4))
    assert cells(token_mask("bottom", grid, size)) == block(range(4, 8), range(8))
    frame = border_cells(grid, 2)
    assert int(frame.sum()) == 64 - 16 and not frame[2:6, 2:6].any()
    assert cells(token_mask("box", grid, size, box=[0.25, 0.5, 0.5, 1.0])) == block(range(4, 8), range(2, 4))
    pixels = token_mask("box", grid, size, box=[8, 8, 16, 24], box_units="pixels")
    assert cells(pixels) == block(range(2, 6), range(2, 4))
    assert cells(token_mask("box", grid, size, box=[9, 9, 10, 10], box_units="pixels")) == {(2, 2)}  # covered in part


def test_random_and_image_masks():
    index = torch.tensor([3, 4, 3])
    masks = random_cells((8, 8), 0.25, seed=0, index=index)
    assert masks.flatten(1).sum(dim=1).tolist() == [16, 16, 16]
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])  # a function of (seed, index)
    assert torch.equal(random_cells((8, 8), 0.25, 0, index[1:2])[0], masks[1])  # whatever the batch
    assert not torch.equal(random_cells((8, 8), 0.25, 1, index)[0], masks[0])
    image = torch.zeros(32, 32, dtype=torch.uint8)
    image[5, 13] = 255  # one white pixel: its cell (1, 3) is regenerated
    image[20:28, 0:4] = 200
    assert {tuple(c) for c in image_mask_cells(image, (8, 8)).nonzero().tolist()} == {(1, 3), (5, 0), (6, 0)}


def test_generated_steps_rank_the_regenerated_cells():
    order = torch.tensor([[2, 0, 3, 1]])
    regenerate = torch.tensor([[False, True, True, False]])
    assert generated_steps(order, regenerate).tolist() == [[-1, 1, 0, -1]]


@pytest.mark.parametrize("build,words", [
    (lambda: token_mask("box", (8, 8), 32, box=[0.5, 0.5, 1.5, 1.5]), ["edit.box", "inside"]),
    (lambda: token_mask("box", (8, 8), 32, box=[0, 0, 40, 8], box_units="pixels"), ["edit.box", "32x32"]),
    (lambda: token_mask("box", (8, 8), 32, box=[0.1, 0.2]), ["edit.box", "[left, top, right, bottom]"]),
    (lambda: border_cells((8, 8), 4), ["edit.border", "1..3"]),
    (lambda: random_cells((8, 8), 0.001, 0, torch.zeros(1, dtype=torch.long)), ["edit.random_share"]),
    (lambda: image_mask_cells(torch.zeros(30, 30, dtype=torch.uint8), (8, 8)), ["30x30", "images' size"]),
    (lambda: check_regenerated(torch.zeros(1, 8, 8, dtype=torch.bool), "the mask"), ["no cell"]),
    (lambda: check_regenerated(torch.ones(1, 8, 8, dtype=torch.bool), "the mask"), ["every cell", "sample.yaml"]),
    (lambda: EditSettings(mask="circle"), ["edit.mask"]),
    (lambda: EditSettings(mask="image"), ["edit.mask_path"]),
    (lambda: EditSettings(samples_per_image=0), ["edit.samples_per_image"]),
    (lambda: EditSettings(known_cells="in_order").placement("confidence"), ["edit.known_cells", "policy"]),
    (lambda: EditMasks(EditSettings(mask="center", center_fraction=1.0), (8, 8), 32), ["edit.center_fraction"]),
])
def test_bad_mask_specs_give_one_line_errors(build, words):
    with pytest.raises(ValueError) as err:
        build()
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_mask_images_and_target_classes(tmp_path):
    settings = EditSettings(mask="image", mask_path=str(tmp_path))
    masks = EditMasks(settings, (8, 8), 32)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "full.png")
    half = np.zeros((32, 32), np.uint8)
    half[:, :16] = 255
    (tmp_path / "cats").mkdir()
    Image.fromarray(half).save(tmp_path / "cats" / "a.png")
    got = masks(torch.tensor([0]), ["cats/a.jpg"])  # matched by the path under the root, any extension
    assert got.shape == (1, 8, 8) and got[0, :, :4].all() and not got[0, :, 4:].any()
    with pytest.raises(FileNotFoundError, match="add .*b.png"):
        masks(torch.tensor([1]), ["b.jpg"])
    with pytest.raises(ValueError, match="every cell"):
        masks(torch.tensor([2]), ["full.jpg"])
    Image.fromarray(half[:16]).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="32x16 pixels, but the images are 32x32"):
        EditMasks(EditSettings(mask="image", mask_path=str(tmp_path / "small.png")), (8, 8), 32)
    labels, position = torch.tensor([1, 2, 0]), torch.tensor([0, 1, 2])
    assert torch.equal(edit_classes(EditSettings(), labels, position, 3, 3), labels)
    assert edit_classes(EditSettings(target_class=2), labels, position, 3, 3).tolist() == [2, 2, 2]
    assert edit_classes(EditSettings(target_class=[0, 1, 1]), labels, position[1:], 3, 3).tolist() == [1, 1]
    for target, words in ((5, "0..2"), ([0, 1], "2 classes for 3 images")):
        with pytest.raises(ValueError, match=words):
            edit_classes(EditSettings(target_class=target), labels, position, 3, 3)


def test_class_editing_changes_only_masked_cells():
    torch.manual_seed(0)
    tokenizer = VQAutoencoder(channels=16, channel_mult=(1, 2, 2), codebook_size=VOCAB, code_dim=8).eval()
    net = tiny_net(seed=4)  # a 4x4 grid of 16 codes: 16x16 images
    images = torch.randint(0, 256, (3, 3, 16, 16), generator=gen(), dtype=torch.uint8)
    regenerate = torch.zeros(3, *GRID, dtype=torch.bool)
    regenerate[0, 1:3, 1:3], regenerate[1, :, :2], regenerate[2, 0, 0] = True, True, True  # 4, 8, 1 cells
    settings = SamplerSettings("confidence", cfg_scale=3.0)
    edited = [edit_images(net, tokenizer, images, regenerate, torch.full((3,), c), settings, samples=2,
                          generator=gen(1), choice_generator=gen(2)) for c in (0, 2)]
    for out in edited:
        kept = (~regenerate)[:, None].expand(-1, 2, -1, -1)
        assert torch.equal(out["tokens"][kept], out["tokens_in"][:, None].expand(-1, 2, -1, -1)[kept])
        assert torch.equal(out["step_maps"] >= 0, regenerate[:, None].expand(-1, 2, -1, -1))
        assert out["outputs"].shape == (3, 2, 3, 16, 16) and out["outputs"].dtype == torch.uint8
    assert not torch.equal(edited[0]["tokens"], edited[1]["tokens"])  # the class changes the regenerated cells


# --------------------------------------------------------------------------------------------- CLI
def edit_cli(*extra):
    """`predict --config configs/edit.yaml` of the fixture's stage-1 model, in the current folder."""
    return run_cli("predict", "--config", config("edit"), *SMALL_DATA, *QUIET, "--ckpt_path", STAGE1_CKPT, *extra)


def test_edit_cli_writes_the_files(stage1_run, tmp_path, monkeypatch):
    folder = copy_run(stage1_run, tmp_path)
    monkeypatch.chdir(folder)
    edit_cli("--data.init_args.batch_size", "3", "--data.init_args.max_predict_images", "5",
             "--model.init_args.edit.target_class", "[1, 2, 3, 4, 5]", "--model.init_args.edit.mask", "random",
             "--model.init_args.edit.samples_per_image", "2")
    out = folder / "runs" / "edit"
    z = np.load(out / "edits.npz")
    assert z["inputs"].shape == (5, 32, 32, 3) and z["outputs"].shape == (5, 2, 32, 32, 3)
    assert z["masks"].shape == (5, 8, 8) and (z["masks"].reshape(5, -1).sum(1) == 32).all()
    assert z["target_classes"].tolist() == [1, 2, 3, 4, 5] and len(z["names"]) == 5
    tokenizer = load_net(folder / TOKENIZER_CKPT)
    tokens_in = tokenizer.encode(torch.from_numpy(z["inputs"]).permute(0, 3, 1, 2).float().div(127.5).sub(1))
    kept = ~torch.from_numpy(z["masks"])[:, None].expand(-1, 2, -1, -1)
    assert torch.equal(torch.from_numpy(z["tokens"])[kept], tokens_in[:, None].expand(-1, 2, -1, -1)[kept])
    assert json.loads(str(z["settings"]))["edit"]["mask"] == "random"
    assert (out / "edits_batch0.png").is_file() and (out / "edits_batch1.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())


def test_edit_cli_raster_baseline_keeps_known_cells_in_order(stage1_run, tmp_path, monkeypatch):
    folder = copy_run(stage1_run, tmp_path)
    monkeypatch.chdir(folder)
    edit_cli("--model.init_args.sampler.policy", "raster", "--model.init_args.edit.mask", "top",
             "--model.init_args.edit.samples_per_image", "1", "--data.init_args.max_predict_images", "2")
    z = np.load(folder / "runs" / "edit" / "edits.npz")
    assert json.loads(str(z["settings"]))["known_cells"] == "in_order"
    assert (z["step_maps"][:, 0, :4] == np.arange(32).reshape(4, 8)).all()  # the top half in raster order


def test_edit_cli_edits_a_folder_with_a_mask_per_image(stage1_run, tmp_path, monkeypatch):
    """Your own images: a folder (class subfolders, as the model's 8 classes), one mask each, matched by name."""
    folder = copy_run(stage1_run, tmp_path)
    monkeypatch.chdir(folder)
    rng = np.random.default_rng(0)
    for k in range(8):
        (folder / "photos" / f"c{k}").mkdir(parents=True)
        (folder / "masks" / f"c{k}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "photos" / f"c{k}" / "p.jpg")
        mask = np.zeros((32, 32), np.uint8)
        mask[: 4 * (1 + k % 7) - 1, :] = 255  # 1 + k % 7 rows of cells: masks of different sizes in one batch
        Image.fromarray(mask).save(folder / "masks" / f"c{k}" / "p.png")
    edit_cli("--config", config("data/folder"), "--data.init_args.source.init_args.root", "photos",
             "--data.init_args.predict_split", "images_all", "--model.init_args.edit.mask", "image",
             "--model.init_args.edit.mask_path", "masks", "--model.init_args.edit.samples_per_image", "1")
    z = np.load(folder / "runs" / "edit" / "edits.npz")
    assert z["names"].tolist() == [f"c{k}/p.jpg" for k in range(8)] and z["labels"].tolist() == list(range(8))
    assert z["masks"].reshape(8, -1).sum(axis=1).tolist() == [8 * (1 + k % 7) for k in range(8)]
    assert ((z["step_maps"][:, 0] >= 0) == z["masks"]).all()


@pytest.mark.parametrize("extra,words", [
    (("--model.init_args.edit.mask", "box", "--model.init_args.edit.box", "[0.5, 0.5, 1.5, 1.0]"), ["edit.box"]),
    (("--model.init_args.edit.mask", "border", "--model.init_args.edit.border", "4"), ["edit.border"]),
    (("--model.init_args.edit.target_class", "9"), ["edit.target_class", "0..7"]),
    (("--model.init_args.edit.mask", "image", "--model.init_args.edit.mask_path", "masks"), ["mask_path"]),
    (("--data.init_args.predict_split", "samples"), ["predict_split", "configs/edit.yaml"]),
])
def test_edit_cli_errors_name_the_key(stage1_run, tmp_path, monkeypatch, extra, words):
    monkeypatch.chdir(copy_run(stage1_run, tmp_path))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        edit_cli(*extra)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "runs" / "edit" / "edits.npz").exists()


def test_edit_cli_error_is_one_line(stage1_run, tmp_path):
    """As a user sees it: `python run.py predict ...` prints one `error:` line and no traceback."""
    folder = copy_run(stage1_run, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("OAR_TRACEBACK", None)
    args = ["predict", "--config", config("edit"), *SMALL_DATA, *QUIET, "--ckpt_path", str(STAGE1_CKPT),
            "--model.init_args.edit.mask", "random", "--model.init_args.edit.random_share", "1.0"]
    result = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=180)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "edit.random_share" in errors[0], errors[0]


# ------------------------------------------------------------------------------------ editing table
def test_editing_table_runs_on_tiny_checkpoints(stage1_run, tmp_path):
    from experiments import editing as editing_eval

    ckpt, out = stage1_run / STAGE1_CKPT, tmp_path / "table"
    table = editing_eval.main([
        "--tokenizer", str(stage1_run / TOKENIZER_CKPT), "--arm", "raster", str(ckpt), "policy=raster",
        "--arm", "confidence", str(ckpt), "policy=confidence", "choice_temperature=3", "--images", "6", "--batch", "4",
        "--masks", "center,border,class,clouds,hue", "--set", "data.init_args.source.init_args.num_images=64",
        "--set", "data.init_args.val_fraction=0.25", "--feature-epochs", "1", "--feature-images", "32",
        "--out", str(out), "--device", "cpu"])
    assert list(table["rows"]) == ["center", "border", "class", "clouds", "hue"]
    for kind, rows in table["rows"].items():
        assert list(rows) == ["raster", "confidence", editing_eval.CEILING, editing_eval.REAL]
        assert all(np.isfinite(rows[arm]["fid"]) and 0 <= rows[arm]["consistency"] <= 1 for arm in list(rows)[:3])
        assert ("mse" in rows["raster"]) == (kind not in ("hue", "class"))
        assert ("sun_is_target" in rows["raster"]) == (kind == "hue")
        assert ("target_class" in rows["raster"]) == (kind == "class")
    assert 0 <= table["rows"]["class"]["raster"]["target_class"] <= 1
    assert [a["known_cells"] for a in table["arms"]] == ["in_order", "first"]
    assert (out / "editing.md").is_file() and (out / "editing_hue.png").is_file()
    assert json.loads((out / "editing.json").read_text())["images"] == 6


def test_class_edit_regenerates_the_centre_box_under_the_next_class():
    from types import SimpleNamespace

    from experiments import editing as editing_eval

    labels = torch.tensor([0, 3, 9])
    source, indices = SimpleNamespace(image_size=32), torch.arange(3)
    cells, targets, usable = editing_eval.edit_masks("class", source, indices, labels, (8, 8), 10)
    centre, _, _ = editing_eval.edit_masks("center", source, indices, labels, (8, 8), 10)
    assert torch.equal(cells, centre) and cells[:, 2:6, 2:6].all() and cells.sum() == 3 * 16
    assert targets.tolist() == [1, 4, 0] and usable.all()
