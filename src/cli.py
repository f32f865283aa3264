"""``python -m src.cli``: LightningCLI subcommands (fit, validate, test, predict) plus extra ones.

With no ``--config``, ``conf/default.yaml`` (the embedded CPU demo) is used. After ``fit`` the best
checkpoint is tested on the test split (turn off with ``--test_after_fit false``).
"""

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light imports only: Lightning, torch, transformers and peft load when a command needs them
# (src.lightning_cli for fit/validate/test/predict; each extra command imports its own module).
from src.commands.registry import EXTRA_COMMANDS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

if TYPE_CHECKING:
    from src.lightning_cli import MoSEARCLI


def _with_default_config(argv: list[str]) -> list[str]:
    if (
        argv
        and argv[0] in LIGHTNING_SUBCOMMANDS
        and not any(a.startswith("--config") for a in argv)
    ):
        return [argv[0], "--config", str(DEFAULT_CONFIG), *argv[1:]]
    return argv


def _run_extra(name: str, argv: list[str]) -> int:
    target, _ = EXTRA_COMMANDS[name]
    module_name, function = target.split(":")
    return int(getattr(importlib.import_module(module_name), function)(argv) or 0)


#: One line per Lightning subcommand for the top-level help (its options: ``<command> --help``).
LIGHTNING_HELP = {
    "fit": "train (conf/default.yaml: the embedded demo), then test the best checkpoint",
    "validate": "run one validation epoch",
    "test": "test a checkpoint on the test split",
    "predict": "predict and write the predictions",
}


def print_help(file: Any = None) -> None:
    """The top-level help: every command, without importing Lightning (fast)."""
    file = file or sys.stdout
    width = max(map(len, [*EXTRA_COMMANDS, *LIGHTNING_SUBCOMMANDS]))
    print(
        "usage: python -m src.cli <command> [options]   (<command> --help: its options)", file=file
    )
    print("\ntraining commands (LightningCLI, YAML configs under conf/):", file=file)
    for name in LIGHTNING_SUBCOMMANDS:
        print(f"  {name:<{width}}  {LIGHTNING_HELP[name]}", file=file)
    print("\nextra commands:", file=file)
    for name, (_, help_text) in EXTRA_COMMANDS.items():
        print(f"  {name:<{width}}  {help_text}", file=file)


def main(args: list[str] | None = None) -> "MoSEARCLI | int":
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from src.lightning_cli import LogConfigToMLflow, MoSEARCLI

    argv = _with_default_config(argv)
    if args is None:
        # From the shell: keep sys.argv complete (with the default config), since the DDP
        # launcher restarts this same command line in its worker processes.
        sys.argv[1:] = argv
    return MoSEARCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LogConfigToMLflow,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=None if args is None else argv,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    result = main()
    if isinstance(result, int):
        sys.exit(result)
