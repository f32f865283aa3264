"""``python -m src.cli build-camer``: build the CA-MER manifest from per-modality annotations.

Examples::

    python -m src.cli build-camer --annotations ann.csv --output data/camer
    python -m src.cli build-camer --json_dir release/ --output data/camer --on_error skip
"""

import sys

from jsonargparse import ArgumentParser

from src.core.errors import STRICT_PARSER
from src.core.label_space import get_label_space
from src.data.camer.builder import (
    MANIFEST_NAME,
    build_from_annotations,
    build_from_subset_jsons,
    summary,
    write_build_outputs,
)
from src.data.formats.rows import ON_ERROR_CHOICES, FormatError


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        **STRICT_PARSER,
        prog="python -m src.cli build-camer",
        description="Sort per-modality annotations into the CA-MER subsets and write the "
        "manifest with a report (counts, every rejected row and its reason).",
    )
    parser.add_argument(
        "--annotations",
        type=str | None,
        default=None,
        help="CSV with name,video_label,audio_label,label[,split,reason].",
    )
    parser.add_argument(
        "--json_dir",
        type=str | None,
        default=None,
        help="Folder of video_aligned.json / audio_aligned.json / consistent.json (instead of "
        "--annotations).",
    )
    parser.add_argument("--output", type=str, required=True, help="Output folder.")
    parser.add_argument(
        "--label_space",
        type=str,
        default="mer2023",
        help="Label space name (mer2023, dfew, merr) or a comma-separated list of labels.",
    )
    parser.add_argument(
        "--split", type=str, default="test", help="Split of rows that do not give one."
    )
    parser.add_argument(
        "--on_error",
        type=str,
        default="raise",
        help=f"What to do with invalid rows: {' or '.join(ON_ERROR_CHOICES)}.",
    )
    parser.add_argument("--manifest_name", type=str, default=MANIFEST_NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0 on success, 1 when nothing was accepted, 2 on bad input."""
    args = _parser().parse_args(argv)
    if (args.annotations is None) == (args.json_dir is None):
        print(
            "build-camer: error: give exactly one of --annotations or --json_dir", file=sys.stderr
        )
        return 2
    try:
        spec = args.label_space
        label_space = get_label_space(spec if "," not in spec else spec.split(","))
        if args.annotations is not None:
            result = build_from_annotations(
                args.annotations, label_space, split=args.split, on_error=args.on_error
            )
        else:
            result = build_from_subset_jsons(
                args.json_dir, label_space, split=args.split, on_error=args.on_error
            )
    except (FormatError, FileNotFoundError, ValueError) as err:
        print(f"build-camer: error: {err}", file=sys.stderr)
        return 2
    if not result.records:
        print(summary(result))
        print("build-camer: error: no sample was accepted; nothing written", file=sys.stderr)
        return 1
    paths = write_build_outputs(result, args.output, args.manifest_name)
    print(summary(result))
    print(
        f"wrote {paths['manifest']}, {paths['report_json']}, {paths['report_csv']}, "
        f"{paths['rejected_csv']}"
    )
    return 0
