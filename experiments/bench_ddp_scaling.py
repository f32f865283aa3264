"""Step time of the tiny demo on 1 vs 2 CPU processes (ddp_spawn), and test-metric equality.

Trains the demo config (`conf/experiment/lora.yaml` by default) for a few epochs with 1 process
and with 2 processes, timing every training step after the first epoch with a callback
(``time.perf_counter`` around ``on_train_batch_start``/``end`` on rank zero). With DDP each process
takes its own batch, so 2 processes do twice the samples per step: the table reports median step
time and samples per second. Then it tests the 1-process checkpoint with 1 and with 2 processes and
prints the largest difference of any test metric.

    python experiments/bench_ddp_scaling.py --epochs 3
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightning.pytorch.callbacks import Callback  # noqa: E402

from src.cli import main  # noqa: E402


class StepTimer(Callback):
    """Records wall time of each training step after the first epoch (rank zero)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch > 0 and trainer.is_global_zero:
            self.times.append(time.perf_counter() - self._start)


def fit(config: str, devices: int, epochs: int, batch: int) -> tuple[float, str]:
    timer_file = Path(tempfile.mkstemp(suffix=".txt")[1])
    args = [
        "fit",
        "--config",
        config,
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.enable_progress_bar",
        "false",
        "--test_after_fit",
        "false",
        "--tracking.logger.init_args.experiment_name",
        "ddp_scaling",
        "--data.init_args.batch_size",
        str(batch),
        "--trainer.callbacks+=experiments.bench_ddp_scaling.StepTimerToFile",
        "--trainer.callbacks.init_args.path",
        str(timer_file),
    ]
    if devices > 1:
        args += ["--trainer.strategy", "ddp_spawn", "--trainer.devices", str(devices)]
    cli = main(args)
    times = [float(x) for x in timer_file.read_text().split()]
    return statistics.median(times), cli.trainer.checkpoint_callback.best_model_path


class StepTimerToFile(StepTimer):
    """:class:`StepTimer` that writes its times to ``path`` (workers of ddp_spawn are processes).

    Args:
        path: File to write the step times to, one per line.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            Path(self.path).write_text("\n".join(f"{t:.6f}" for t in self.times))


def test_metrics(config: str, ckpt: str, devices: int) -> dict[str, float]:
    args = [
        "test",
        "--config",
        config,
        "--ckpt_path",
        ckpt,
        "--trainer.enable_progress_bar",
        "false",
        "--tracking.logger.init_args.experiment_name",
        "ddp_scaling",
    ]
    if devices > 1:
        args += ["--trainer.strategy", "ddp_spawn", "--trainer.devices", str(devices)]
    cli = main(args)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "conf/experiment/lora.yaml"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    one, ckpt = fit(args.config, 1, args.epochs, args.batch_size)
    two, _ = fit(args.config, 2, args.epochs, args.batch_size)
    print("\n| processes | median step s | samples/s | speed-up (samples/s) |")
    print("|---|---|---|---|")
    print(f"| 1 | {one:.4f} | {args.batch_size / one:.1f} | 1.00 |")
    print(f"| 2 | {two:.4f} | {2 * args.batch_size / two:.1f} | {2 * one / two:.2f} |")
    m1, m2 = test_metrics(args.config, ckpt, 1), test_metrics(args.config, ckpt, 2)
    diff = max(abs(m1[k] - m2[k]) for k in m1)
    print(
        f"\ntest metrics, 1 vs 2 processes on the same checkpoint: {len(m1)} metrics, "
        f"max |difference| = {diff:.2e}; test/acc {m1['test/acc']:.4f} vs {m2['test/acc']:.4f}"
    )
