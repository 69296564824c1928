"""Where decoding time goes: torch.profiler self time of one run, grouped into matmuls, attention, ...

One sampling run (raster / random / confidence, batch 64) or one extraction run (batch 64) of the small
preset (width 256, depth 4, heads 4, vocab 512, 8x8 grid), profiled after a warm-up run. Self times are
wall-clock: on a loaded machine each op is stretched, but their shares stay meaningful. "framework" is
the rest of the wall time: Python, dispatch and the profiler's own cost.

    python -m benchmarks.profile_decode --what confidence --dtype bf16 --threads 1
"""

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import DTYPES, cpu_model, load
from models.extraction import extract_orders
from models.sampling import sample
from models.transformer import OrderedTransformer

GROUPS = {  # aten op name (without "aten::") -> group; anything else is "other ops"
    "matmul": ("addmm", "mm", "bmm", "matmul", "linear"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention"),
    "embedding": ("embedding", "index_select"),
    "token draw": ("multinomial", "exponential_", "uniform_", "log", "log_", "neg", "neg_", "div", "clamp"),
    "softmax / scores": ("softmax", "_softmax", "log_softmax", "_log_softmax", "logsumexp", "exp", "exp_", "amax",
                         "argmax", "topk", "aminmax"),
    "norm / gelu / residual": ("layer_norm", "native_layer_norm", "gelu", "add", "add_", "mul", "sub"),
    "bookkeeping (copies, gathers, sorts, masks)": (
        "sort", "argsort", "gather", "scatter", "scatter_", "cat", "copy_", "_to_copy", "to", "where", "masked_fill",
        "masked_fill_", "index", "eq", "ne", "ge", "lt", "fill_", "zero_", "zeros", "arange", "full", "ones", "eye",
        "tril", "stack", "remainder", "floor_divide", "sum", "contiguous", "clone"),
}
GROUP_OF = {op: group for group, ops in GROUPS.items() for op in ops}


def run_once(net, what: str, b: int, dtype: torch.dtype | None) -> None:
    gen = torch.Generator().manual_seed(0)
    cond = torch.randint(8, (b,), generator=gen)
    if what == "extract":
        extract_orders(net, torch.randint(512, (b, 64), generator=gen), cond, dtype=dtype)
    else:
        sample(net, cond, what, generator=gen, dtype=dtype)


def split(what: str, dtype: str, b: int) -> tuple[dict[str, float], float, dict]:
    """Shares of wall time per group, the wall time of the profiled run, and each group's top ops (ms)."""
    torch.manual_seed(0)
    net = OrderedTransformer(512, (8, 8), 8, 256, 4, 4).eval()
    run_once(net, what, b, DTYPES[dtype])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run_once(net, what, b, DTYPES[dtype])
        wall = time.perf_counter() - start
    seconds, top = collections.Counter(), collections.defaultdict(collections.Counter)
    for event in prof.key_averages():
        group = GROUP_OF.get(event.key.replace("aten::", ""), "other ops (views, allocs)")
        seconds[group] += event.self_cpu_time_total / 1e6
        top[group][event.key.replace("aten::", "")] += event.self_cpu_time_total / 1e3
    seconds["framework (Python, dispatch, profiler)"] = max(0.0, wall - sum(seconds.values()))
    return {g: s / wall for g, s in seconds.most_common()}, wall, top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", nargs="+", default=["raster", "confidence", "extract"],
                        choices=["raster", "random", "confidence", "extract"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} thread(s), torch {torch.__version__}, load {load()}")
    for what in args.what:
        for dtype in args.dtype:
            shares, wall, top = split(what, dtype, args.batch)
            print(f"\n{what}, {dtype}, batch {args.batch}: {wall:.2f} s profiled wall time")
            for group, share in shares.items():
                ops = ", ".join(f"{k} {v:.0f}" for k, v in top[group].most_common(3))
                print(f"  {share:6.1%}  {group}" + (f"  ({ops} ms)" if ops else ""))
    print(f"\nload at end {load()}")


if __name__ == "__main__":
    main()
