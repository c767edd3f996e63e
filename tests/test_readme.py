"""The README's commands, as a new user meets them: every fenced command names things that exist (make targets,
finetune commands, modules, scripts, recipes, configs) and parses as bash; the ones that run offline in seconds
run as written, in a fresh shell that activates the virtualenv the way the README says, in a copy of the
repository."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from finetune.cli import COMMANDS
from tests.conftest import REPO

pytestmark = pytest.mark.slow

ACTIVATE = "source .venv/bin/activate"
# Offline, seconds each, given a finished tiny run in outputs/tiny (the fixture trains a short one there).
RUN_AS_WRITTEN = [
    'finetune chat outputs/tiny --prompt "Reverse the word. abcde"',
    "python finetune/run.py --help",
    "python finetune/run.py recipes/tiny.yaml --print_config",
    "python finetune/run.py recipes/tiny.yaml --dry_run",
    "finetune sweep recipes/sweeps/tiny_lr_rank.yaml --check",
]


DOCS = sorted((REPO / "docs").glob("*.md"))


def readme_commands(pages: list = (REPO / "README.md",)) -> list[str]:
    """Each command of the ```bash blocks of `pages` (the README by default): continuation lines joined, comments
    dropped."""
    commands = []
    blocks = [block for page in pages for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL)]
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.MULTILINE))


def test_every_command_names_what_exists():
    """In the README and every page of docs/."""
    commands = readme_commands([REPO / "README.md", *DOCS])
    assert ACTIVATE in commands and len(commands) > 60
    targets = make_targets()
    for command in commands:
        words = [word for word in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=.*", word)]
        program, args = words[0], words[1:]
        if program == "make":
            assert args[0] in targets, command
        elif program == "finetune":
            assert args[0] in COMMANDS, command
        elif program in ("python", "accelerate") and "-m" in args:
            module = args[args.index("-m") + 1]
            assert (REPO / (module.replace(".", "/") + ".py")).is_file(), command
        else:
            assert program in ("python", "accelerate", "sbatch", "source", "wandb") or (REPO / program).is_file(), \
                command
        for word in args:  # the repository's own files: recipes, launch configs, scripts
            if re.match(r"(recipes|launch|finetune|benchmarks)/", word):
                assert (REPO / word).exists(), f"{command}: {word}"
    script = "\n".join(commands)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The repository's tracked files in a fresh directory, with this virtualenv, and a short tiny run in
    outputs/tiny (the README's `make train`, shortened)."""
    root = tmp_path_factory.mktemp("checkout") / "finetune"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    # -o: the checkout shares this virtualenv, which it must never reinstall (its editable install of the toolkit
    # would then point at the checkout).
    result = shell(root, "make -o .venv/.installed train ARGS=\"--max_steps 5 --eval_strategy no --disable_tqdm true\"")
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def shell(root, command: str) -> subprocess.CompletedProcess:
    """`command` in a new login-less bash, with no virtualenv active and none of the caller's Python on PATH."""
    path = ":".join(p for p in os.environ["PATH"].split(":") if ".venv" not in p and "pyenv/shims" not in p)
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/root"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", RUN_AS_WRITTEN)
def test_offline_commands_run_as_written(checkout, command):
    assert command in readme_commands()
    result = shell(checkout, f"{ACTIVATE} && {command}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), command


def test_the_readme_is_a_front_door_to_the_manual():
    """Under 250 lines; every page of docs/ one link away; every link between them lands on a file."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert DOCS and all(f"(docs/{page.name})" in readme for page in DOCS)
    for page in [REPO / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
