"""User errors: bad input that ends a command with one line on stderr and exit status 2.

Every error the user can fix (a missing file, a bad field in a data file, a refused checkpoint,
an unreachable tracking server, a mistyped option) is a :class:`UserError` (or one of the
library's argument errors); ``src.cli.main`` catches them and prints :func:`one_line` of the
message instead of a traceback. Everything else is a bug and keeps its traceback.
"""

import re
import sys

#: Exit status of a command stopped by bad input (argparse's convention).
USER_ERROR_EXIT = 2

#: Keyword arguments of every command's parser: a mistyped option (``--trainer.max_epoch``) is
#: an error instead of an abbreviation, and errors are raised for ``main`` to print in one line.
STRICT_PARSER: dict[str, bool] = {"allow_abbrev": False, "exit_on_error": False}


class UserError(Exception):
    """Bad input that the user can fix; the message names the file (or option) and the field."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command was pointed at does not exist (or is of the wrong kind)."""


class InvalidInputError(UserError, ValueError):
    """A file or option holds a value the command cannot use."""


class UntrainedModelError(UserError):
    """``test``/``predict`` of a model whose adapter was never trained, without the explicit
    ``--allow_untrained true``."""


# jsonargparse explains a nested error by listing every member of each Union it tried; these
# lines say nothing about the cause.
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the|Subtypes:|Errors:|Given value type:|"
    r"Expected a <class 'NoneType'>|Problem with given class_path|Parser key )"
)


def condense_argument_error(message: str) -> str:
    """One line from a (possibly many-line) jsonargparse error: the nested key it names (e.g.
    ``model.lr``), the innermost reason and the value given, without the Union member lists."""
    text = str(message)
    keys = re.findall(r'Parser key "([^"]+)"', text)
    if not keys:
        return one_line(text)
    lines = [(len(raw) - len(raw.lstrip()), raw.strip()) for raw in text.splitlines()]
    reasons = [(depth, line) for depth, line in lines if line and not _NOISE.match(line)]
    causes = [(d, line) for d, line in reasons if not line.startswith("Given value:")]
    given = next((line for _, line in reasons if line.startswith("Given value:")), "")
    cause = max(causes, key=lambda item: item[0])[1].removeprefix("- ") if causes else ""
    if given and "Got value" not in cause:
        cause = f"{cause} ({given[:120]})" if cause else given[:120]
    return f"option {'.'.join(keys)}: {cause or 'invalid value'}"


def find_user_error(err: BaseException) -> BaseException | None:
    """``err`` itself if it is a user error, else the first :class:`UserError` it was raised
    from (jsonargparse re-raises an error of a class's ``__init__`` as a Union ``ValueError``
    whose cause is the original), else ``None``."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(message: object) -> str:
    """``message`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(message).split())


#: (words an argument error contains, what to add): known slips of the config groups.
ARGUMENT_HINTS = (
    (
        ("trainer.logger", "is abstract"),
        "the conf/ experiments set the logger in the tracking group: use "
        "--tracking.logger.init_args.<key> (conf/tracking/mlflow.yaml)",
    ),
)
#: Init arguments of the model that moved into its backbone component (old name -> new key).
MOVED_TO_BACKBONE = {
    "backbone_path": "path",
    "backbone_config": "config",
    "backbone_seed": "seed",
    "dtype": "dtype",
    "attn_implementation": "attn_implementation",
    "projector_hidden": "projector_hidden",
}
ARGUMENT_HINTS += tuple(
    (
        ("option model:", f"Option '{old}' is not accepted"),
        f"the backbone is a component (conf/model/tiny_llama.yaml): use --model.backbone.{new}",
    )
    for old, new in MOVED_TO_BACKBONE.items()
)


def with_hint(text: str) -> str:
    """``text`` plus the hint of the first :data:`ARGUMENT_HINTS` entry it matches."""
    for words, hint in ARGUMENT_HINTS:
        if all(word in text for word in words):
            return f"{text}; {hint}"
    return text


def report_user_error(err: BaseException, prog: str = "python -m src.cli") -> int:
    """Print ``err`` as one line on stderr; returns :data:`USER_ERROR_EXIT`."""
    text = (
        with_hint(condense_argument_error(str(err))) if not isinstance(err, UserError) else str(err)
    )
    print(f"{prog}: error: {one_line(text)}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT
