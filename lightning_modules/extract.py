"""Order extraction (configs/extract_orders.yaml): the order of each training image view, by teacher-forced greedy
(or noisy) search with the trained model (`models.extraction`); `callbacks.order_writer.OrderWriter` writes them."""

from dataclasses import replace

import torch

from lightning_modules.predict import PredictModule
from models.extraction import ExtractionSettings, extract_orders, noise_seeds
from models.precision import resolve_dtype
from models.transformer import OrderedTransformer

DEFAULT_EXTRACTION = ExtractionSettings()  # `--print_config` shows every field


class ExtractModule(PredictModule):
    """`{"order": (b*K, n), "index", "flip", "k": (b*K,)}` for token batches of the train or val split.

    Each of the b views gets K rows (k = 0..K-1, view-major), one extraction pass over all b*K rows; each row's noise
    depends only on (seed, index, flip, k), so any batching, process count or resumed run gives the same orders.

    Args:
        extraction: the settings, passed whole to `models.extraction.extract_orders`.
    """

    splits, writer, config = ("train", "val"), "callbacks.order_writer.OrderWriter", "configs/extract_orders.yaml"

    def __init__(self, net: OrderedTransformer | None = None, checkpoint: str | None = None,
                 extraction: ExtractionSettings = DEFAULT_EXTRACTION, tokenizer_ckpt: str | None = None):
        super().__init__(net, checkpoint, tokenizer_ckpt)
        self.extraction = replace(extraction)  # a copy: the default is shared
        self.net.check_order_policy("confidence")  # a raster-only network has no order to extract

    def run_batch(self, batch: dict) -> dict:
        s, per = self.extraction, self.extraction.orders_per_image
        index, flip = batch["index"].repeat_interleave(per), batch["flip"].repeat_interleave(per)
        k = torch.arange(per, device=index.device).repeat(len(batch["index"]))
        order = extract_orders(self.net, batch["tokens"].flatten(1).repeat_interleave(per, 0),
                               batch["label"].repeat_interleave(per), s, row_seeds=noise_seeds(s.seed, index, flip, k),
                               dtype=resolve_dtype(s.precision, self.device))
        return {"order": order, "index": index, "flip": flip, "k": k}
