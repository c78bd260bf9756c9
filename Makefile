# The two commands of the README's quick start: `make run` and `make test`.
.PHONY: setup run test lint typecheck pytest bench

setup:
	./scripts/setup.sh

run: setup
	.venv/bin/wrenn-tui

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:
	.venv/bin/mypy backend tui tests bench

pytest:
	.venv/bin/pytest

test: setup lint typecheck pytest
