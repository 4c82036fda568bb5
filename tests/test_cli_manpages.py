"""The client commands' man pages say what their --help says.

Each packaging/man/b0-pm-COMMAND.1 must hold the command's description,
every option and every example of `b0-pm COMMAND --help`, word for word,
so the two cannot drift apart.
"""

import re
import subprocess
from pathlib import Path

import pytest

from tests.test_cli_client import B0PM

MAN_DIR = Path(__file__).resolve().parent.parent / "packaging" / "man"
COMMANDS = ("start", "stop", "status", "list", "hosts", "logs")


def plain(groff: str) -> str:
    """The page's text with groff escapes undone and whitespace collapsed."""
    text = groff.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\").replace("\\&", "")
    text = re.sub(r"^\.[A-Z]+ ?", "", text, flags=re.MULTILINE)  # macro names (.TP, .B, ...)
    return " ".join(text.split())


def help_text(command: str) -> str:
    done = subprocess.run([*B0PM, command, "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    return done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_man_page_has_the_help_description_options_and_examples(command):
    page = plain((MAN_DIR / f"b0-pm-{command}.1").read_text())
    text = help_text(command)
    # The epilog's paragraph is the block just before "examples:".
    description = text.split("examples:")[0].rsplit("\n\n", 2)[-2]
    assert " ".join(description.split()) in page
    for option in re.findall(r"^  (-[-\w]+(?:, --[-\w]+)?)", text, flags=re.MULTILINE):
        if option != "-h, --help":
            assert option in page, option
    examples = text.split("examples:\n")[1].split("\n\nexit status:")[0]
    for line in examples.splitlines():
        assert " ".join(line.split()) in page, line


def test_main_page_lists_every_client_page():
    page = (MAN_DIR / "b0-pm.1").read_text()
    for command in COMMANDS:
        assert f".BR b0-pm-{command} (1)" in page
