"""Pretrained metric weights (Inception, LPIPS backbones) from a local file or the torch hub cache, never a hang.

torch.hub (hence torchvision and torch-fidelity) reads `<hub dir>/checkpoints/<file>` and downloads a
missing file without a timeout. Two process-wide settings are involved, and both are only ever changed
inside a context manager that restores them on exit, however the block ends:
- `download_timeout`: the default socket timeout, so a network that drops packets cannot hang a run;
- `hub_dir_with`: torch.hub's folder, pointed at a temporary one whose expected file name links to a
  local copy (torch.hub loads a cached file as is: the hash is only checked on download). This is how
  a local file reaches libraries that take no path, such as torchmetrics' LPIPS backbone.
"""

import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# Bounds each socket operation, not the whole download.
DOWNLOAD_TIMEOUT_S = 30.0


@contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every socket operation opened inside (torch.hub offers no timeout of its own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (hence torch-fidelity and torchvision) caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextmanager
def hub_dir_with(file: str | Path, name: str) -> Iterator[None]:
    """Point torch.hub at a temporary folder whose `checkpoints/<name>` links to `file`."""
    if not Path(file).is_file():
        raise FileNotFoundError(f"weights_path {str(file)!r} does not exist")
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        link = Path(hub) / "checkpoints" / name
        link.parent.mkdir()
        link.symlink_to(Path(file).resolve())
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)
