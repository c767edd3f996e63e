"""Tracking: decide from the environment whether and how the run reports to Weights & Biases.

The environment wins over the recipe: `WANDB_DISABLED=true` turns tracking off whatever `report_to` says.
A job with no W&B credentials and no `WANDB_MODE` runs offline instead of waiting at a login prompt.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)

TRUTHY = {"1", "true", "yes", "on"}


def is_truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUTHY


def has_credentials(env: Mapping[str, str]) -> bool:
    """An API key in the environment or a saved `wandb login` (netrc entry for the W&B host)."""
    if env.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(env.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, PermissionError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_report_to(source: Mapping[str, object], env: Mapping[str, str] = os.environ) -> list[str]:
    """The `report_to` list for TrainingArguments: the recipe's if set, else W&B; none when WANDB_DISABLED."""
    if is_truthy(env.get("WANDB_DISABLED")):
        logger.info("tracking is off (WANDB_DISABLED=%s)", env.get("WANDB_DISABLED"))
        return []
    requested = source.get("report_to", "wandb")
    requested = list(requested) if isinstance(requested, list) else [str(requested)]
    return [] if requested == ["none"] else requested


def prepare_environment(report_to: list[str], env=os.environ) -> None:
    """Make a W&B run safe to start non-interactively: offline when there are no credentials and no mode."""
    if "wandb" not in report_to and "all" not in report_to:
        return
    if not env.get("WANDB_MODE") and not has_credentials(env):
        env["WANDB_MODE"] = "offline"
        logger.info("no W&B credentials found: logging offline; upload later with `wandb sync wandb/offline-run-*`")
