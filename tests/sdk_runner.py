"""Running one SDK scenario script in the SDK's own venv, for the E2B and Wrenn SDK tests: the
scenario prints one JSON object as its last line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def run_scenario(
    python: Path, script: Path, env: dict[str, str], scenario: str, *args: str, timeout: float
) -> dict[str, Any]:
    result = subprocess.run(
        [str(python), str(script), scenario, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"SDK scenario {scenario} failed:\n{result.stdout}\n{result.stderr}"
    )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out
