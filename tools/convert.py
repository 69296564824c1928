"""Convert a released LlamaGen / RandAR checkpoint into this project's checkpoint format, so every stage takes it
as if it had been trained here.

    python -m tools.convert vq_ds16_c2i.pt pretrained/vq16.ckpt
    python -m tools.convert c2i_L_256.pt pretrained/gpt_l.ckpt --tokenizer pretrained/vq16.ckpt
    python -m tools.convert randar_0.3b_llamagen_360k_bs_1024_lr_0.0004.safetensors pretrained/randar_l.ckpt \
        --tokenizer pretrained/vq16.ckpt

- A LlamaGen VQ tokenizer becomes a tokenizer checkpoint (`data.init_args.tokenizer_ckpt`) of
  `models.llamagen_vq.LlamaGenVQ`.
- A LlamaGen GPT becomes a raster model (`models.transformer.OrderedTransformer`, next_pos none; train_order
  raster) for configs/sample.yaml and configs/edit.yaml (`--ckpt_path`, with the sampler's policy raster).
- A RandAR GPT becomes a stage-1 any-order model (next_pos instruction; train_order random) for sampling (every
  policy), editing, configs/extract_orders.yaml (`--ckpt_path`) and configs/distill.yaml (`init_from`).
The AR checkpoints record the converted tokenizer (path as given, and sha256) and hold its weights, as the
project's own do. The architecture is read from the shapes (`--preset` names a size and checks it; the heads come
from the preset, `--heads`, or LlamaGen's table by width); every key is mapped exactly once, and what is dropped is
printed. The output is written atomically.
"""

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

from datamodules.token_cache import file_sha256
from fileio import save_torch
from models.checkpoint import check_finite, load_net, net_spec
from models.llamagen_vq import LlamaGenVQ
from models.sampling import NOISY_CHOICE_TEMPERATURE
from models.transformer import OrderedTransformer
from tools.pretrained import (
    PRESETS,
    ConversionError,
    check_preset,
    detect_kind,
    gpt_init_args,
    map_state,
    read_release,
    vq_init_args,
)

TOKENIZER_WHAT = "tokenizer checkpoint (--tokenizer)"
TOKENIZER_FIX = "convert the release's VQ first: python -m tools.convert vq_ds16_c2i.pt pretrained/vq16.ckpt"
LABEL_DROPOUT = 0.1  # LlamaGen's and RandAR's class_dropout_prob: what the models were trained with
# The LightningModule that `--ckpt_path` rebuilds (by name: importing Lightning here would slow the command down;
# tests/test_pretrained.py checks the class exists).
AR_MODULE = "lightning_modules.any_order.AnyOrderModule"


def _map_onto(cls, init_args: dict, state: dict, kind: str) -> tuple[torch.nn.Module, dict, list[str]]:
    """The network (built on the meta device: no memory, no init) loaded strictly with the mapped release weights;
    the mapped state dict and the keys dropped."""
    with torch.device("meta"):
        net = cls(**init_args)
    mapped, dropped = map_state(state, kind, net)
    net.load_state_dict(mapped, strict=True, assign=True)  # every key once more, by torch
    return net, mapped, dropped


def convert_vq(state: dict, args) -> tuple[dict, torch.nn.Module, list[str]]:
    """A tokenizer checkpoint's fields (the `net.` weights), the network and the keys dropped."""
    init_args = vq_init_args({k: tuple(v.shape) for k, v in state.items()})
    check_preset(args.preset, "vq", init_args)
    net, mapped, dropped = _map_onto(LlamaGenVQ, init_args, state, "vq")
    return {"state_dict": {f"net.{k}": v for k, v in mapped.items()}}, net, dropped


def convert_ar(state: dict, kind: str, args) -> tuple[dict, torch.nn.Module, list[str]]:
    """An AR checkpoint's fields (the `net.` and `tokenizer.` weights, the tokenizer record, the hyper-parameters
    `--ckpt_path` rebuilds the module from), the network and the keys dropped."""
    if args.tokenizer is None:
        raise ConversionError(f"a {kind} checkpoint decodes with the converted VQ tokenizer: pass --tokenizer "
                              f"(e.g. pretrained/vq16.ckpt; {TOKENIZER_FIX})")
    tokenizer = load_net(args.tokenizer, what=TOKENIZER_WHAT, fix=TOKENIZER_FIX)
    if args.image_size % tokenizer.downsample:
        raise ConversionError(f"--image-size {args.image_size} is not a multiple of the tokenizer's downsampling "
                              f"{tokenizer.downsample}")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    heads = args.heads or (PRESETS[args.preset].get("heads") if args.preset else None)
    init_args = gpt_init_args(shapes, heads, tokenizer.grid_size(args.image_size))
    check_preset(args.preset, kind, init_args)
    if init_args["vocab_size"] != tokenizer.vocab_size:
        raise ConversionError(f"the {kind} model has a vocabulary of {init_args['vocab_size']} tokens, tokenizer "
                              f"{args.tokenizer} (--tokenizer) {tokenizer.vocab_size}: pass the tokenizer it was "
                              "trained on")
    net, mapped, dropped = _map_onto(OrderedTransformer, init_args, state, kind)
    weights = {f"net.{k}": v for k, v in mapped.items()}
    weights.update({f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()})  # the module's frozen submodule
    hparams = {"_class_path": AR_MODULE, "net": net_spec(net), "train_order": "raster" if kind == "gpt" else "random",
               "label_dropout": LABEL_DROPOUT, "tokenizer_ckpt": str(args.tokenizer)}
    record = {"path": str(args.tokenizer), "sha256": file_sha256(args.tokenizer)}
    # What its training was, as the project's training modules record it (stage, orders, the order-choice noise a
    # model trained on random orders samples best with): a stage-1 model, raster (GPT) or any-order (RandAR).
    trained = {"stage": AR_MODULE.rpartition(".")[2], "train_order": hparams["train_order"],
               "choice_temperature": NOISY_CHOICE_TEMPERATURE}
    return {"state_dict": weights, "hyper_parameters": hparams, "tokenizer": record, "trained": trained,
            "draw_seed": None}, net, dropped


def convert(args: argparse.Namespace) -> dict:
    """Convert `args.source` into `args.output` (written atomically); returns a summary (also printed)."""
    source = Path(args.source)
    state, not_read = read_release(source)
    kind = detect_kind({k: tuple(v.shape) for k, v in state.items()})
    if args.preset and PRESETS[args.preset]["kind"] != kind:
        raise ConversionError(f"--preset {args.preset} names a {PRESETS[args.preset]['kind']} checkpoint, but "
                              f"{source} holds a {kind} one: pass its preset, or none")
    check_finite(state, source, "released checkpoint")
    fields, net, dropped = convert_vq(state, args) if kind == "vq" else convert_ar(state, kind, args)
    provenance = {"file": source.name, "sha256": file_sha256(source), "kind": kind, "dropped": dropped,
                  "not_read": not_read}
    save_torch({"epoch": 0, "global_step": 0, "pytorch-lightning_version": version("lightning"),
                "net_spec": net_spec(net), "converted_from": provenance, **fields}, args.output)
    summary = {"output": str(args.output), "kind": kind, "class_path": net_spec(net)["class_path"],
               "init_args": net.init_args, "keys_mapped": len(state) - len(dropped), "dropped": dropped,
               "container_entries_not_read": not_read}
    print(json.dumps(summary, indent=1, default=str))
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.splitlines()[0])
    p.add_argument("source", help="the released file: a LlamaGen .pt (VQ or GPT) or a RandAR .safetensors")
    p.add_argument("output", help="the project checkpoint to write (e.g. pretrained/randar_l.ckpt)")
    p.add_argument("--tokenizer", help="GPT / RandAR: the converted VQ tokenizer checkpoint they decode with")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the size the file must be (checked)")
    p.add_argument("--heads", type=int, help="attention heads (default: the preset's, else LlamaGen's by width)")
    p.add_argument("--image-size", type=int, default=256, help="image side the model generates (token grid = "
                   "image size / the tokenizer's downsampling); 256 for the c2i_*_256 and RandAR releases")
    return p


def main(argv: list[str] | None = None) -> dict:
    return convert(parser().parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # one line, naming the fix (as run.py does)
        sys.exit(f"error: {err}")
