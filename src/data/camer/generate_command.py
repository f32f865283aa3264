"""``python -m src.cli generate-camer``: write the synthetic CA-MER data set to a folder.

The folder must be empty or one the generator made; a folder holding other files (a real data
set) is refused with exit 2 and nothing is written there.
"""

import sys
from dataclasses import asdict

from jsonargparse import ArgumentParser

from src.core.errors import STRICT_PARSER
from src.core.streams import StreamSpec
from src.data.camer.synthetic import SyntheticCAMERConfig, ensure_synthetic_camer

DEMO_STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 64, 16),
    StreamSpec("video", "maeV_399_UTT", "visual", 64, 16),
    StreamSpec("audio", "HL-UTT", "audio", 64, 1),
]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        **STRICT_PARSER, prog="python -m src.cli generate-camer", description=__doc__
    )
    parser.add_argument("--config", action="config")
    parser.add_argument("--root", type=str, required=True, help="output folder")
    parser.add_argument("--streams", type=list[StreamSpec], default=DEMO_STREAMS)
    parser.add_class_arguments(SyntheticCAMERConfig, "synthetic")
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    try:
        root = ensure_synthetic_camer(init.root, init.streams, init.synthetic)
    except FileExistsError as err:  # a foreign folder, or one made with other settings
        print(f"generate-camer: error: {err}", file=sys.stderr)
        return 2
    print(f"synthetic CA-MER in {root} ({asdict(init.synthetic)})")
    return 0
