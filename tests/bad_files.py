"""Damaged and hostile files, made from good ones, for the bad-input tests (tests/test_errors.py,
tests/test_damaged_files.py): each `write_*(src, dst)` writes one kind of bad file; `KINDS` maps a kind to its
writer and the words its one-line error must hold.
"""

from pathlib import Path

import torch

from models.checkpoint import build_net
from tests.conftest import TOKENIZER_CKPT

MARKER = "payload_ran"  # created by unpickling a payload file: must never exist


class Payload:
    """Unpickling it creates the file `path`: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def write_payload(src: Path, dst: Path) -> None:
    torch.save({"state_dict": {}, "net_spec": Payload(str(Path(MARKER).resolve()))}, dst)


def write_truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def write_corrupt(src: Path, dst: Path) -> None:
    """Same length, 64 bytes in the middle flipped (torch.load alone would not notice)."""
    data = bytearray(src.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    dst.write_bytes(bytes(data))


def write_text(src: Path, dst: Path) -> None:
    dst.write_text("model:\n  class_path: lightning_modules.any_order.AnyOrderModule\n")


def write_nan(src: Path, dst: Path) -> None:
    """The checkpoint of a diverged run: one network weight is NaN."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if k.startswith("net.") and v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    torch.save(ckpt, dst)


def write_other_vocab_tokenizer(dst: Path, codebook_size: int = 32) -> None:
    """A tokenizer checkpoint like the fixture's, with another vocabulary."""
    spec = torch.load(TOKENIZER_CKPT, map_location="cpu", weights_only=True)["net_spec"]
    spec["init_args"]["codebook_size"] = codebook_size
    state = {f"net.{k}": v for k, v in build_net(spec).state_dict().items()}
    torch.save({"net_spec": spec, "state_dict": state}, dst)


def write_without_tokenizer_record(src: Path, dst: Path) -> None:
    """An AR checkpoint as written before tokenizer records existed."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    del ckpt["tokenizer"]
    torch.save(ckpt, dst)


KINDS = {  # kind: (writer, words the message must hold)
    "payload": (write_payload, ("could run code",)),
    "truncated": (write_truncated, ("truncated or corrupt",)),
    "corrupt": (write_corrupt, ("truncated or corrupt",)),
    "text": (write_text, ("text file",)),
    "nan": (write_nan, ("NaN", "lower learning rate", "model.init_args.optimizer.init_args.lr")),
}
