"""``-c file.yaml`` in every form behaves exactly like ``--config file.yaml`` (no demo config)."""

import pytest

from src.cli import main
from tests.conftest import TINY_CONFIG


def printed(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "form",
    [["-c", str(TINY_CONFIG)], [f"-c={TINY_CONFIG}"], [f"-c{TINY_CONFIG}"]],
    ids=["-c X", "-c=X", "-cX"],
)
def test_short_config_option_equals_long(workdir, capsys, form):
    long = printed(capsys, ["--config", str(TINY_CONFIG)])
    assert printed(capsys, form) == long
    assert "token_imbalance" not in long  # the demo's world did not leak in
