"""Print pyproject.toml's [project.dependencies], one a line, for the image builds (stdlib only).

    python docker/requirements.py --without torch accelerate ray --with jinja2   # control-plane image
    python docker/requirements.py --only torch --variant cu128     # torch==2.13.0+cu128

The images install dependencies in a layer of their own (rebuilt only when pyproject.toml changes)
and the package itself with --no-deps, so pyproject.toml stays the one list of versions.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def name_of(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pyproject", default=Path(__file__).resolve().parents[1] / "pyproject.toml", type=Path)
    parser.add_argument("--without", nargs="*", default=[], help="leave these distributions out")
    parser.add_argument("--only", nargs="*", help="print only these distributions")
    parser.add_argument("--with", dest="extra", nargs="*", default=[], help="add these requirements")
    parser.add_argument("--variant", default="", help="local version label for exact pins (cpu, cu128)")
    args = parser.parse_args(argv)
    requirements = tomllib.loads(args.pyproject.read_text())["project"]["dependencies"]
    for requirement in requirements:
        name = name_of(requirement)
        if name in args.without or (args.only is not None and name not in args.only):
            continue
        if args.variant:
            if "==" not in requirement:
                sys.exit(f"{requirement!r} is not pinned with ==: a --variant needs an exact version")
            requirement = f"{requirement}+{args.variant}"
        print(requirement)
    for requirement in args.extra:
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
