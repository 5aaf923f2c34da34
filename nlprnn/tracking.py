"""Weights & Biases: offline unless WANDB_MODE=online, and an online run that cannot log in stops at once."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from nlprnn.errors import UserError

LOGIN_TIMEOUT_S = 10
OFFLINE_HINT = "or unset WANDB_MODE to log offline and upload later with `wandb sync`"


def online() -> bool:
    return os.environ.get("WANDB_MODE", "offline") in ("online", "run")


def check_online_login() -> None:
    """Log in before any data is prepared: without a key or a network, wandb would fail minutes later, mid-setup."""
    import wandb

    try:
        wandb.login(verify=True, timeout=LOGIN_TIMEOUT_S)
    except wandb.errors.UsageError:
        raise UserError("WANDB_MODE=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY, "
                        f"{OFFLINE_HINT}") from None
    except Exception as err:  # AuthenticationError, CommError, timeouts: all mean "cannot log in from here"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"WANDB_MODE=online, but W&B login failed ({reason}); check the network and the key, "
                        f"{OFFLINE_HINT}") from None


def wandb_logger(project: str, run_name: str, run_dir: Path) -> WandbLogger:
    """The run's W&B logger; its files go to <run folder>/wandb, whether offline or online."""
    # A resumed run is a new W&B run; the group keeps the pieces of one run folder together.
    return WandbLogger(project=project, name=run_name, group=run_name, save_dir=str(run_dir), offline=not online())
