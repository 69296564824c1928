"""Released checkpoints of LlamaGen (VQ tokenizer, class-conditional GPT) and RandAR, read as data and mapped onto
this project's networks key by key.

- `read_release(path)`: the release's state dict (a LlamaGen `.pt` read with `torch.load(weights_only=True)`, or a
  RandAR `.safetensors`), with one-line errors for a missing, truncated, foreign or unsafe file.
- `detect_kind(shapes)`: "vq" | "gpt" | "randar", from the keys.
- `vq_init_args(shapes)` / `gpt_init_args(shapes, heads, grid)`: the constructor arguments of
  `models.llamagen_vq.LlamaGenVQ` / `models.transformer.OrderedTransformer`, read from the shapes (the heads are
  not in any shape: they come from `--heads`, a preset or `HEADS_BY_WIDTH`, LlamaGen's table).
- `map_state(state, kind, net_shapes)`: every release key mapped exactly once to a key of the network with the
  same shape, every network key filled exactly once; what is dropped (`quantize.codebook_used`) is returned.
Nothing here imports Lightning; `tools.convert` writes the project's checkpoint.
"""

import argparse
import re
from pathlib import Path

import torch

from models.blocks import find_multiple
from models.checkpoint import UnreadableFileError, read_checkpoint

RELEASE_WHAT = "released checkpoint"
RELEASE_FIX = ("pass the file as released (LlamaGen: vq_ds16_c2i.pt, c2i_B_256.pt, c2i_L_256.pt; RandAR: "
               "randar_*.safetensors), downloaded again if it is damaged")
CONTAINER_KEYS = ("model", "module", "state_dict")  # where LlamaGen's training scripts keep the weights, in order
SAFE_GLOBALS = [argparse.Namespace]  # LlamaGen's training checkpoints also hold their `args`
DROPPED = {"vq": ("quantize.codebook_used",)}  # buffers of training that are not weights
# LlamaGen's GPT sizes (gpt.py GPT_B ... GPT_3B; RandAR-L/XL/XXL reuse L/XL/XXL): width -> heads
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 3200: 32}
# Named sizes: what the file must hold (checked), and the heads no shape tells.
PRESETS = {
    "vq16": {"kind": "vq", "ch_mult": [1, 1, 2, 2, 4]},
    "vq8": {"kind": "vq", "ch_mult": [1, 2, 2, 4]},
    "gpt-b": {"kind": "gpt", "width": 768, "depth": 12, "heads": 12},
    "gpt-l": {"kind": "gpt", "width": 1024, "depth": 24, "heads": 16},
    "gpt-xl": {"kind": "gpt", "width": 1280, "depth": 36, "heads": 20},
    "gpt-xxl": {"kind": "gpt", "width": 1536, "depth": 48, "heads": 24},
    "randar-l": {"kind": "randar", "width": 1024, "depth": 24, "heads": 16},
    "randar-xl": {"kind": "randar", "width": 1280, "depth": 36, "heads": 20},
    "randar-xxl": {"kind": "randar", "width": 1536, "depth": 48, "heads": 24},
}
# GPT / RandAR key -> this project's OrderedTransformer key (block="llama", own_pos="rope")
GPT_KEYS = [
    (r"tok_embeddings\.weight", "tok_emb.weight"),
    (r"cls_embedding\.embedding_table\.weight", "cls_emb.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"layers\.(\d+)\.attention\.wqkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"blocks.\1.attn.proj.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"layers\.(\d+)\.feed_forward\.(w[123])\.weight", r"blocks.\1.mlp.\2.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"output\.weight", "head.weight"),
    (r"pos_instruct_embeddings", "next_pos.instruction"),
]


class ConversionError(ValueError):
    """A release file that does not map onto the network (one line naming what and the fix)."""


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length (below 100 MB, the format's limit), then a JSON header
    starting with '{' (a torch.save file starts with "PK", a pickle with 0x80)."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UnreadableFileError(f"{RELEASE_WHAT} {path} is a truncated or corrupt safetensors file ({err}): "
                                  f"{RELEASE_FIX}") from err


def read_release(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a release file, and the container entries not read (e.g. "optimizer", "args").

    A `.pt` is read with `torch.load(weights_only=True)`, allowing `argparse.Namespace` only (LlamaGen's training
    checkpoints store their arguments); its weights are under "model" (or "module" / "state_dict"), or it is a
    flat state dict. A safetensors file is one flat state dict (RandAR).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{RELEASE_WHAT} {path} not found: {RELEASE_FIX}")
    if _is_safetensors(path):
        return _read_safetensors(path), []
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        ckpt = read_checkpoint(path, RELEASE_WHAT, RELEASE_FIX)
    key = next((k for k in CONTAINER_KEYS if isinstance(ckpt.get(k), dict)), None)
    state = ckpt[key] if key else ckpt
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{RELEASE_WHAT} {path} holds no state dict (entries: {', '.join(map(str, ckpt))}): "
                              f"{RELEASE_FIX}")
    return state, sorted(str(k) for k in ckpt if k != key) if key else []


def detect_kind(shapes: dict[str, tuple]) -> str:
    """"vq" (a LlamaGen VQModel), "randar" (RandARTransformer) or "gpt" (LlamaGen's Transformer), by their keys."""
    if "quantize.embedding.weight" in shapes:
        return "vq"
    if "tok_embeddings.weight" in shapes:
        return "randar" if "pos_instruct_embeddings" in shapes else "gpt"
    raise ConversionError(f"the {RELEASE_WHAT} holds none of LlamaGen's or RandAR's keys (first: "
                          f"{next(iter(shapes), 'none')}): {RELEASE_FIX}")


def _count(shapes: dict, pattern: str) -> int:
    """How many distinct indices i the keys matching `pattern` (one group) hold."""
    return len({m.group(1) for k in shapes if (m := re.fullmatch(pattern, k))})


def _needs(shapes: dict, keys: tuple[str, ...], kind: str) -> None:
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise ConversionError(f"the {RELEASE_WHAT} lacks {missing[0]}, which every {kind} release holds (a "
                              f"text-to-image or otherwise modified model is not supported): {RELEASE_FIX}")


def vq_init_args(shapes: dict[str, tuple]) -> dict:
    """LlamaGenVQ's arguments from the release's shapes (the base width from conv_in, the levels' widths from
    their first convs)."""
    _needs(shapes, ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight", "encoder.conv_out.weight"),
           "LlamaGen VQ")
    ch = shapes["encoder.conv_in.weight"][0]
    levels = _count(shapes, r"encoder\.conv_blocks\.(\d+)\..*")
    ch_mult = [shapes[f"encoder.conv_blocks.{i}.res.0.conv1.weight"][0] // ch for i in range(levels)]
    v, d = shapes["quantize.embedding.weight"]
    return {"ch": ch, "ch_mult": ch_mult, "z_channels": shapes["encoder.conv_out.weight"][0], "codebook_size": v,
            "code_dim": d, "num_res_blocks": _count(shapes, r"encoder\.conv_blocks\.0\.res\.(\d+)\..*")}


def gpt_init_args(shapes: dict[str, tuple], heads: int | None, grid: tuple[int, int]) -> dict:
    """OrderedTransformer's arguments for a LlamaGen GPT (next_pos "none") or RandAR (next_pos "instruction").

    Args:
        shapes: the release's key -> shape.
        heads: attention heads (no shape holds them); None: LlamaGen's value for the width (`HEADS_BY_WIDTH`).
        grid: the token grid (h, w) (the image size over the tokenizer's downsampling).
    """
    _needs(shapes, ("cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight",
                    "layers.0.feed_forward.w1.weight"), "class-conditional (c2i) GPT")
    vocab, width = shapes["tok_embeddings.weight"]
    depth = _count(shapes, r"layers\.(\d+)\..*")
    heads = heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise ConversionError(f"width {width} is not one of LlamaGen's sizes ({sorted(HEADS_BY_WIDTH)}): give the "
                              "number of attention heads with --heads")
    qkv, hidden = shapes["layers.0.attention.wqkv.weight"][0], shapes["layers.0.feed_forward.w1.weight"][0]
    if qkv != 3 * width:
        raise ConversionError(f"wqkv has {qkv} rows, not 3 x {width}: grouped-query attention (n_kv_head < n_head) "
                              "is not supported; convert a model with n_kv_head = n_head")
    if hidden != find_multiple(int(2 * 4 * width / 3), 256):
        raise ConversionError(f"the feed-forward width {hidden} is not LlamaGen's default for width {width} "
                              "(ffn_dim_multiplier / multiple_of were changed): not supported")
    rows = shapes["cls_embedding.embedding_table.weight"][0]
    kind = "randar" if "pos_instruct_embeddings" in shapes else "gpt"
    return {"vocab_size": vocab, "grid_size": tuple(grid), "num_classes": rows - 1, "width": width, "depth": depth,
            "heads": heads, "mlp_ratio": 4.0, "dropout": 0.0, "next_pos": "instruction" if kind == "randar" else "none",
            "own_pos": "rope", "next_pos_layer": 0, "block": "llama"}


def check_preset(name: str | None, kind: str, init_args: dict) -> None:
    """Refuse a file that is not the size its preset names (one line: what the file holds)."""
    if name is None:
        return
    preset = PRESETS[name]
    held = {"kind": kind, **init_args}
    differ = [k for k, v in preset.items() if held.get(k) != v]
    if differ:
        have = ", ".join(f"{k} {held.get(k)}" for k in differ)
        raise ConversionError(f"--preset {name} expects {', '.join(f'{k} {preset[k]}' for k in differ)}, but the "
                              f"file holds {have}: pass the preset of this file, or none")


def target_key(key: str, kind: str) -> str | None:
    """This project's key for a release key (None: not mapped). The VQ keeps the release's module names."""
    if kind == "vq":
        return key
    for pattern, repl in GPT_KEYS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def map_keys(shapes: dict[str, tuple], kind: str, net_shapes: dict[str, tuple]) -> tuple[dict[str, str], list[str]]:
    """Release key -> network key, each exactly once with the same shape, covering every network key.

    Returns:
        the mapping, and the release keys dropped on purpose (`DROPPED`).

    Raises:
        ConversionError: a release key that maps nowhere or twice, a shape that differs, or a network key
            left without a weight.
    """
    dropped = [k for k in shapes if k in DROPPED.get(kind, ())]
    mapping, problems = {}, []
    for key in shapes:
        if key in dropped:
            continue
        target = target_key(key, kind)
        if target is None or target not in net_shapes:
            problems.append(f"{key} maps to no weight of the network")
        elif target in mapping.values():
            problems.append(f"{key} maps to {target} a second time")
        elif tuple(shapes[key]) != tuple(net_shapes[target]):
            problems.append(f"{key} has shape {tuple(shapes[key])}, {target} {tuple(net_shapes[target])}")
        else:
            mapping[key] = target
    missing = sorted(set(net_shapes) - set(mapping.values()))
    problems += [f"{k} gets no weight from the file" for k in missing]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConversionError(f"the {RELEASE_WHAT} does not map onto the {kind} network: {problems[0]}{more}: "
                              f"{RELEASE_FIX}")
    return mapping, dropped


def map_state(state: dict[str, torch.Tensor], kind: str, net: torch.nn.Module) -> tuple[dict, list[str]]:
    """The network's state dict (fp32) from the release's, and the keys dropped; see `map_keys`."""
    net_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    mapping, dropped = map_keys({k: tuple(v.shape) for k, v in state.items()}, kind, net_shapes)
    return {t: state[k].float() if state[k].is_floating_point() else state[k] for k, t in mapping.items()}, dropped
