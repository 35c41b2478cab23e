"""`ferry up`'s service security, the same on every platform: a shared token (--service-auth,
--service-token-file) and mutual TLS (--service-tls, --tls-dir) for every gRPC call between the stack's
processes. Both are env vars (FERRY_SERVICE_TOKEN_FILE, FERRY_TLS_DIR) set here in `ferry up`'s own
environment, so every process it starts, and its own calls, pick them up (services/common/service_auth.py,
service_tls.py)."""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from services.common import service_auth, service_tls


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service-auth", action="store_true",
                   help="every gRPC call between the stack's processes carries a token generated for this stack "
                        "(LOG_DIR/service-token, mode 0600; docs/serving.md#service-authentication)")
    p.add_argument("--service-token-file", type=Path, default=None, metavar="PATH",
                   help="like --service-auth, with the token in PATH (also: env FERRY_SERVICE_TOKEN_FILE)")
    p.add_argument("--service-tls", action="store_true",
                   help="mutual TLS on every gRPC call between the stack's processes, with a CA and certificate "
                        "made for this stack (LOG_DIR/tls; docs/serving.md#mutual-tls)")
    p.add_argument("--tls-dir", type=Path, default=None, metavar="DIR",
                   help="like --service-tls, with ca.crt, tls.crt, tls.key from DIR (also: env FERRY_TLS_DIR)")


def configure(args: argparse.Namespace, log_dir: Path | None) -> Path | None:
    """Turn on what the flags ask for (an env var naming an unusable file stops here, ValueError).
    Returns the temporary folder made for generated secrets when there is no log dir to hold them, for
    the caller to remove when the stack stops."""
    made: Path | None = None

    def folder() -> Path:
        nonlocal made
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            return log_dir
        made = made or Path(tempfile.mkdtemp(prefix="ferry-up-"))
        return made

    try:
        if args.service_token_file is not None:
            service_auth.use_token_file(args.service_token_file)
        elif args.service_auth:
            path = folder() / "service-token"
            service_auth.write_secret_file(path, (secrets.token_urlsafe(32) + "\n").encode())
            service_auth.use_token_file(path)
        else:
            service_auth.configured_token()
        if args.tls_dir is not None:
            service_tls.use_folder(args.tls_dir)
        elif args.service_tls:
            tls = folder() / "tls"
            for name in service_tls.FILES:          # a reused log dir: new certificates
                (tls / name).unlink(missing_ok=True)
            service_tls.create(tls)
            service_tls.use_folder(tls)
        else:
            service_tls.configured()
    except BaseException:
        if made is not None:                    # nothing half-made stays behind
            shutil.rmtree(made, ignore_errors=True)
        raise
    return made


def admin_env() -> str:
    """The env prefix a `ferry admin` command needs against this stack."""
    names = (service_auth.TOKEN_FILE_ENV, service_tls.TLS_DIR_ENV)
    return "".join(f"{name}={os.environ[name]} " for name in names if os.environ.get(name))
