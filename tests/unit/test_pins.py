"""The guest gets exactly the envd dependency versions the host tests run with."""

from importlib.metadata import version
from pathlib import Path

import backend

REQUIREMENTS = Path(backend.__file__).parent / "envd" / "requirements.txt"


def test_every_envd_requirement_is_pinned_to_the_installed_version() -> None:
    pins = [
        line.split("==")
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert pins, "requirements.txt lists nothing"
    for name, pinned in pins:
        assert version(name) == pinned, f"{name}: host has {version(name)}, guest gets {pinned}"
