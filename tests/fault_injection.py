"""Callbacks that inject faults into a real fit (used from test configs, never from src/), and
helpers that write variants of the tiny config and run the CLI in a subprocess."""

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from tests.conftest import REPO, TINY_CONFIG

#: Synthetic data of one training step per epoch (for fits that must be quick).
SMALL = {"seed": 0, "n_train": 16, "n_val": 8, "n_test": 12}

#: A checkpoint written at the end of every epoch as ``last.ckpt`` (the resume point).
RESUME_CHECKPOINT = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"monitor": "step", "mode": "max", "save_top_k": 1, "filename": "last"},
}


def tiny_config(
    folder: Path,
    *,
    trainer: dict[str, Any] | None = None,
    callbacks: list[dict[str, Any]] | None = None,
    logger: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    name: str = "config.yaml",
    resume_checkpoint: bool = True,
) -> Path:
    """Write the tiny config with ``trainer`` keys replaced, ``callbacks`` appended and the
    logger's / data's ``init_args`` updated; returns the file. With ``resume_checkpoint``,
    ``last.ckpt`` is written at every epoch end (:data:`RESUME_CHECKPOINT`)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["trainer"].update(trainer or {})
    # The tiny config already writes last.ckpt every epoch (RESUME_CHECKPOINT): Lightning 2.6
    # refreshes a monitored checkpoint's last.ckpt only when the metric improves.
    existing = [c for c in config["trainer"]["callbacks"] if c != RESUME_CHECKPOINT]
    if resume_checkpoint:
        existing.append(RESUME_CHECKPOINT)
    config["trainer"]["callbacks"] = [*existing, *(callbacks or [])]
    config["trainer"]["logger"]["init_args"].update(logger or {})
    config["data"]["init_args"].update(data or {})
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(workdir: Path, *args: str, **env: str) -> subprocess.Popen:
    """Start ``python -m src.cli *args`` in ``workdir`` (extra environment variables ``env``)."""
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.Popen(
        [sys.executable, "-m", "src.cli", *args],
        cwd=workdir,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 500) -> str:
    """Wait for a :func:`cli` process; assert it succeeded; return its output."""
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, out[-4000:]
    return out


class HangAt(Callback):
    """At ``(epoch, batch)``, create the file named by ``$<env>`` and wait there: the parent test
    kills the process (``until_sigterm`` false: sleep 600 s) or sends SIGTERM (``until_sigterm``
    true: wait up to 120 s until the trainer has received it). Does nothing when the variable is
    unset or the file exists.

    Args:
        epoch: Training epoch (0-based).
        batch: Batch index within the epoch.
        env: Environment variable holding the marker path.
        until_sigterm: Wait for the trainer's SIGTERM instead of sleeping until killed.
    """

    def __init__(
        self,
        epoch: int,
        batch: int,
        env: str = "MOSEAR_TEST_HANG_MARKER",
        until_sigterm: bool = False,
    ) -> None:
        self.epoch, self.batch, self.env, self.until_sigterm = epoch, batch, env, until_sigterm

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        marker = os.environ.get(self.env)
        if not marker or Path(marker).exists():
            return
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        Path(marker).write_text(f"{trainer.global_step}\n")
        if not self.until_sigterm:
            time.sleep(600)
            return
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


class NanFeaturesAt(Callback):
    """Turn the batch's features into NaN at ``global_step`` (a corrupt batch -> NaN loss).

    Args:
        global_step: The optimizer step whose batch is poisoned.
    """

    def __init__(self, global_step: int) -> None:
        self.global_step = global_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.global_step:
            for features in batch["features"].values():
                features.mul_(float("nan"))


class OutOfMemoryAt(Callback):
    """Raise an allocation failure at ``global_step`` in the forward or the backward pass.

    Args:
        global_step: The optimizer step that fails.
        phase: ``forward`` (a hook on the backbone) or ``backward`` (a gradient hook).
        kind: ``cuda`` (``torch.OutOfMemoryError``) or ``cpu`` (the allocator's RuntimeError).
    """

    def __init__(self, global_step: int, phase: str = "forward", kind: str = "cuda") -> None:
        self.global_step, self.phase, self.kind = global_step, phase, kind

    def _error(self) -> Exception:
        if self.kind == "cuda":
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 21474836480 bytes."
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def fail(*_: Any) -> None:
            if trainer.global_step == self.global_step and pl_module.training:
                raise self._error()

        if self.phase == "forward":
            pl_module.model.language_model.register_forward_hook(lambda *args: fail())
        else:
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            param.register_hook(lambda grad: fail())


def expect_user_error(capsys: Any, argv: list[str]) -> str:
    """Run ``src.cli.main(argv)``; assert it ended as a user error (exit status 2, one line
    ``python -m src.cli: error: ...`` last on stderr, no traceback); return that line."""
    from src.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("python -m src.cli: error: "), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1]
