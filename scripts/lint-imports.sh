#!/bin/sh
# import-linter reads packages from disk, but setpoint maps folders onto packages
# (pyproject.toml: setpoint = cli/, setpoint.proto = proto/, ...). Lay out a copy the way
# the installed wheel looks, then check the layer contracts in .importlinter against it.
set -eu
cd "$(dirname "$0")/.."
.venv/bin/python - <<'PY'
import shutil, tomllib
from pathlib import Path

site = Path(".venv/lint-site")
shutil.rmtree(site, ignore_errors=True)
mapping = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for package, folder in mapping.items():
    dest = site.joinpath(*package.split("."))
    dest.mkdir(parents=True, exist_ok=True)
    for source in Path(folder).glob("*.py"):
        shutil.copy2(source, dest / source.name)
PY
cd .venv && PYTHONPATH=lint-site exec ./bin/lint-imports --config ../.importlinter
