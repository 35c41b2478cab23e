"""Static checks of docker/Dockerfile (control plane) and docker/Dockerfile.worker: this project's
machines have no container engine, so the images are never built here. What a build would find out
late is checked now: COPY sources exist and survive .dockerignore, the entry point and CMD exist, the
user is non-root, no package index is named in these files, and the slim image's left-out packages
are not needed by the components it runs."""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"control-plane": ROOT / "docker" / "Dockerfile", "worker": ROOT / "docker" / "Dockerfile.worker"}
DOCKER_FILES = [*sorted((ROOT / "docker").iterdir()), ROOT / ".dockerignore"]
INDEX_FLAGS = ("--index-url", "--extra-index-url", "-i", "--find-links", "-f", "--trusted-host")
PIP_ENV = re.compile(r"\b(PIP|UV)_(INDEX_URL|EXTRA_INDEX_URL|FIND_LINKS|TRUSTED_HOST|DEFAULT_INDEX|INDEX)\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int          # index of the FROM it belongs to (-1: before the first FROM)


def parse(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined; comment lines (also inside a continuation) dropped."""
    instructions, stage, pending = [], -1, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and pending):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            stage += keyword.upper() == "FROM"
            instructions.append(Instruction(keyword.upper(), args.strip(), stage))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    """`--from=build --chown=1:1 a b c` -> ({from: build, chown: 1:1}, [a, b, c]); also JSON form."""
    flags, rest = {}, args
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        name, _, value = flag[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    return flags, words


def exec_form(instructions: list[Instruction], keyword: str) -> list[str]:
    final = max(i.stage for i in instructions)
    found = [i for i in instructions if i.keyword == keyword and i.stage == final]
    assert found, f"the final stage has no {keyword}"
    value = json.loads(found[-1].args)
    assert isinstance(value, list), f"{keyword} must be exec form (a JSON array): {found[-1].args}"
    return value


# ---- .dockerignore (Docker's rules: Go-style globs, `**` any depth, `!` re-includes, last match wins,
# a path is excluded when it or any folder above it matches) --------------------------------------
def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip().strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", line):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        patterns.append((negated, re.compile(f"^{regex}$")))
    return patterns


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    parts = Path(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, pattern in patterns:
        if any(pattern.match(c) for c in candidates):
            ignored = not negated
    return ignored


def tracked_files(source: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return out.split()


@pytest.fixture(params=sorted(DOCKERFILES), scope="module")
def dockerfile(request) -> tuple[str, list[Instruction]]:
    return request.param, parse(DOCKERFILES[request.param])


def test_parser_joins_continuations_and_skips_comments(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text("# syntax=docker/dockerfile:1\nARG A=1\nFROM x AS b\nRUN a \\\n  # note\n  && b\n"
                    "FROM b\nCOPY --from=b /x /y\n")
    assert parse(path) == [Instruction("ARG", "A=1", -1), Instruction("FROM", "x AS b", 0),
                           Instruction("RUN", "a    && b", 0), Instruction("FROM", "b", 1),
                           Instruction("COPY", "--from=b /x /y", 1)]


def test_dockerignore_matcher_follows_docker_rules():
    patterns = [(False, re.compile(r"^(.*/)?__pycache__$")), (False, re.compile(r"^models$")),
                (True, re.compile(r"^models/keep$"))]
    assert is_ignored("services/worker/__pycache__/x.pyc", patterns)
    assert is_ignored("models/a/config.json", patterns)
    assert not is_ignored("models/keep", patterns)
    assert not is_ignored("services/worker/main.py", patterns)


def test_dockerignore_keeps_local_state_and_generated_code_out():
    patterns = ignore_patterns()
    for path in (".git/HEAD", ".venv/bin/python", "models/SmolLM2-135M-Instruct/config.json", "bench/out/x.json",
                 "services/gen/ferry/v1/worker_pb2.py", "services/worker/__pycache__/main.cpython-311.pyc",
                 ".whl/torch.whl", "ferry.egg-info/PKG-INFO"):
        assert is_ignored(path, patterns), f"{path} should not be sent to the docker daemon"


def test_copy_sources_exist_and_are_not_ignored(dockerfile):
    name, instructions = dockerfile
    patterns = ignore_patterns()
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies, f"{name}: nothing is copied into the image"
    for copy in copies:
        flags, words = flags_and_words(copy.args)
        if "from" in flags:                     # from another stage: not the build context
            continue
        assert len(words) >= 2, f"{name}: {copy.keyword} {copy.args} needs a source and a destination"
        for source in words[:-1]:
            assert "://" not in source, f"{name}: {copy.keyword} downloads {source}"
            assert (ROOT / source).exists(), f"{name}: {copy.keyword} source {source} does not exist"
            assert not is_ignored(source, patterns), f"{name}: .dockerignore excludes {source}"
            dropped = [f for f in tracked_files(source) if is_ignored(f, patterns)]
            assert not dropped, f"{name}: .dockerignore drops tracked files of {source}: {dropped[:5]}"


def test_entrypoint_is_the_ferry_console_script(dockerfile):
    name, instructions = dockerfile
    entrypoint = exec_form(instructions, "ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["ferry"], f"{name}: ENTRYPOINT {entrypoint}"
    module, _, function = scripts["ferry"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_cmd_is_a_valid_ferry_command(dockerfile):
    from services.cli import COMMANDS, SERVICES

    name, instructions = dockerfile
    cmd = exec_form(instructions, "CMD")
    if cmd[:1] == ["serve"]:
        assert cmd[1] in SERVICES and (ROOT / "services" / cmd[1] / "main.py").is_file(), f"{name}: CMD {cmd}"
    else:
        assert cmd[0] in COMMANDS or cmd == ["--help"], f"{name}: CMD {cmd}"
    args = cmd if "--help" in cmd else [*cmd, "--help"]
    run = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, f"{name}: ferry {' '.join(args)} failed:\n{run.stderr[-2000:]}"


def test_runs_as_a_numeric_non_root_user(dockerfile):
    name, instructions = dockerfile
    final = max(i.stage for i in instructions)
    users = [i.args for i in instructions if i.keyword == "USER" and i.stage == final]
    assert users, f"{name}: the final stage has no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    # Numeric: the kubelet can only check runAsNonRoot against a numeric USER.
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]}"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"{name}: USER {users[-1]}"


def test_base_images_come_from_arguments_or_stages(dockerfile):
    name, instructions = dockerfile
    stages, image_args = set(), set()
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [w for w in instruction.args.split() if not w.startswith("--")]
        image = words[0]
        if image not in stages:
            match = re.fullmatch(r"\$\{?(\w+)\}?", image)
            assert match, f"{name}: FROM {image}: name base images in an ARG (or use a stage)"
            image_args.add(match.group(1))
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    global_args = {i.args.split("=")[0] for i in instructions if i.keyword == "ARG" and i.stage == -1}
    assert image_args <= global_args, f"{name}: FROM uses {image_args - global_args}, not declared before FROM"


def test_no_package_index_is_named_in_docker_files():
    """Registry hosts appear only as base images (FROM's ARG defaults); a package index comes from a
    build argument without a default, or pip's own default."""
    for path in DOCKER_FILES:
        text = path.read_text()
        assert not re.search(r"\b[a-z][a-z0-9+.-]*://", text), f"{path.name} holds a URL"
        assert not re.search(r"sources\.list|add-apt-repository|\bppa:", text), f"{path.name} adds apt sources"
    for name, path in DOCKERFILES.items():
        instructions = parse(path)
        args_without_default = {i.args for i in instructions if i.keyword == "ARG" and "=" not in i.args}
        for instruction in instructions:
            if instruction.keyword in ("ENV", "ARG"):
                assert not PIP_ENV.search(instruction.args), f"{name}: {instruction.keyword} sets a package index"
            if instruction.keyword != "RUN":
                continue
            words = shlex.split(re.sub(r"\$\{(\w+):\+([^}]*)\}", r"\2", instruction.args))
            for flag, value in itertools.pairwise(words):
                if flag in INDEX_FLAGS or flag.split("=")[0] in INDEX_FLAGS:
                    value = flag.split("=", 1)[1] if "=" in flag else value
                    match = re.fullmatch(r"\$\{?(\w+)\}?", value)
                    assert match and match.group(1) in args_without_default, \
                        f"{name}: {flag} {value}: take a package index from an ARG without a default"


def control_plane_requirements() -> tuple[list[str], list[str]]:
    run = next(i.args for i in parse(DOCKERFILES["control-plane"])
               if i.keyword == "RUN" and "docker/requirements.py" in i.args)
    words = shlex.split(run)
    argv = words[words.index("docker/requirements.py") + 1:words.index(">")]
    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "docker" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(argv)
    without = argv[argv.index("--without") + 1:]
    without = without[:next((n for n, w in enumerate(without) if w.startswith("--")), len(without))]
    return out.getvalue().split(), without


# The slim image, simulated here: in a fresh interpreter every module that only distributions outside
# the image provide is made unimportable (sys.modules[name] = None is how importlib spells "not
# installed": find_spec returns None, import raises). Then import every module of the components the
# image runs, load the gateway's tokenizer and render a chat template (transformers imports jinja2
# there, which came with torch in a full install).
PROBE = r"""
import importlib, pkgutil, sys
for name in sys.argv[2:]:
    sys.modules[name] = None
packages = ["services.gateway", "services.scheduler", "services.kvstore", "services.common"]
if importlib.util.find_spec("operators.ferry_operator") is not None:
    packages.append("operators")
modules = ["services.cli"]
for package in packages:
    module = importlib.import_module(package)
    modules += [m.name for m in pkgutil.walk_packages(module.__path__, package + ".")]
for name in modules:
    if not name.endswith("__main__"):
        importlib.import_module(name)
if sys.argv[1]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
"""
ALWAYS_THERE = {"ferry", "pip", "setuptools", "wheel"}      # the package itself, and the venv's own tools


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Distributions that installing `requirements` brings in (from this environment's metadata)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if norm(requirement.name) in seen:
            continue
        seen.add(norm(requirement.name))
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        environments = [{"extra": e} for e in requirement.extras] or [{"extra": ""}]
        for text in requires:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                todo.append(child)
    return seen


def top_level_modules(dist: importlib.metadata.Distribution) -> set[str]:
    names = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".data", ".pth")):
            continue
        if len(file.parts) > 1:
            names.add(first)
        elif file.suffix in (".py", ".so", ".pyd"):
            names.add(first.split(".")[0])
    return names


def modules_outside(installed: set[str]) -> set[str]:
    """Top-level modules that only distributions outside `installed` provide (namespace packages such
    as `google` that an installed distribution shares stay importable)."""
    kept, dropped = set(), set()
    for dist in importlib.metadata.distributions():
        names = top_level_modules(dist)
        (kept if norm(dist.metadata["Name"]) in installed | ALWAYS_THERE else dropped).update(names)
    return dropped - kept


def test_slim_image_holds_what_the_control_plane_imports():
    requirements, without = control_plane_requirements()
    assert "torch" in without, "the control-plane image is meant to be without torch"
    blocked = modules_outside(closure(requirements))
    assert {"torch", "accelerate"} <= blocked
    model = ROOT / "models" / "SmolLM2-135M-Instruct"
    tokenizer = str(model) if (model / "tokenizer.json").is_file() else ""
    run = subprocess.run([sys.executable, "-c", PROBE, tokenizer, *sorted(blocked)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, ("the control plane needs a package the slim image does not install:\n"
                                 f"{run.stderr[-3000:]}")


def test_operator_module_in_docs_is_importable():
    if not (ROOT / "operators" / "ferry_operator").exists() and not (ROOT / "operators" / "ferry_operator.py").exists():
        pytest.skip("operators/ferry_operator does not exist yet")
    assert "python -m operators.ferry_operator" in (ROOT / "docs" / "kubernetes.md").read_text()
    spec = importlib.util.find_spec("operators.ferry_operator")
    assert spec is not None
    if spec.submodule_search_locations:        # a package: `python -m` runs its __main__
        assert importlib.util.find_spec("operators.ferry_operator.__main__") is not None
    copies = [flags_and_words(i.args)[1] for i in parse(DOCKERFILES["control-plane"]) if i.keyword == "COPY"]
    assert any(words[0] == "operators" for words in copies), "the control-plane image has no operators/"
