"""Shared plumbing of the speed benchmarks (`python -m benchmarks.bench_ar` ...): command line, torch set-up,
result rows, the speed table and its JSON. (The order study's report is `experiments/report/`.)"""

import argparse
import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from experiments.machine import cpu_model
from models import precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def common_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller grids and fewer repeats")
    parser.add_argument("--smoke", action="store_true", help="tiniest setting (tests): 2x2 grid, width 32, 1 repeat")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES),
                        help="the dtypes to run, side by side (bf16 runs under autocast)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all CPUs; 1 is faster on a CPU shared with other jobs)")
    parser.add_argument("--repeats", type=int, default=None, help="override every benchmark's timed repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--preset", default="small", help="network size: configs/model/ar/<preset>.yaml")
    parser.add_argument("--grid", type=int, default=None, help="token grid side (default 8: 8x8 = 64 tokens)")
    return parser


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "model" / "ar"
FALLBACK = {"width": 256, "depth": 4, "heads": 4}  # the small preset, if its file is missing


def _find_net_args(node) -> dict | None:
    """The first mapping in a parsed YAML that holds a `width` (the net's init_args)."""
    if isinstance(node, dict):
        if "width" in node:
            return node
        for value in node.values():
            found = _find_net_args(value)
            if found is not None:
                return found
    return None


def ar_preset(name: str = "small") -> tuple[dict, str]:
    """width / depth / heads (/ mlp_ratio) of an AR size preset, and the file they came from."""
    path = PRESET_DIR / f"{name}.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        found = _find_net_args(OmegaConf.to_container(OmegaConf.load(path)))
        if found:
            keys = ("width", "depth", "heads", "mlp_ratio")
            return {**FALLBACK, **{k: found[k] for k in keys if k in found}}, f"configs/model/ar/{name}.yaml"
    if name != "small":
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise SystemExit(f"--preset {name}: no configs/model/ar/{name}.yaml; choose one of {presets}")
    return dict(FALLBACK), "fallback (no configs/model/ar/small.yaml)"


def setup_torch(args: argparse.Namespace) -> torch.device:
    """Threads, device and a fixed seed; returns the device."""
    torch.set_num_threads(args.threads or os.cpu_count() or 2)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    torch.manual_seed(0)
    return torch.device(args.device)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for bf16 (weights and the optimizer stay fp32); nothing for fp32."""
    return precision.autocast(device, DTYPES[dtype])


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    """What the numbers depend on, besides the model config."""
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
           "dtype": ",".join(args.dtype), "cpu": cpu_model(), "load_at_start": load()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def load() -> float | None:
    """The 1-minute load average (other jobs share the CPU; a load above the thread count means contention)."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def contention_note(env: dict) -> list[str]:
    """A warning when other jobs oversubscribe the CPU while several torch threads run.

    Measured here (2 cores, load ~4.5): with libgomp's default active wait, 2 threads ran the cached
    sampler 5-14x slower than 1 thread; with OMP_WAIT_POLICY=PASSIVE only 1.2x slower.
    """
    cpus = os.cpu_count() or 1
    if env["threads"] > 1 and env["device"] == "cpu" and (env["load_at_start"] or 0) > cpus:
        return [f"load {env['load_at_start']} > {cpus} CPUs with {env['threads']} threads: OpenMP threads spin-wait "
                "for descheduled peers, so absolute times (and ratios of many small ops to big ones) suffer; "
                "use --threads 1 or OMP_WAIT_POLICY=PASSIVE on a shared machine"]
    return []


@dataclass
class Row:
    """One benchmark: the ratio of two things timed alternately, against a goal.

    Attributes:
        name: the benchmark.
        a, b: what was timed (A and B).
        ratio: the reported ratio (its definition is in `ratio_is`).
        ratio_is: how the ratio is formed, e.g. "A time / B time".
        goal_op, goal: the ratio must satisfy `ratio goal_op goal` ("<=" or ">=").
        a_median_s, b_median_s: the medians of A and B, in seconds, for reference.
        extra: anything else worth keeping (FLOP counts, rates, identity checks).
        a_samples_s, b_samples_s: the raw times of every repeat.
    """

    name: str
    a: str
    b: str
    ratio: float
    ratio_is: str
    goal_op: str
    goal: float
    a_median_s: float
    b_median_s: float
    extra: dict = field(default_factory=dict)
    a_samples_s: list[float] = field(default_factory=list)
    b_samples_s: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.ratio <= self.goal if self.goal_op == "<=" else self.ratio >= self.goal

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _seconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def markdown(config: dict, rows: list[Row], notes: list[str] = ()) -> str:
    """The config line, the table and notes below it."""
    lines = ["Config: " + ", ".join(f"{k}={v}" for k, v in config.items()), ""]
    lines += ["| benchmark | A | B | ratio | goal | result | A median | B median |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.a} | {r.b} | {r.ratio:.3g} ({r.ratio_is}) | {r.goal_op} {r.goal:g} | "
                     f"{'pass' if r.passed else 'MISS'} | {_seconds(r.a_median_s)} | {_seconds(r.b_median_s)} |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def side_by_side(rows: list[Row], dtypes: list[str]) -> str:
    """One line per benchmark with its ratio in every dtype (rows are named "<benchmark> [<dtype>]")."""
    names = list(dict.fromkeys(r.name.rsplit(" [", 1)[0] for r in rows))
    by_name = {r.name: r for r in rows}
    lines = ["| benchmark | goal | " + " | ".join(dtypes) + " |", "|---|---|" + "---|" * len(dtypes)]
    for name in names:
        cells = []
        for dtype in dtypes:
            r = by_name.get(f"{name} [{dtype}]")
            cells.append("–" if r is None else f"{r.ratio:.3g} {'pass' if r.passed else 'MISS'}")
        goal = next(r for r in rows if r.name.startswith(name + " ["))
        lines.append(f"| {name} | {goal.goal_op} {goal.goal:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(config: dict, rows: list[Row], json_path: Path | None, notes: list[str] = (), extra: dict | None = None):
    """Print the markdown table and write the JSON if asked."""
    print(markdown(config, rows, notes), flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": config, "rows": [r.as_dict() for r in rows], "notes": list(notes), **(extra or {})}
        json_path.write_text(json.dumps(payload, indent=2))
