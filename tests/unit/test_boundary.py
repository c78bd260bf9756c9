"""backend/ never imports the TUI: the CLI and the dashboard share one backend API."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import backend

BACKEND = Path(backend.__file__).parent
FORBIDDEN = ("textual", "tui", "textual_plotext", "plotext", "pyte")
ENVD_ALLOWED_THIRD_PARTY = {
    "starlette",
    "uvicorn",
    "anyio",
    "websockets",
    "multipart",
    "python_multipart",
    "h11",
    "click",
    "idna",
    "typing_extensions",
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_backend_source_never_imports_the_tui() -> None:
    offenders = {
        str(p.relative_to(BACKEND)): sorted(_imports(p) & set(FORBIDDEN))
        for p in BACKEND.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_envd_imports_only_stdlib_and_its_pinned_wheels() -> None:
    stdlib = set(sys.stdlib_module_names)
    for path in (BACKEND / "envd").rglob("*.py"):
        modules = _imports(path) - stdlib - ENVD_ALLOWED_THIRD_PARTY - {"backend"}
        assert not modules, f"{path.name} imports {modules}: not installed in the guest"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("backend.")
            ):
                assert node.module.startswith("backend.envd"), f"{path.name}: {node.module}"


def test_importing_the_backend_api_loads_no_textual() -> None:
    code = (
        "import sys, backend.capsules.manager, backend.cli, backend.doctor, backend.image;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('textual','tui')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


TUI = BACKEND.parent / "tui"


def _module_imports(path: Path) -> set[str]:
    """Full module names imported by `path`, inside `if TYPE_CHECKING:` too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_tui_reaches_runtime_and_image_only_through_the_port() -> None:
    offenders = {
        str(p.relative_to(TUI)): sorted(
            m for m in _module_imports(p) if m.startswith(("backend.runtime", "backend.image"))
        )
        for p in TUI.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle_in_the_tui() -> None:
    modules = {
        ".".join(("tui", *p.relative_to(TUI).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in TUI.rglob("*.py")
    }
    graph = {
        name: {m for m in _module_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def _backend_imports(path: Path) -> set[str]:
    """The backend modules a file imports, dotted (`backend.capsules.store`)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("backend"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.startswith("backend")
        ):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


# lower layers never reach up: (files, module prefixes they must not import)
LAYERS = [
    ("sparse.py", ("backend.capsules", "backend.image", "backend.runtime", "backend.api")),
    ("image", ("backend.capsules", "backend.api", "backend.sampler")),
    ("runtime", ("backend.capsules", "backend.api", "backend.sampler", "backend.image")),
    ("capsules", ("backend.api", "backend.sampler", "backend.recipes")),
]


@pytest.mark.parametrize(("where", "forbidden"), LAYERS, ids=[w for w, _ in LAYERS])
def test_layers_point_one_way(where: str, forbidden: tuple[str, ...]) -> None:
    root = BACKEND / where
    files = [root] if root.is_file() else list(root.rglob("*.py"))
    offenders = {
        str(p.relative_to(BACKEND)): sorted(
            m for m in _backend_imports(p) if m.startswith(forbidden)
        )
        for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_capsules_see_the_runtime_through_its_interface() -> None:
    """Only the manager names QEMU (as the default runtime); the rest of capsules/ is written
    against backend/runtime/base.py."""
    for path in (BACKEND / "capsules").rglob("*.py"):
        if path.name == "manager.py":
            continue
        qemu = [m for m in _backend_imports(path) if m.startswith("backend.runtime.qemu")]
        assert not qemu, f"{path.name} imports {qemu}"


def test_settings_are_read_in_config_only() -> None:
    """Every WRENN_* environment setting of the host agent is read in backend/config.py."""
    pattern = re.compile(r"""(environ|getenv)\W+["']WRENN_""")
    offenders = [
        str(p.relative_to(BACKEND.parent))
        for root in (BACKEND, BACKEND.parent / "tui")
        for p in root.rglob("*.py")
        if p != BACKEND / "config.py"
        and not p.is_relative_to(BACKEND / "envd")  # the guest agent has its own settings
        and pattern.search(p.read_text())
    ]
    assert offenders == []
