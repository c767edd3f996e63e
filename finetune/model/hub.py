"""The Hugging Face Hub: what a recipe needs from it, fetched ahead of time (`finetune download`, `make download`),
and a missing piece reported at once instead of after a minute of retries.

    make download RECIPE=recipes/qlora_int4.yaml          # on a machine with internet: model, tokenizer, dataset
    HF_HUB_OFFLINE=1 sbatch launch/slurm.sbatch recipes/qlora_int4.yaml   # compute nodes read the cache only

Compute nodes of a cluster often have no internet: download on the login node into the shared HF cache (HF_HOME),
then train with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune import errors
from finetune.errors import UsageError

# Weight formats other than safetensors, and copies for other runtimes: never what the Trainer loads.
SKIPPED = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "original/*", "onnx/*"]


def hub_ids(model, data) -> list[tuple[str, str]]:
    """(repo type, id) of what the recipe takes from the hub: its model, its dataset when not a local file."""
    from finetune.recipe.keys import is_local_path

    ids = []
    if not is_local_path(model.model_name_or_path):
        ids.append(("model", model.model_name_or_path))
    if data.dataset and not is_local_path(data.dataset):
        ids.append(("dataset", data.dataset))
    return ids


def is_cached(repo_type: str, repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    return isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str)


def endpoint_problem(timeout: float = 5.0) -> str | None:
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(endpoint.rstrip("/") + "/api/models?limit=1", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as error:
        return f"{endpoint} can't be reached ({getattr(error, 'reason', error)})"
    return None


def offline_problems(model, data, recipe_path: str) -> list[str]:
    """What the recipe needs from the hub that this machine can't get: not in the HF cache, and the hub off
    (HF_HUB_OFFLINE) or unreachable. Checked in seconds; without it a missing model takes ~a minute of retries."""
    from huggingface_hub import constants

    missing = [(kind, name) for kind, name in hub_ids(model, data) if not is_cached(kind, name)]
    if not missing:
        return []
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else endpoint_problem()
    if why is None:
        return []
    fix = f"fetch it on a machine with internet: make download RECIPE={recipe_path} (same HF_HOME), then train here"
    return [f"{'model_name_or_path' if kind == 'model' else 'dataset'}: {name} is not in the HF cache and {why}; "
            f"{fix}" for kind, name in missing]


def check(recipe_path, groups: dict) -> None:
    """Raise UsageError with offline_problems, and with what is wrong with a GGUF base (finetune.model.gguf: an
    architecture or tensor type transformers can't read), for read_checked's result. Runs before any process
    starts, so a launcher reports it once, with nothing written."""
    from finetune.model import gguf as gguf_import
    from finetune.recipe import keys as config

    model, data = groups[config.ModelArguments], groups[config.DataArguments]
    problems = offline_problems(model, data, str(recipe_path))
    if gguf_import.is_gguf(model.model_name_or_path) and not config.is_embedded_asset(Path(model.model_name_or_path)):
        problems += [p for p in [gguf_import.problem(Path(model.model_name_or_path).expanduser())] if p]
    if problems:
        raise UsageError(problems)


def download(model, data) -> None:
    """Model weights (safetensors), config and tokenizer, and the dataset, into the HF cache."""
    from huggingface_hub import snapshot_download

    for kind, name in hub_ids(model, data):
        print(f"{kind} {name}", file=sys.stderr, flush=True)
        if kind == "model":
            snapshot_download(name, ignore_patterns=SKIPPED)
        else:
            import datasets

            datasets.load_dataset(name, data.dataset_config, split=data.dataset_split)


def main(argv: list[str] | None = None) -> int:
    from finetune.recipe import keys as config
    from finetune.recipe.load import read_checked

    argv = sys.argv[1:] if argv is None else argv
    try:
        path, _, _, groups = read_checked(argv)
        model, data = groups[config.ModelArguments], groups[config.DataArguments]
        if not hub_ids(model, data):
            print(f"{path}: the model and the data are local; nothing to download", file=sys.stderr)
            return errors.OK
        problem = endpoint_problem()
        if problem:
            raise UsageError(f"{problem}: download on a machine with internet (a cluster's login node), into the "
                             "HF cache the training machines read (HF_HOME)")
        download(model, data)
    except UsageError as error:
        return errors.report(error)
    print(f"cached in {os.environ.get('HF_HOME') or '~/.cache/huggingface'}; train offline with HF_HUB_OFFLINE=1",
          file=sys.stderr)
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
