"""Speed of the released architectures (issue 27): converted vs native, the RandAR-L rows, extraction per image.

Three parts (`part`), every row a ratio of things timed alternately in one run (`benchmarks/timing.py`):
- `converted` (CPU, small batch): a LlamaGen GPT-B converted by `tools.convert` against the native network of
  configs/model/ar/gpt_b.yaml with the same weights (the same class, `OrderedTransformer`, so the goal is parity):
    (c1) train step, converted / native                                   goal <= 1.05 (and >= 0.95 the other way)
    (c2) cached raster sampling, converted / native                       goal <= 1.05
  The release file is synthetic (the native network's weights under LlamaGen's names; a VQ-16-shaped tokenizer of
  width 32): the real files are not needed to time the network they become.
- `randar` (the GPU table, benchmarks/gpu_table.sh; `--smoke` on CPU): configs/model/ar/randar_l.yaml at 16x16
  tokens, vocabulary 16384, 1000 classes, random weights; throughputs (tokens/s, images/s) in the notes and JSON:
    (r1) train step, random orders / raster order                          goal <= 1.05
    (r2) confidence (exact) sampling / random-order sampling              goal <= 4
    (r3) exact greedy extraction of an image / confidence sampling of one  reported (>= 1)
- `fixture` (CPU): exact greedy extraction with the converted tiny RandAR fixture (4x4 tokens): time per image,
  and the FLOPs of extraction and sampling at RandAR-L (256 tokens) with the H100 time they project to.

    python -m benchmarks.bench_pretrained converted --threads 2 [--json F]
    python -m benchmarks.bench_pretrained randar --device cuda [--dtype bf16] [--json F]
    python -m benchmarks.bench_pretrained fixture --threads 1 [--json F]
"""

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench_ar import train_step
from benchmarks.harness import DTYPES, PRESET_DIR, Row, _find_net_args, environment, load, report, setup_torch
from benchmarks.timing import median_ratio, time_alternately
from models.blocks import find_multiple
from models.checkpoint import load_net
from models.extraction import ExtractionSettings, extract_orders
from models.llamagen_vq import LlamaGenVQ
from models.orders import random_order, raster_order
from models.sampling import SamplerSettings, sample
from models.transformer import OrderedTransformer
from tools import convert
from tools.pretrained import target_key

IMAGENET = {"vocab": 16384, "classes": 1000, "grid": 16}
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet)
IMAGENET_TRAIN = 1_281_167
FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pretrained"

OWN_ORDER = ExtractionSettings(score="max_prob")  # the extraction of configs/extract_orders.yaml


def preset_args(name: str) -> dict:
    """The network arguments of configs/model/ar/<name>.yaml (width, depth, heads, block, positions)."""
    from omegaconf import OmegaConf

    return dict(_find_net_args(OmegaConf.to_container(OmegaConf.load(PRESET_DIR / f"{name}.yaml"))))


def release_names(depth: int) -> list[str]:
    """The keys of a LlamaGen GPT release of `depth` layers."""
    layer = ["attention_norm", "attention.wqkv", "attention.wo", "ffn_norm", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3"]
    return ["tok_embeddings.weight", "cls_embedding.embedding_table.weight", "norm.weight", "output.weight",
            *(f"layers.{i}.{name}.weight" for i in range(depth) for name in layer)]


def converted_copy(native: OrderedTransformer, folder: Path) -> OrderedTransformer:
    """`native`'s weights saved as a LlamaGen release and converted back with `tools.convert` (a VQ-16-shaped
    tokenizer of width 32 supplies the vocabulary and the downsampling)."""
    vq = LlamaGenVQ(ch=32, z_channels=32, codebook_size=native.vocab_size)
    torch.save({"model": {**vq.state_dict(), "quantize.codebook_used": torch.zeros(65536)}}, folder / "vq.pt")
    convert.main([str(folder / "vq.pt"), str(folder / "vq.ckpt")])
    state = native.state_dict()
    release = {name: state[target_key(name, "gpt")] for name in release_names(native.depth)}
    torch.save({"model": release}, folder / "gpt.pt")
    convert.main([str(folder / "gpt.pt"), str(folder / "gpt.ckpt"), "--tokenizer", str(folder / "vq.ckpt"),
                  "--heads", str(native.heads), "--image-size", str(16 * native.grid_size[0])])
    return load_net(folder / "gpt.ckpt")


def _loss(net, tokens, cond, order_fn):
    def loss():
        order = order_fn()
        return F.cross_entropy(net(tokens, order, cond).flatten(0, 1).float(), tokens.gather(1, order).flatten())
    return loss


def _sampler(net, cond, policy: str, dtype, **kwargs):
    def run():
        return sample(net, cond, SamplerSettings(policy=policy, **kwargs),
                      generator=torch.Generator(cond.device).manual_seed(0), dtype=dtype)
    return run


def _timed(fns: dict, repeats: int, warmup: int, device) -> tuple[dict, dict]:
    raw: list[list[float]] = []
    medians = time_alternately(list(fns.values()), repeats, warmup, device, samples=raw)
    return dict(zip(fns, medians, strict=True)), dict(zip(fns, raw, strict=True))


def bench_converted(args, device, dtype: str) -> tuple[list[Row], dict]:
    """(c1, c2): the converted GPT-B against the native one, same weights, timed alternately."""
    s = IMAGENET if not args.smoke else {"vocab": 64, "classes": 10, "grid": 4}
    net_args = preset_args("gpt_b") if not args.smoke else {**preset_args("gpt_b"), "width": 64, "depth": 2, "heads": 4}
    native = OrderedTransformer(s["vocab"], (s["grid"], s["grid"]), s["classes"], **net_args).to(device)
    with tempfile.TemporaryDirectory() as folder:
        converted = converted_copy(native, Path(folder)).to(device)
    b, n = args.batch, s["grid"] ** 2
    gen = torch.Generator().manual_seed(0)
    tokens, cond = torch.randint(s["vocab"], (b, n), generator=gen).to(device), torch.randint(s["classes"], (b,),
                                                                                               generator=gen).to(device)
    raster = raster_order(b, n, device=device)
    with torch.no_grad():
        same = torch.equal(native.eval()(tokens, raster, cond), converted.eval()(tokens, raster, cond))
    ctx, cast = _autocast(device, dtype), DTYPES[dtype]
    fns = {}
    for name, net in (("converted", converted), ("native", native)):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        fns[f"train_{name}"] = lambda net=net, opt=opt: train_step(net.train(), opt, _loss(net, tokens, cond,
                                                                                          lambda: raster), ctx)
        fns[f"sample_{name}"] = _sampler(net.eval(), cond, "raster", cast)
    t, raw = _timed(fns, args.repeats, 1, device)
    info = {"identical_logits": same, "params": sum(p.numel() for p in native.parameters()), "batch": b, "tokens": n}
    rows = [Row("(c1) train step, converted / native GPT-B", f"converted (b={b}, raster)", f"native (b={b}, raster)",
                median_ratio(raw["train_converted"], raw["train_native"]), "A time / B time", "<=", 1.05,
                t["train_converted"], t["train_native"], info, raw["train_converted"], raw["train_native"]),
            Row("(c2) cached raster sampling, converted / native GPT-B", f"converted (b={b})", f"native (b={b})",
                median_ratio(raw["sample_converted"], raw["sample_native"]), "A time / B time", "<=", 1.05,
                t["sample_converted"], t["sample_native"], info, raw["sample_converted"], raw["sample_native"])]
    return rows, info


def _autocast(device, dtype: str):
    from models import precision

    return precision.autocast(device, DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext()


def bench_randar(args, device, dtype: str) -> tuple[list[Row], dict]:
    """(r1-r3) at RandAR-L: training, sampling in random and confidence order, extraction."""
    s = IMAGENET if not args.smoke else {"vocab": 64, "classes": 10, "grid": 4}
    net_args = preset_args("randar_l") if not args.smoke else {**preset_args("randar_l"), "width": 64, "depth": 2,
                                                               "heads": 4}
    net = OrderedTransformer(s["vocab"], (s["grid"], s["grid"]), s["classes"], **net_args).to(device)
    n, gen = s["grid"] ** 2, torch.Generator().manual_seed(0)
    bt, bs = args.batch, args.sample_batch
    tokens = torch.randint(s["vocab"], (max(bt, bs), n), generator=gen).to(device)
    cond = torch.randint(s["classes"], (max(bt, bs),), generator=gen).to(device)
    ctx, cast = _autocast(device, dtype), DTYPES[dtype]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    train = lambda order_fn: lambda: train_step(net.train(), opt, _loss(net, tokens[:bt], cond[:bt], order_fn), ctx)  # noqa: E731
    fns = {"train_random": train(lambda: random_order(bt, n, device=device)),
           "train_raster": train(lambda: raster_order(bt, n, device=device)),
           "random": _sampler(net.eval(), cond[:bs], "random", cast),
           "confidence": _sampler(net.eval(), cond[:bs], "confidence", cast),
           "extract": lambda: extract_orders(net.eval(), tokens[:bs], cond[:bs], OWN_ORDER, dtype=cast)}
    t, raw = _timed(fns, args.repeats, 1, device)
    info = {"train_tokens_per_s": bt * n / t["train_random"], "random_sampling_tokens_per_s": bs * n / t["random"],
            "confidence_sampling_tokens_per_s": bs * n / t["confidence"],
            "extraction_images_per_s": bs / t["extract"], "extraction_s_per_image": t["extract"] / bs,
            "train_batch": bt, "sample_batch": bs, "tokens": n, "params": sum(p.numel() for p in net.parameters())}
    rows = [Row("(r1) RandAR-L train step, random / raster orders", f"random orders (b={bt})", f"raster (b={bt})",
                median_ratio(raw["train_random"], raw["train_raster"]), "A time / B time", "<=", 1.05,
                t["train_random"], t["train_raster"], info, raw["train_random"], raw["train_raster"]),
            Row("(r2) RandAR-L confidence / random-order sampling", f"confidence, exact (b={bs})",
                f"random order (b={bs})", median_ratio(raw["confidence"], raw["random"]), "A time / B time", "<=", 4.0,
                t["confidence"], t["random"], info, raw["confidence"], raw["random"]),
            Row("(r3) RandAR-L exact greedy extraction / confidence sampling", f"extraction, max_prob (b={bs})",
                f"confidence sampling (b={bs})", median_ratio(raw["extract"], raw["confidence"]), "A time / B time",
                ">=", 1.0, t["extract"], t["confidence"], info, raw["extract"], raw["confidence"])]
    return rows, info


def extraction_flops(n: int, width: int, depth: int, hidden: int, vocab: int, k: int = 1,
                     shortlist: int = 0, refresh: int = 1) -> tuple[float, int]:
    """FLOPs and candidate queries of one image's teacher-forced greedy extraction (or confidence sampling: the same
    passes) with RandAR's instruction tokens (two cache slots a step), counted analytically.

    A scoring pass at step t (t cells written, 2t + 1 slots cached after the shared input token) runs the input
    token once and m candidate instruction tokens, each through every block (linear layers 8d^2 + 6dh for SwiGLU's
    three matrices, attention 4 L d over its L = 2t + 2 keys) and the head (2 d v). With k cells per pass (extraction's
    positions_per_step) a pass places k cells; with a shortlist (the sampler's `shortlist` / `refresh`) only the
    `shortlist` best-ranked cells are rescored between full rankings every `refresh` passes. Not counted: norms,
    softmaxes, embeddings, the k - 1 extra cells' `extend` (2 slots each, no head).
    """
    linear = 8 * width * width + 6 * width * hidden
    flops, queries, t, step = 0.0, 0, 0, 0
    while t < n:
        m = n - t if not shortlist or step % refresh == 0 else min(shortlist, n - t)
        flops += depth * (linear + 4 * (2 * t + 1) * width)  # the shared input token
        flops += m * (depth * (linear + 4 * (2 * t + 2) * width) + 2 * width * vocab)
        queries, t, step = queries + m, t + k, step + 1
    return flops, queries


def bench_fixture(args, device, dtype: str) -> tuple[list[Row], dict]:
    """Exact greedy extraction with the converted tiny RandAR (s/image), beside its random-order sampling."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        convert.main([str(FIXTURES / "llamagen_vq_tiny.pt"), str(folder / "vq.ckpt")])
        convert.main([str(FIXTURES / "randar_tiny.safetensors"), str(folder / "randar.ckpt"), "--tokenizer",
                      str(folder / "vq.ckpt"), "--heads", "4", "--image-size", "8"])
        net = load_net(folder / "randar.ckpt").to(device)
    b, n, gen = args.sample_batch, net.num_tokens, torch.Generator().manual_seed(0)
    tokens, cond = torch.randint(net.vocab_size, (b, n), generator=gen), torch.randint(net.num_classes, (b,),
                                                                                       generator=gen)
    cast = DTYPES[dtype]
    fns = {"extract": lambda: extract_orders(net, tokens.to(device), cond.to(device), OWN_ORDER, dtype=cast),
           "random": _sampler(net, cond.to(device), "random", cast)}
    t, raw = _timed(fns, args.repeats, 1, device)
    hidden = find_multiple(int(2 * 4 * 1024 / 3), 256)
    projection, rate = {}, 0.4 * H100_BF16_PEAK  # 40% of the bf16 peak: an assumed utilisation, not a measurement
    for label, kw in (("exact", {}), ("positions_per_step 2", {"k": 2}), ("positions_per_step 4", {"k": 4}),
                      ("positions_per_step 8", {"k": 8}), ("shortlist 8, refresh 8 (sampling)",
                                                           {"shortlist": 8, "refresh": 8})):
        flops, queries = extraction_flops(256, 1024, 24, hidden, 16384, **kw)
        projection[label] = {"candidate_queries": queries, "tflop_per_image": flops / 1e12,
                             "h100_s_per_image_at_40pct": flops / rate,
                             "imagenet_2_views_h100_hours_at_40pct": 2 * IMAGENET_TRAIN * flops / rate / 3600}
    info = {"fixture_s_per_image": t["extract"] / b, "fixture_tokens": n, "batch": b, "randar_l_256": projection}
    rows = [Row("(f1) tiny RandAR fixture: exact greedy extraction / random-order sampling", f"extraction (b={b})",
                f"random-order sampling (b={b})", median_ratio(raw["extract"], raw["random"]), "A time / B time", ">=",
                1.0, t["extract"], t["random"], info, raw["extract"], raw["random"])]
    return rows, info


PARTS = {"converted": bench_converted, "randar": bench_randar, "fixture": bench_fixture}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 2 on CPU, 32 on GPU)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 4 on CPU, 64 on GPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny networks (tests)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or (["bf16"] if gpu else ["fp32"])
    args.batch = args.batch or (32 if gpu else 2)
    args.sample_batch = args.sample_batch or (64 if gpu else 4)
    device = setup_torch(args)
    rows, infos = [], {}
    for dtype in args.dtype:
        dtype_rows, infos[dtype] = PARTS[args.part](args, device, dtype)
        for row in dtype_rows:
            row.name, row.extra["dtype"] = f"{row.name} [{dtype}]", dtype
        rows += dtype_rows
    config = {"part": args.part, "batch": args.batch, "sample_batch": args.sample_batch, "repeats": args.repeats,
              "smoke": args.smoke, **environment(args, device)}
    notes = ["ratio = median over repeats of A/B timed back to back (alternating); A and B medians are for reference",
             *[f"{d}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in i.items()
                                   if not isinstance(v, dict)) for d, i in infos.items()],
             f"1-minute load average at start {config['load_at_start']}, at end {load()}"]
    report(config, rows, args.json, notes, {"info": infos})
    for dtype, info in infos.items():
        if "randar_l_256" in info:
            print(projection_table(info["randar_l_256"], dtype))
    return rows


def projection_table(projection: dict, dtype: str) -> str:
    """The FLOP projection of extraction (and sampling) at RandAR-L, 256 tokens, as markdown."""
    lines = [f"\nRandAR-L, 256 tokens, per image view (analytic FLOPs; H100 at an assumed 40% of its bf16 peak) "
             f"[{dtype}]", "| pass | candidate queries | TFLOP | H100 s | ImageNet train, 2 views: H100 hours |",
             "|---|---|---|---|---|"]
    for label, p in projection.items():
        lines.append(f"| {label} | {p['candidate_queries']:,} | {p['tflop_per_image']:.2f} | "
                     f"{p['h100_s_per_image_at_40pct']:.4f} | {p['imagenet_2_views_h100_hours_at_40pct']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
