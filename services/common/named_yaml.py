"""YAML files given either as a path or by name from a folder of built-ins (sim profiles, cluster specs)."""
from __future__ import annotations

from pathlib import Path


def find_yaml(name_or_path: str | Path, directory: Path, what: str) -> Path:
    """`name_or_path` if it is a file, else `directory/<name>.yaml`; the error lists the built-in names."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    path = directory / f"{name_or_path}.yaml"
    if path.is_file():
        return path
    known = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
    raise FileNotFoundError(f"no {what} {str(name_or_path)!r}; give a YAML path or one of: {known}")
