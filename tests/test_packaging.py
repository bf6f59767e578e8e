"""What can be checked of the image and the Slurm script without docker or a cluster: the files
the Dockerfile copies exist, its command is the README's, the torch of the base image is kept,
and the sbatch script parses and launches the way the README documents."""

import json
import re
import shlex
import subprocess
from pathlib import Path

from launcher.pretrain import parse_args

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
SBATCH = REPO / "launcher" / "slurm" / "pretrain.sbatch"
README = (REPO / "README.md").read_text()


def instructions(name: str) -> list[str]:
    """Arguments of every `NAME ...` instruction, continuation lines joined."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_the_image_builds_on_ngc_pytorch_and_keeps_its_torch():
    (base,) = instructions("FROM")
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base.strip())
    (install,) = [run for run in instructions("RUN") if "pip install" in run]
    assert "--constraint" in install and "torch.__version__" in install  # pinned to the base image's build
    assert not re.search(r"pip install[^&]*\btorch\b", install.split("--constraint")[0])


def test_every_copied_path_exists_and_reaches_the_build():
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    sources = [src for copy in instructions("COPY") for src in copy.split()[:-1] if not src.startswith("--")]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert src.rstrip("/") not in ignored, f"{src} is excluded by .dockerignore"


def test_the_image_command_is_the_readme_command():
    (entrypoint,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    command = " ".join(json.loads(entrypoint) + json.loads(cmd))
    assert f"`{command}`" in README
    assert (REPO / json.loads(cmd)[2]).is_file() and (REPO / json.loads(cmd)[-1]).is_file()


def torchrun_flags(command: str) -> set[str]:
    return {word for word in shlex.split(command) if word.startswith("--")}


def test_the_sbatch_script_parses_and_launches_like_the_readme():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    script = SBATCH.read_text()
    for needle in (
        "#SBATCH --signal=B:USR1@120",
        "exec srun",
        "scontrol show hostnames",
        "--resume auto",
        "launcher/pretrain.py",
    ):
        assert needle in script, needle
    launch = script[script.index("exec srun") :].replace("\\\n", " ")
    readme_launch = re.search(r"```bash\n(torchrun --nnodes N.*?)```", README, re.S).group(1).replace("\\\n", " ")
    torchrun_part = launch[launch.index("torchrun") :]
    assert torchrun_flags(torchrun_part) == torchrun_flags(readme_launch)  # same torchrun and launcher options
    assert "SIGUSR1" in torchrun_part  # torchrun would otherwise die of the signal instead of forwarding it
    assert parse_args(["--config", "configs/tiny.yaml", "--resume", "auto"]).resume == "auto"


def test_every_environment_variable_of_the_script_is_in_the_readme():
    header = SBATCH.read_text().split("#SBATCH", 1)[0]
    documented = re.findall(r"^#   ([A-Z][A-Z_0-9]+)", header, re.M)
    assert len(documented) >= 8
    for name in documented:
        assert f"`{name}`" in README, name
