"""A predict job's results batch by batch on disk, so that a stopped job resumes where it stopped.

`<folder>/<key>/batch-<id>.pt` holds one batch's outputs (written atomically, like every file of the project):
`key` hashes what the results were made from (the checkpoint's content, the settings, the data), `id` what the batch
is (its sample seeds, its images). A rerun of the same command finds its finished batches and skips them; a rerun
with other settings finds no shard of its own and computes everything; a batch cut differently (another batch size
or number of processes) is a different batch. The job removes its shards once its own files are written (`clear`).
"""

import json
import logging
import shutil
from pathlib import Path

import torch

from fileio import json_sha256, save_json, save_torch

log = logging.getLogger("oar.shards")


def _plain(value):
    """`value` as it reads back from JSON (tuples become lists), so a stored identity compares fairly."""
    return json.loads(json.dumps(value, default=str))


class BatchShards:
    """The finished batches of one job, keyed by `made_from` (plain JSON-able values) under `folder`."""

    def __init__(self, folder: str | Path, made_from: dict):
        self.root = Path(folder)
        self.folder = self.root / json_sha256(made_from)[:16]
        self.made_from = made_from
        self.loaded = 0  # batches read back (the log of a resumed run says how many)

    def _file(self, identity) -> Path:
        return self.folder / f"batch-{json_sha256(identity)[:16]}.pt"

    def load(self, identity) -> dict | None:
        """The outputs of the batch `identity` (plain values: lists, ints), or None when it is not finished yet.

        A shard damaged after it was written (a truncated copy) is deleted with a warning and counts as not written."""
        file = self._file(identity)
        if not file.is_file():
            return None
        try:
            shard = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (any unreadable file: compute the batch again)
            log.warning("batch shard %s is unreadable (%s): deleted, its batch is computed again", file, err)
            file.unlink(missing_ok=True)
            return None
        if shard.get("identity") != _plain(identity):
            return None  # a hash collision of two batches: compute this one
        self.loaded += 1
        return shard["outputs"]

    def save(self, identity, outputs: dict) -> None:
        """Write the batch's outputs (tensors go to the CPU; other values must be plain)."""
        if not (self.folder / "made_from.json").is_file():
            save_json(self.made_from, self.folder / "made_from.json", indent=1, sort_keys=True, default=str)
        cpu = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
        save_torch({"identity": _plain(identity), "outputs": cpu}, self._file(identity))

    def clear(self) -> None:
        """Remove this job's shards (and the shard folder when nothing else is in it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
