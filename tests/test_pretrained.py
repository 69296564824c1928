"""Released checkpoints imported exactly (issue 27): the converted LlamaGen VQ, LlamaGen GPT and RandAR reproduce every
output the reference code recorded in tests/fixtures/pretrained (floats to 1e-5, indices exactly; see its README),
and the conversion maps every key of the full-size releases to a parameter of the same shape, exactly once.

The fixtures are tiny, randomly initialised models in the release formats, made with the reference implementations
(LlamaGen ce98ec4, RandAR d374a72); copied from ../shared/fixtures/pretrained.
"""

import argparse
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from datamodules.token_cache import file_sha256
from models.checkpoint import load_net, read_checkpoint
from models.llamagen_vq import LlamaGenVQ
from models.positions import CLASS_CELL
from models.transformer import OrderedTransformer
from tools import convert
from tools.pretrained import PRESETS, ConversionError, gpt_init_args, map_keys, read_release, vq_init_args

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
ATOL = 1e-5  # the fixtures' tolerance: the reference's own spread over back-ends is <= 2.1e-6
TINY_AR = ("--heads", "4", "--image-size", "8")  # 4 heads (no shape holds them); 8 px / downsample 2 = the 4x4 grid


def io(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}_io.pt", weights_only=True)


def run_convert(source: Path, output: Path, *extra) -> dict:
    return convert.main([str(source), str(output), *map(str, extra)])


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The three fixtures converted with `python -m tools.convert`'s code: {"vq", "gpt", "randar"} -> checkpoint."""
    out = tmp_path_factory.mktemp("converted")
    run_convert(FIXTURES / "llamagen_vq_tiny.pt", out / "vq.ckpt")
    run_convert(FIXTURES / "llamagen_gpt_tiny.pt", out / "gpt.ckpt", "--tokenizer", out / "vq.ckpt", *TINY_AR)
    run_convert(FIXTURES / "randar_tiny.safetensors", out / "randar.ckpt", "--tokenizer", out / "vq.ckpt", *TINY_AR)
    return {name: out / f"{name}.ckpt" for name in ("vq", "gpt", "randar")}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= ATOL


# ---- exactness -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_vq_reproduces_every_recorded_output(converted):
    net, ref = load_net(converted["vq"]), io("llamagen_vq_tiny")
    assert isinstance(net, LlamaGenVQ) and not net.training
    encoder_out = net.encoder(ref["images"])
    assert_close(encoder_out, ref["encoder_out"])
    assert_close(net.quant_conv(encoder_out), ref["pre_quant"])
    assert torch.equal(net.encode(ref["images"]), ref["indices"])
    assert_close(net.quantize.lookup(ref["indices"]), ref["quant"])
    assert_close(net.decode_raw(ref["indices"]), ref["decoded"])
    assert torch.equal(net.decode_indices(ref["indices"]), net.decode_raw(ref["indices"]).clamp(-1, 1))
    assert net.vocab_size == 64 and net.downsample == 2 and net.grid_size(32) == (16, 16)


@torch.no_grad()
def test_gpt_reproduces_the_recorded_logits(converted):
    net, ref = load_net(converted["gpt"]), io("llamagen_gpt_tiny")
    b, n = ref["tokens"].shape
    raster = torch.arange(n).expand(b, n)
    assert_close(net(ref["tokens"], raster, ref["labels"]), ref["logits_cond"])
    null = torch.full_like(ref["labels"], net.null_class)
    assert_close(net(ref["tokens"], raster, null), ref["logits_uncond"])
    # the KV-cached path (prefill of every step at once) gives the same logits
    cache = net.new_cache(ref["labels"])
    prev_cells = torch.cat([torch.full((b, 1), CLASS_CELL), raster[:, :-1]], 1)
    logits = net.extend(cache, ref["tokens"].gather(1, prev_cells.clamp(min=0)), prev_cells, raster)
    assert_close(logits, ref["logits_cond"])


@torch.no_grad()
def test_randar_reproduces_logits_under_both_orders_and_the_null_class(converted):
    net, ref = load_net(converted["randar"]), io("randar_tiny")
    assert net.next_pos.slots_per_step == 2
    for j in range(ref["orders"].shape[1]):  # order 1 of images 0 / 1 is raster / reversed raster
        assert_close(net(ref["tokens"], ref["orders"][:, j], ref["labels"]), ref["logits_orders"][:, j])
    null = torch.full_like(ref["labels"], net.null_class)
    assert_close(net(ref["tokens"], ref["orders"][:, 0], null), ref["logits_uncond_order0"])


@torch.no_grad()
def test_randar_scores_every_candidate_after_the_prefix(converted):
    """cand_logits[b, m]: cell cand_cells[b, m] written right after the first k cells of order 0, by a teacher-forced
    forward (the candidate moved to step k) and by `score_candidates` against the KV cache of the prefix."""
    net, ref = load_net(converted["randar"]), io("randar_tiny")
    k, order, tokens = int(ref["prefix_len"]), ref["orders"][:, 0], ref["tokens"]
    cells, expected = ref["cand_cells"], ref["cand_logits"]
    b, m = cells.shape
    for i in range(m):
        rest = [torch.tensor([c for c in order[r, k:].tolist() if c != cells[r, i]]) for r in range(b)]
        moved = torch.stack([torch.cat([order[r, :k], cells[r, i : i + 1], rest[r]]) for r in range(b)])
        assert_close(net(tokens, moved, ref["labels"])[:, k], expected[:, i])
    cache = net.new_cache(ref["labels"])
    prev_cells = torch.cat([torch.full((b, 1), CLASS_CELL), order[:, : k - 1]], 1)
    net.extend(cache, tokens.gather(1, prev_cells.clamp(min=0)), prev_cells, order[:, :k])
    logits, _ = net.score_candidates(cache, tokens.gather(1, order[:, k - 1 : k])[:, 0], order[:, k - 1], cells)
    assert_close(logits, expected)


# ---- the full-size releases ------------------------------------------------------------------------------------------
MANIFEST_PRESETS = {"llamagen_vq16": "vq16", "llamagen_gpt_b": "gpt-b", "llamagen_gpt_l": "gpt-l",
                    "randar_l": "randar-l", "randar_xl": "randar-xl"}


@pytest.mark.parametrize("name", sorted(MANIFEST_PRESETS))
def test_full_size_release_maps_every_key_once_with_its_shape(name):
    """Built on the meta device (no memory): every release key lands on a parameter of the same shape, each
    parameter gets exactly one, and only `quantize.codebook_used` is dropped."""
    manifest = json.loads((FIXTURES / "full_size_manifests.json").read_text())[name]
    shapes = {k: tuple(v) for k, v in manifest["keys"].items()}
    assert len(shapes) == manifest["num_keys"]
    preset = PRESETS[MANIFEST_PRESETS[name]]
    if preset["kind"] == "vq":
        init_args, cls = vq_init_args(shapes), LlamaGenVQ
        assert init_args == {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "codebook_size": 16384,
                             "code_dim": 8, "num_res_blocks": 2}
    else:
        init_args, cls = gpt_init_args(shapes, None, (16, 16)), OrderedTransformer  # heads from the width
        assert (init_args["width"], init_args["depth"], init_args["heads"]) == tuple(
            preset[k] for k in ("width", "depth", "heads"))
        assert init_args["num_classes"] == 1000 and init_args["vocab_size"] == 16384
    with torch.device("meta"):
        net = cls(**init_args)
    net_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    mapping, dropped = map_keys(shapes, preset["kind"], net_shapes)
    assert dropped == (["quantize.codebook_used"] if preset["kind"] == "vq" else [])
    assert sorted(mapping.values()) == sorted(net_shapes) and len(set(mapping.values())) == len(mapping)
    assert set(mapping) | set(dropped) == set(shapes)
    elements = sum(math.prod(s) for s in shapes.values())
    assert elements == manifest["num_elements"]
    assert sum(p.numel() for p in net.state_dict().values()) == elements - sum(math.prod(shapes[k]) for k in dropped)


# ---- the converted checkpoints are the project's own format ----------------------------------------------------------
def test_converted_checkpoints_record_their_network_tokenizer_and_source(converted):
    from lightning.pytorch import LightningModule

    from lightning_modules.any_order import AnyOrderModule

    assert issubclass(AnyOrderModule, LightningModule)
    assert convert.AR_MODULE == f"{AnyOrderModule.__module__}.{AnyOrderModule.__qualname__}"
    vq = read_checkpoint(converted["vq"])
    assert vq["net_spec"]["class_path"] == "models.llamagen_vq.LlamaGenVQ"
    assert vq["converted_from"]["dropped"] == ["quantize.codebook_used"]
    assert vq["converted_from"]["sha256"] == file_sha256(FIXTURES / "llamagen_vq_tiny.pt")
    for name, order, next_pos in (("gpt", "raster", "none"), ("randar", "random", "instruction")):
        ckpt = read_checkpoint(converted[name])  # weights_only: plain data throughout
        assert ckpt["tokenizer"] == {"path": str(converted["vq"]), "sha256": file_sha256(converted["vq"])}
        assert ckpt["net_spec"]["init_args"]["next_pos"] == next_pos
        hp = ckpt["hyper_parameters"]
        assert hp["_class_path"] == convert.AR_MODULE and hp["train_order"] == order
        assert hp["net"] == ckpt["net_spec"] and hp["tokenizer_ckpt"] == str(converted["vq"])
        assert ckpt["trained"] == {"stage": "AnyOrderModule", "train_order": order, "choice_temperature": 3.0}
        tokenizer = {k[len("tokenizer."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("tokenizer.")}
        assert all(torch.equal(v, vq["state_dict"][f"net.{k}"]) for k, v in tokenizer.items())
        assert len(tokenizer) == len(vq["state_dict"])


def test_release_container_with_training_state_is_read_as_data(tmp_path):
    """LlamaGen's training checkpoints hold {"model", "optimizer", "steps", "args": argparse.Namespace}: the
    Namespace is the one object allowed; the other entries are listed as not read."""
    state = torch.load(FIXTURES / "llamagen_gpt_tiny.pt", weights_only=True)["model"]
    path = tmp_path / "train.pt"
    torch.save({"model": state, "optimizer": {"state": {}}, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, path)
    weights, not_read = read_release(path)
    assert set(weights) == set(state) and not_read == ["args", "optimizer", "steps"]


# ---- bad files: one line naming the fix ------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage", ["truncated_safetensors", "truncated_pt", "text", "code", "empty_dict"])
def test_damaged_or_foreign_release_files_are_refused(tmp_path, damage):
    path = tmp_path / "release.bin"
    if damage == "truncated_safetensors":
        path.write_bytes((FIXTURES / "randar_tiny.safetensors").read_bytes()[:5000])
    elif damage == "truncated_pt":
        path.write_bytes((FIXTURES / "llamagen_gpt_tiny.pt").read_bytes()[:100_000])
    elif damage == "text":
        path.write_text("not a checkpoint\n")
    elif damage == "code":
        path.write_bytes(pickle.dumps({"model": Payload()}))
    else:
        torch.save({"model": {}}, path)
    with pytest.raises(ValueError) as err:
        run_convert(path, tmp_path / "out.ckpt")
    message = one_line(err)
    assert str(path) in message or damage == "empty_dict"
    assert "LlamaGen" in message and not (tmp_path / "out.ckpt").exists()


def randar_state() -> dict:
    return load_file(FIXTURES / "randar_tiny.safetensors")


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.update({"extra.weight": torch.zeros(3)}), "extra.weight maps to no weight"),
    (lambda s: s.pop("layers.1.ffn_norm.weight"), "blocks.1.norm2.weight gets no weight from the file"),
    (lambda s: s.update({"norm.weight": torch.ones(65)}), "norm.weight has shape (65,)"),
])
def test_a_key_that_does_not_map_exactly_once_is_named(tmp_path, converted, edit, expected):
    state = randar_state()
    edit(state)
    save_file(state, tmp_path / "edited.safetensors")
    with pytest.raises(ConversionError) as err:
        run_convert(tmp_path / "edited.safetensors", tmp_path / "out.ckpt", "--tokenizer", converted["vq"], *TINY_AR)
    assert expected in one_line(err)


def test_ar_conversion_checks_tokenizer_preset_and_heads(tmp_path, converted):
    source, out = FIXTURES / "randar_tiny.safetensors", tmp_path / "out.ckpt"
    with pytest.raises(ConversionError, match="pass --tokenizer"):
        run_convert(source, out, *TINY_AR)
    with pytest.raises(ConversionError, match="give the number of attention heads with --heads"):
        run_convert(source, out, "--tokenizer", converted["vq"], "--image-size", "8")
    with pytest.raises(ConversionError, match="--preset randar-l expects width 1024, depth 24") as err:
        run_convert(source, out, "--tokenizer", converted["vq"], "--preset", "randar-l", "--image-size", "8")
    one_line(err)
    with pytest.raises(ConversionError, match="names a gpt checkpoint"):
        run_convert(source, out, "--tokenizer", converted["vq"], "--preset", "gpt-b")
    with pytest.raises(ConversionError, match="not a multiple of the tokenizer's downsampling 2"):
        run_convert(source, out, "--tokenizer", converted["vq"], "--heads", "4", "--image-size", "7")
    state = randar_state()
    state["tok_embeddings.weight"] = torch.cat([state["tok_embeddings.weight"]] * 2)
    state["output.weight"] = torch.cat([state["output.weight"]] * 2)
    save_file(state, tmp_path / "vocab128.safetensors")
    with pytest.raises(ConversionError, match="vocabulary of 128 tokens, tokenizer .* 64"):
        run_convert(tmp_path / "vocab128.safetensors", out, "--tokenizer", converted["vq"], *TINY_AR)
    assert not out.exists()


@pytest.mark.slow  # a fresh interpreter imports torch and timm: ~5 s of CPU
def test_command_line_prints_one_line_errors(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "tools.convert", str(tmp_path / "missing.pt"), str(tmp_path / "o")],
                            cwd=repo, capture_output=True, text=True, env={"PYTHONPATH": str(repo), "PATH": ""})
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: released checkpoint") and "not found" in result.stderr


@torch.no_grad()
@pytest.mark.parametrize("policy, extra", [("raster", {}), ("random", {}), ("confidence", {}),
                                           ("confidence", {"shortlist": 3, "refresh": 4}),
                                           ("confidence", {"choice_temperature": 3.0, "cfg_scale": 2.0})])
def test_converted_randar_samples_under_every_policy(converted, policy, extra):
    from models.sampling import SamplerSettings, sample

    net = load_net(converted["randar"])
    gen = torch.Generator().manual_seed(0)
    out = sample(net, torch.tensor([0, 3, 9]), SamplerSettings(policy=policy, **extra), generator=gen,
                 choice_generator=torch.Generator().manual_seed(1))
    assert (out.order.sort(1).values == torch.arange(16)).all() and out.tokens.max() < net.vocab_size
    if policy == "raster":
        assert (out.order == torch.arange(16)).all()


def test_a_text_to_image_gpt_is_refused_with_one_line(tmp_path, converted):
    """LlamaGen's t2i models hold a caption projection instead of the class table: not a c2i release."""
    state = torch.load(FIXTURES / "llamagen_gpt_tiny.pt", weights_only=True)["model"]
    state.pop("cls_embedding.embedding_table.weight")
    state["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(64, 2048)
    torch.save({"model": state}, tmp_path / "t2i.pt")
    with pytest.raises(ConversionError, match="lacks cls_embedding.embedding_table.weight") as err:
        run_convert(tmp_path / "t2i.pt", tmp_path / "out.ckpt", "--tokenizer", converted["vq"], *TINY_AR)
    one_line(err)
