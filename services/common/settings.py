"""Service settings: one frozen dataclass per service, filled from flags, env and YAML.

    precedence:  --flag  >  FERRY_<SERVICE>_<FIELD> env var  >  --config file.yaml  >  dataclass default

`parse_settings(Settings, argv, prog=...)` builds the argparse parser from the dataclass fields
(`field(metadata={"help": ...})` becomes the flag's help text), so `ferry serve X --help` always lists
every setting with its default and its env var.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from services.common import service_auth, service_tls

T = TypeVar("T")
ENV_PREFIX = "FERRY_"


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_redis_url(flag: str, url: str) -> None:
    """A Redis URL setting is empty or one redis-py can open; else the ValueError that says so."""
    if url and not url.startswith(REDIS_SCHEMES):
        raise ValueError(f"{flag} {url!r} must start with one of {', '.join(REDIS_SCHEMES)} (or be empty)")


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text for its flag."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _base_type(tp: Any) -> type:
    """`int | None` -> int; list types -> list."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    origin = typing.get_origin(tp)
    return origin if origin in (list, tuple) else tp


def _convert(name: str, tp: type, raw: Any) -> Any:
    if raw is None:
        return None
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if tp in (list, tuple):
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s]
            return tp(str(i) for i in items)
        return tp(raw)
    except (TypeError, ValueError):
        raise SystemExit(f"setting {name}: cannot read {raw!r} as {tp.__name__}") from None


def parse_settings(cls: type[T], argv: list[str] | None, *, prog: str, description: str = "",
                   env_prefix: str = ENV_PREFIX) -> T:
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys are the flag names "
                        "with _ or -); flags and FERRY_* env vars override it")
    parser.add_argument("--service-token-file", type=Path, default=None, metavar="PATH",
                        help="file holding the token every gRPC call between Ferry services must carry "
                        f"(off when unset; services/common/service_auth.py) [env {service_auth.TOKEN_FILE_ENV}]")
    parser.add_argument("--tls-dir", type=Path, default=None, metavar="DIR",
                        help="folder of ca.crt, tls.crt, tls.key: mutual TLS on every gRPC call between Ferry "
                        f"services (off when unset; services/common/service_tls.py) [env {service_tls.TLS_DIR_ENV}]")
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {env_prefix}{f.name.upper()}]"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text + f" (default: {f.default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=help_text + f" (default: {f.default})")
    args = parser.parse_args(argv)
    _configure_service_auth(args.service_token_file, args.tls_dir, prog)
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(_read_yaml(args.config, cls))
    for f in dataclasses.fields(cls):
        env = os.environ.get(env_prefix + f.name.upper())
        if env is not None:
            values[f.name] = env
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
    converted = {k: _convert(k, _base_type(hints[k]), v) for k, v in values.items()}
    try:
        return cls(**converted)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None


def _configure_service_auth(token_file: Path | None, tls_dir: Path | None, prog: str) -> None:
    """--service-token-file and --tls-dir set FERRY_SERVICE_TOKEN_FILE and FERRY_TLS_DIR (so the processes
    this one starts inherit them); either way a configured file that cannot be used stops the service now,
    not at its first call."""
    try:
        if token_file is not None:
            service_auth.use_token_file(token_file)
        else:
            service_auth.configured_token()
        if tls_dir is not None:
            service_tls.use_folder(tls_dir)
        else:
            service_tls.configured()
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None


def _read_yaml(path: Path, cls: type) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"cannot read settings file {path}: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"settings file {path} must hold a mapping of setting: value")
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise SystemExit(f"settings file {path}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        out[name] = value
    return out
