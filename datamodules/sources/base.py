"""What every data source adds to a `Dataset`, with the defaults of a plain image set: the data-specific
behaviour the experiment runner and the evaluation need lives here and in the sources that differ, never in
an `if` on the data's name.
"""

from torch.utils.data import Dataset


class DataSource(Dataset):
    """A dataset of (uint8 image (3, H, W), label) with `num_classes`, `image_size` and `fingerprint()`.

    Attributes:
        scene_hues: > 0 when the images are scenes the sunset analyser reads (the palette's size): the
            evaluation then measures consistency and when the order writes the sun and the clouds; 0 else.
    """

    num_classes: int
    image_size: int
    scene_hues: int = 0

    def fingerprint(self) -> str:
        raise NotImplementedError

    @classmethod
    def has_scenes(cls) -> bool:
        """Whether this kind of source gives scenes (`scene_hues` > 0), known without building one."""
        return False

    @classmethod
    def split_overrides(cls, init_args: dict, n_train: int, n_val: int) -> dict:
        """`data.init_args` overrides (dotted, relative to it) that give `n_train` training and `n_val` validation
        images: a fixed set keeps the first `n_train` of a deterministic split (`val_fraction`) and caps
        validation at `n_val` (`max_val_images`)."""
        total = len(cls(**init_args))
        return {"val_fraction": max(1 - n_train / total, n_val / total), "max_val_images": n_val}
