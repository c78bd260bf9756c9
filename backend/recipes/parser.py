"""The recipe format: a subset of Dockerfile syntax plus two instructions of ours.

    # comment                      blank lines and comments are ignored
    FROM <template>                first instruction, exactly once: an image (`default`), a
                                   saved template, or `oci:<path>`: an OCI image layout dir, OCI
                                   archive or `docker save` tarball (path relative to the
                                   recipe's dir; backend/recipes/oci.py)
    RUN <shell command>            /bin/bash -l -c in the capsule; a non-zero exit fails the build
    COPY <src>... <dst>            from the context dir (default: the recipe's dir); a
                                   directory's contents go into <dst>; <dst> ending in `/`
                                   (or several sources) is a directory; relative <dst> is
                                   under WORKDIR; files are owned by root
    ENV <key>=<value> ...          (or `ENV <key> <value>`) for later steps and every capsule
    WORKDIR <path>                 created if missing; later steps and capsules start there
    USER <name>                    an account of the capsule; later steps and capsules run as it
    START <shell command>          left running: every capsule starts with it running (no
                                   command: the OCI image's ENTRYPOINT + CMD, FROM oci: only)
    READY [--timeout=S] <command>  run every 0.5 s until it exits 0 (default deadline 60 s)

A line ending in `\\` continues on the next. Instruction names are case-insensitive. JSON
(exec-form) arguments are accepted for RUN, START and READY: `RUN ["echo", "hi"]`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

INSTRUCTIONS = ("FROM", "RUN", "COPY", "ENV", "WORKDIR", "USER", "START", "READY")
DOCKER_ONLY = (
    "ADD",
    "ARG",
    "CMD",
    "ENTRYPOINT",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "SHELL",
    "STOPSIGNAL",
    "VOLUME",
)
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
OCI_PREFIX = "oci:"
READY_TIMEOUT_S = 60.0
MAX_READY_TIMEOUT_S = 3600.0


class RecipeError(Exception):
    """The recipe cannot be built as written (nothing has started)."""


@dataclass(frozen=True)
class Step:
    line: int
    """Where the instruction starts in the file (1-based)."""
    instruction: str
    """Upper case: one of INSTRUCTIONS."""
    args: str
    """The argument text, continuation lines joined."""
    command: str = ""
    """RUN, START, READY: the shell command."""
    sources: tuple[str, ...] = ()
    """COPY: paths relative to the context."""
    target: str = ""
    """COPY: the destination; WORKDIR: the absolute directory; USER: the account."""
    env: tuple[tuple[str, str], ...] = ()
    """ENV: the pairs, in order."""
    timeout_s: float = 0.0
    """READY: the deadline."""

    @property
    def text(self) -> str:
        """The step as the layer cache keys it (line numbers and spacing do not matter)."""
        return f"{self.instruction} {self.args}"

    @property
    def changes_state(self) -> bool:
        """False for the steps that only change what later processes start with."""
        return self.instruction not in ("ENV", "USER")


@dataclass(frozen=True)
class Recipe:
    base: str
    """The FROM template, or `oci:<path>`."""
    base_line: int
    steps: tuple[Step, ...]

    @property
    def oci_path(self) -> str | None:
        """FROM oci:<path>: the path as written."""
        return self.base[len(OCI_PREFIX) :] if self.base.startswith(OCI_PREFIX) else None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined text) for each instruction."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # Docker allows comments between continuation lines
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(stripped)
        out.append((start, " ".join(p for p in pending if p)))
        pending = []
    if pending:
        raise RecipeError(f"line {start}: the recipe ends inside a continued line (`\\`)")
    return out


def _command(line: int, instruction: str, args: str) -> str:
    if not args:
        raise RecipeError(f"line {line}: {instruction} needs a command")
    if args.startswith("["):
        try:
            argv = json.loads(args)
        except ValueError as exc:
            raise RecipeError(
                f"line {line}: {instruction} [...] must be a JSON list of strings: {exc}"
            ) from None
        if not argv or not all(isinstance(a, str) for a in argv):
            raise RecipeError(f"line {line}: {instruction} [...] must be a JSON list of strings")
        return shlex.join(argv)
    return args


def _env_pairs(line: int, args: str) -> tuple[tuple[str, str], ...]:
    try:
        words = shlex.split(args)
    except ValueError as exc:
        raise RecipeError(f"line {line}: ENV: {exc}") from None
    if not words:
        raise RecipeError(f"line {line}: ENV needs KEY=VALUE")
    if "=" not in words[0]:
        # the old form: ENV KEY VALUE (the rest of the line is the value)
        key, _, value = args.strip().partition(" ")
        if not value.strip():
            raise RecipeError(f"line {line}: ENV {key} needs a value (ENV KEY=VALUE)")
        pairs = [(key, value.strip())]
    else:
        pairs = []
        for word in words:
            key, eq, value = word.partition("=")
            if not eq:
                raise RecipeError(f"line {line}: ENV: {word!r} is not KEY=VALUE")
            pairs.append((key, value))
    for key, value in pairs:
        if not ENV_KEY.fullmatch(key):
            raise RecipeError(f"line {line}: ENV: {key!r} is not a valid variable name")
        if "\x00" in value:
            raise RecipeError(f"line {line}: ENV {key}: the value holds a NUL byte")
    return tuple(pairs)


def _copy(line: int, args: str, workdir: str) -> tuple[tuple[str, ...], str]:
    if args.startswith("--"):
        flag = args.split()[0]
        raise RecipeError(f"line {line}: COPY {flag} is not supported")
    try:
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
    except ValueError as exc:
        raise RecipeError(f"line {line}: COPY: {exc}") from None
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise RecipeError(f"line {line}: COPY needs paths")
    if len(words) < 2:
        raise RecipeError(f"line {line}: COPY needs a source and a destination (COPY SRC DST)")
    *sources, target = words
    if len(sources) > 1 and not target.endswith("/"):
        target += "/"
    if not target.startswith("/"):
        base = workdir or "/"
        target = str(PurePosixPath(base) / target) + ("/" if target.endswith("/") else "")
    return tuple(sources), target


def parse(text: str) -> Recipe:
    """The whole recipe, or a RecipeError naming the first bad line."""
    base = ""
    base_line = 0
    steps: list[Step] = []
    workdir = ""
    for line, logical in _logical_lines(text):
        word, _, rest = logical.partition(" ")
        if "\t" in word:
            word, _, more = word.partition("\t")
            rest = f"{more} {rest}"
        instruction = word.upper()
        args = rest.strip()
        if instruction not in INSTRUCTIONS:
            hint = (
                " (a Dockerfile instruction this recipe format does not have; use START for a "
                "process left running)"
                if instruction in DOCKER_ONLY
                else ""
            )
            raise RecipeError(
                f"line {line}: unknown instruction {word!r}{hint}; known: "
                + ", ".join(INSTRUCTIONS)
            )
        if instruction == "FROM":
            if base:
                raise RecipeError(f"line {line}: a second FROM (one base per recipe)")
            if steps:
                raise RecipeError(f"line {line}: FROM must come before every other instruction")
            if not args or len(args.split()) != 1:
                raise RecipeError(f"line {line}: FROM takes one template name (FROM default)")
            if args.startswith("oci:") and not args[4:]:
                raise RecipeError(f"line {line}: FROM oci: needs a path (FROM oci:./image.tar)")
            base, base_line = args, line
            continue
        if not base:
            raise RecipeError(f"line {line}: the recipe must start with FROM <template>")
        if instruction == "START" and not args:
            if not base.startswith(OCI_PREFIX):
                raise RecipeError(
                    f"line {line}: START needs a command (START with none runs an OCI image's "
                    "ENTRYPOINT and CMD, with FROM oci:<path>)"
                )
            steps.append(Step(line, instruction, args))  # the builder fills in the image's
        elif instruction in ("RUN", "START"):
            steps.append(Step(line, instruction, args, command=_command(line, instruction, args)))
        elif instruction == "READY":
            timeout = READY_TIMEOUT_S
            command_text = args
            if args.startswith("--"):
                flag, _, command_text = args.partition(" ")
                name, eq, value = flag.partition("=")
                if name != "--timeout" or not eq:
                    raise RecipeError(f"line {line}: READY takes only --timeout=SECONDS")
                try:
                    timeout = float(value.rstrip("s"))
                except ValueError:
                    raise RecipeError(
                        f"line {line}: READY --timeout={value}: not seconds"
                    ) from None
                if not 0 < timeout <= MAX_READY_TIMEOUT_S:
                    raise RecipeError(
                        f"line {line}: READY --timeout must be in (0, {MAX_READY_TIMEOUT_S:.0f}]"
                    )
            command = _command(line, instruction, command_text.strip())
            steps.append(Step(line, instruction, args, command=command, timeout_s=timeout))
        elif instruction == "COPY":
            sources, target = _copy(line, args, workdir)
            steps.append(Step(line, instruction, args, sources=sources, target=target))
        elif instruction == "ENV":
            steps.append(Step(line, instruction, args, env=_env_pairs(line, args)))
        elif instruction == "WORKDIR":
            if not args or len(shlex.split(args)) != 1:
                raise RecipeError(f"line {line}: WORKDIR takes one path")
            path = shlex.split(args)[0]
            if not path.startswith("/"):
                path = str(PurePosixPath(workdir or "/") / path)
            workdir = str(PurePosixPath(path))
            steps.append(Step(line, instruction, args, target=workdir))
        elif instruction == "USER":
            if not USER_NAME.fullmatch(args):
                raise RecipeError(
                    f"line {line}: USER takes one account name (USER app), not {args!r}"
                )
            steps.append(Step(line, instruction, args, target=args))
    if not base:
        raise RecipeError("the recipe has no FROM <template> (is the file empty?)")
    if not steps:
        raise RecipeError(
            f"line {base_line}: nothing after FROM: a recipe needs at least one step "
            "(to copy a template as it is, use `template create`)"
        )
    return Recipe(base=base, base_line=base_line, steps=tuple(steps))
