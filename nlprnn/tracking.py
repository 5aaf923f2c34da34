"""Weights & Biases: offline unless WANDB_MODE=online, and an online run that cannot log in stops at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from nlprnn.errors import UserError

LOGIN_TIMEOUT_S = 10
CHECK_DEADLINE_S = LOGIN_TIMEOUT_S + 50  # the child process as a whole: start-up, login and its retries
OFFLINE_HINT = "or unset WANDB_MODE to log offline and upload later with `wandb sync`"
WANDB_GROUP_ENV = "NLPRNN_WANDB_GROUP"  # the W&B group of a run; its run name when unset

# Run in a child process that skips exit handlers: after a failed login, wandb's wait minutes for its service.
LOGIN_CHECK = """
import json, os, sys
try:
    import wandb
    wandb.login(verify=True, timeout=float(sys.argv[2]))
    result = {"ok": True}
except Exception as err:
    lines = str(err).strip().splitlines()
    result = {"ok": False, "no_key": type(err).__name__ == "UsageError", "reason": lines[0] if lines else repr(err)}
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
os._exit(0)
"""


def online() -> bool:
    return os.environ.get("WANDB_MODE", "offline") in ("online", "run")


def disabled() -> bool:
    """W&B's own switch, WANDB_MODE=disabled: no W&B run at all, as with --trainer.logger false."""
    return os.environ.get("WANDB_MODE") == "disabled"


def check_online_login() -> None:
    """Log in before any data is prepared: without a key or a network, wandb would fail minutes later, mid-setup."""
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "login.json"
        try:  # no pipes: wandb's service, which outlives the check for a while, would hold them open
            subprocess.run([sys.executable, "-c", LOGIN_CHECK, str(answer), str(LOGIN_TIMEOUT_S)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=CHECK_DEADLINE_S)
        except subprocess.TimeoutExpired:
            raise UserError(f"WANDB_MODE=online, but W&B login did not finish in {CHECK_DEADLINE_S} s; "
                            f"check the network, {OFFLINE_HINT}") from None
        result = json.loads(answer.read_text()) if answer.exists() else {"ok": False, "reason": "wandb crashed"}
    if result.get("no_key"):
        raise UserError("WANDB_MODE=online needs a W&B API key: run `wandb login` or set WANDB_API_KEY, "
                        f"{OFFLINE_HINT}")
    if not result["ok"]:
        raise UserError(f"WANDB_MODE=online, but W&B login failed ({result['reason']}); check the network and the "
                        f"key, {OFFLINE_HINT}")


def wandb_logger(project: str, run_name: str, run_dir: Path) -> WandbLogger:
    """The run's W&B logger; its files go to <run folder>/wandb, whether offline or online."""
    # A resumed run is a new W&B run; the group keeps the pieces of one run folder together
    # (nlprnn.tune sets NLPRNN_WANDB_GROUP to its study, so that one study's trials form one group).
    group = os.environ.get(WANDB_GROUP_ENV) or run_name
    return WandbLogger(project=project, name=run_name, group=group, save_dir=str(run_dir), offline=not online())
