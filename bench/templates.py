"""Recipe build benchmark: a 6-step recipe built, rebuilt unchanged, rebuilt with its last step
changed, and capsules created from the result against the default warm create, in one run.

    python -m bench.templates

Prints one JSON object. The recipe: COPY of a 10 MB file, RUN, ENV, WORKDIR, USER, START of a
server (each step's result a cached layer). Targets (issue 17): `recipe_noop_rebuild_s` <= 1.5 s,
`recipe_last_step_changed_s` <= 0.5 x `recipe_build_s`, `create_from_built_template_s` <= 1.2 x
`create_warm_s`. `oci_import_s` / `oci_import_mb_per_s`: a ~50 MB OCI layout of 3 layers
unpacked and packed as ext4 (bench/oci.py; no VM, measured first).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from backend.capsules.manager import CapsuleManager
from backend.config import Paths, default_paths
from backend.recipes.builder import RecipeBuilder
from bench import oci as oci_bench

RECIPE = """\
FROM default
COPY data.bin /opt/data.bin
RUN useradd -m app && sha256sum /opt/data.bin > /opt/data.sum
ENV APP_MODE=bench
WORKDIR /srv/app
USER app
START python3 -m http.server {port} --bind 127.0.0.1
"""


def scratch_paths(root: Path) -> Paths:
    base = default_paths()
    return Paths(
        data=base.data, state=root / "state", cache=base.cache, config=root / "config", shm=base.shm
    )


async def _timed_creates(manager: CapsuleManager, templates: list[str], n: int) -> list[float]:
    """Median create time per template, the templates taken in turn (on a shared machine a
    load spike then hits both sides of the ratio alike)."""
    times: dict[str, list[float]] = {t: [] for t in templates}
    for _ in range(n):
        for template in templates:
            t = time.monotonic()
            capsule = await manager.create(template=template)
            times[template].append(time.monotonic() - t)
            await manager.destroy(capsule.id)
    return [statistics.median(times[t]) for t in templates]


async def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    manager = CapsuleManager(scratch_paths(root))
    await manager.start(watchdog=False)
    out: dict[str, Any] = {"recipe_steps": 6, "copy_mb": 10}
    try:
        out.update(oci_bench.measure(root / "oci"))
        shutil.rmtree(root / "oci")
        ctx = root / "ctx"
        ctx.mkdir()
        (ctx / "data.bin").write_bytes(os.urandom(10 << 20))
        recipe = ctx / "Recipe"
        recipe.write_text(RECIPE.format(port=8400))
        # the warm snapshot of the default image exists before anything is timed
        first = await manager.create()
        await manager.destroy(first.id)
        builder = RecipeBuilder(manager)

        t = time.monotonic()
        await builder.build("bench", recipe)
        out["recipe_build_s"] = round(time.monotonic() - t, 3)

        t = time.monotonic()
        noop = await builder.build("bench", recipe)
        out["recipe_noop_rebuild_s"] = round(time.monotonic() - t, 3)
        assert noop.noop, noop

        recipe.write_text(RECIPE.format(port=8401))
        t = time.monotonic()
        changed = await builder.build("bench", recipe)
        out["recipe_last_step_changed_s"] = round(time.monotonic() - t, 3)
        assert changed.cached == 5, changed
        out["last_step_changed_ratio"] = round(
            out["recipe_last_step_changed_s"] / out["recipe_build_s"], 3
        )

        # the built template works: the server answers in a fresh capsule
        capsule = await manager.create(template="bench")
        check = await manager.exec(
            capsule.id,
            'python3 -c "import urllib.request as u; '
            "print(u.urlopen('http://127.0.0.1:8401/').status)\"; whoami; pwd",
        )
        out["built_template_check"] = check.stdout.split()
        await manager.destroy(capsule.id)

        warm, built = await _timed_creates(manager, ["default", "bench"], 5)
        out["create_warm_s"] = round(warm, 3)
        out["create_from_built_template_s"] = round(built, 3)
        out["create_from_built_template_ratio"] = round(
            out["create_from_built_template_s"] / out["create_warm_s"], 3
        )
        out["layers"] = len([t for t in manager.list_templates(include_hidden=True) if t.hidden])
    finally:
        for c in manager.list_capsules():
            await manager.destroy(c.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()
