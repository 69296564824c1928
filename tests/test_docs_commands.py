"""Every command the README and docs/ show still runs: each `python run.py ...` parses into a config
(`--print_config`, with the checkpoints it names standing in the run folder), each script exists and accepts the
flags shown (`--help`). Commands with `<placeholders>` are templates and are counted, not run.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, STAGE1_CKPT, TOKENIZER_CKPT, copy_run, run_cli

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ENV_PREFIX = re.compile(r"^(\w+=\S*\s+)+")  # OMP_NUM_THREADS=1 python ...


def bash_commands(path: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, comments dropped, variables expanded."""
    commands, variables = [], {}
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            assignment = re.fullmatch(r'(\w+)=("[^"]*"|\S+)', line)
            if assignment:
                variables[assignment[1]] = assignment[2].strip('"')
                continue
            for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):
                line = line.replace(f"${name}", value)
            commands.extend(part.strip() for part in line.split("&&"))
    return commands


def all_commands() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(REPO)}: {c}", c) for p in DOCS for c in bash_commands(p)]


RUN_PY = [(name, c) for name, c in all_commands() if ENV_PREFIX.sub("", c).startswith("python run.py")]
SCRIPTS = [(name, c) for name, c in all_commands()
           if re.match(r"(python (benchmarks|-m)|bash benchmarks)", ENV_PREFIX.sub("", c))]


def test_the_docs_show_commands():
    assert len(RUN_PY) >= 15 and len(SCRIPTS) >= 5


def stand_ins(folder: Path) -> dict[str, str]:
    """The fixture run's checkpoints under the paths the docs name, and an image folder and masks for theirs."""
    stage1 = torch.load(folder / STAGE1_CKPT, map_location="cpu", weights_only=True)
    for stage, trained in [("distill", {"stage": "DistillModule", "choice_temperature": 0.0}),
                           ("raster", {"train_order": "raster"}), ("my_model", {})]:
        (folder / "runs" / stage / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.save({**stage1, "trained": {**stage1["trained"], **trained}},
                   folder / "runs" / stage / "checkpoints" / "last.ckpt")
    (folder / "runs" / "my_tokenizer" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "runs" / "my_tokenizer" / "checkpoints" / "last.ckpt").write_bytes((folder / TOKENIZER_CKPT).read_bytes())
    (folder / "pretrained").mkdir(exist_ok=True)  # docs/imagenet.md's converted releases
    (folder / "pretrained" / "vq16.ckpt").write_bytes((folder / TOKENIZER_CKPT).read_bytes())
    (folder / "pretrained" / "randar_l.ckpt").write_bytes((folder / STAGE1_CKPT).read_bytes())
    images, masks = folder / "images", folder / "masks"
    for root in (images, masks):
        (root / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / "a" / "0.png")
    return {"/path/to/images": str(images), "/path/to/masks": str(masks), "/data/imagenet/train": str(images)}


@pytest.mark.slow
@pytest.mark.parametrize("name,command", RUN_PY, ids=[n for n, _ in RUN_PY])
def test_every_run_py_command_parses(name, command, orders_run, tmp_path, monkeypatch, capsys):
    if re.search(r"<\w[^>]*>", command):
        pytest.skip("a template: its <placeholders> are the reader's")
    monkeypatch.chdir(copy_run(orders_run, tmp_path))
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the docs' commands name configs/ from the repo root
    for placeholder, path in stand_ins(tmp_path).items():
        command = command.replace(placeholder, path)
    args = shlex.split(ENV_PREFIX.sub("", command))[2:]  # after `python run.py`
    with pytest.raises(SystemExit) as done:
        run_cli(*args, "--print_config")
    assert done.value.code in (None, 0), capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name,command", SCRIPTS, ids=[n for n, _ in SCRIPTS])
def test_every_script_exists_and_takes_its_flags(name, command):
    words = shlex.split(ENV_PREFIX.sub("", command))
    if words[0] == "bash":
        assert (REPO / words[1]).is_file(), words[1]
        return
    target = ["-m", words[2]] if words[1] == "-m" else [words[1]]
    if words[1] != "-m":
        assert (REPO / words[1]).is_file(), words[1]
    help_text = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=300)
    assert help_text.returncode == 0, help_text.stderr[-2000:]
    flags = {w.split("=")[0] for w in words if w.startswith("--")}
    missing = {f for f in flags if f not in help_text.stdout}
    assert not missing, (missing, command)
