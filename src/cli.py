"""``python -m src.cli``: LightningCLI subcommands (fit, validate, test, predict) plus extra ones.

With no ``--config`` (or ``-c``), ``conf/default.yaml`` (the embedded CPU demo) is used. After
``fit`` the best checkpoint is tested on the test split (turn off with ``--test_after_fit false``).
"""

import importlib
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light imports only: Lightning, torch, transformers and peft load when a command needs them
# (src.lightning_cli for fit/validate/test/predict; each extra command imports its own module).
from src.commands.registry import EXTRA_COMMANDS
from src.core.errors import find_user_error, report_user_error

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "default.yaml"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

if TYPE_CHECKING:
    from src.lightning_cli import MoSEARCLI


def _is_config_option(arg: str) -> bool:
    """``--config X``, ``--config=X`` or the short forms ``-c X``, ``-c=X``, ``-cX``."""
    return arg.startswith("--config") or (arg.startswith("-c") and not arg.startswith("--"))


def _with_default_config(argv: list[str]) -> list[str]:
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS and not any(map(_is_config_option, argv)):
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


def _is_preemption(exit_: SystemExit) -> bool:
    # Lightning turns SIGTERM into SIGTERMException (a SystemExit); only a Lightning command can
    # raise it, so its module is loaded whenever this matters.
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(exit_, exceptions.SIGTERMException)


def main(args: list[str] | None = None) -> "MoSEARCLI | int":
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (tests call ``main([...])``).

    Returns the CLI (Lightning subcommands) or the exit status (extra commands). Bad input
    (:class:`~src.core.errors.UserError`, a parser error) prints one line on stderr and returns 2;
    a SIGTERM during fit saves a resumable checkpoint and returns 143.
    """
    try:
        return _main(args)
    except ArgumentError as err:
        return report_user_error(err)
    except SystemExit as exit_:
        if not _is_preemption(exit_):
            raise
        from src.callbacks.preemption import PREEMPTED_EXIT, preempted_message

        print(preempted_message(), file=sys.stderr, flush=True)
        return PREEMPTED_EXIT
    except Exception as err:
        # Ours, or one the parser re-raised while building a class (its cause is ours).
        user_error = find_user_error(err)
        if user_error is None:
            raise
        return report_user_error(user_error)


def _main(args: list[str] | None) -> "MoSEARCLI | int":
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print_help(sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from src.lightning_cli import run_lightning

    argv = _with_default_config(argv)
    if args is None:
        # From the shell: keep sys.argv complete (with the default config), since the DDP
        # launcher restarts this same command line in its worker processes.
        sys.argv[1:] = argv
    return run_lightning(argv, from_shell=args is None)


if __name__ == "__main__":
    result = main()
    if isinstance(result, int):
        sys.exit(result)
