"""Gateway API keys: the keys file (hashes only), looking a presented key up, and creating keys.

The keys file (`ferry serve gateway --api-keys-file keys.yaml`) is YAML or JSON, a list of entries
(or a mapping with a `keys:` list):

    - name: team-a                 # the metrics label and the name in logs; never the key itself
      sha256: 9f86d081884c7d65...  # hex SHA-256 of the key
      requests_per_minute: 60      # optional: no limit when absent
      tokens_per_minute: 40000     # optional: prompt + max_tokens of admitted requests

Keys are hashed at rest with plain SHA-256: a key is 32 random bytes (`fk-` + token_urlsafe(32)), so
nothing is gained from a slow password hash, as with GitHub's and Stripe's tokens. A lookup compares
the presented key's hash with every entry by `hmac.compare_digest`.

    ferry admin api-key create team-a --rpm 60 --tpm 40000

prints a new key once and the entry to add to the file. The gateway re-reads the file when it changes
(checked at most every few seconds); an invalid new version is logged and the last good one is kept.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

KEY_PREFIX = "fk-"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
FIELDS = {"name", "sha256", "requests_per_minute", "tokens_per_minute"}


class KeysFileError(ValueError):
    """The keys file cannot be read or is not valid; the message says what to change."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    sha256: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(data: Any, source: str = "the keys file") -> tuple[ApiKey, ...]:
    if isinstance(data, dict) and set(data) == {"keys"}:
        data = data["keys"]
    if data is None:
        data = []
    if not isinstance(data, list):
        raise KeysFileError(f"{source}: expected a list of keys ({{name, sha256, ...}} each)")
    keys, names, hashes = [], set(), set()
    for i, entry in enumerate(data):
        where = f"{source}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise KeysFileError(f"{where}: expected a mapping with name and sha256")
        unknown = set(entry) - FIELDS
        if unknown:
            raise KeysFileError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        name, digest = str(entry.get("name", "")), str(entry.get("sha256", "")).strip().lower()
        if not NAME.fullmatch(name):
            raise KeysFileError(f"{where}: name {name!r} must be 1-64 of letters, digits, _ . @ -")
        if not SHA256_HEX.fullmatch(digest):
            raise KeysFileError(f"{where} ({name}): sha256 must be 64 hex digits (the hash, never the key; "
                                "`ferry admin api-key create` prints it)")
        if name in names or digest in hashes:
            raise KeysFileError(f"{where}: the {'name ' + name if name in names else 'hash'} appears twice")
        names.add(name)
        hashes.add(digest)
        keys.append(ApiKey(name, digest, _limit(entry, "requests_per_minute", where),
                           _limit(entry, "tokens_per_minute", where)))
    return tuple(keys)


def _limit(entry: dict, field: str, where: str) -> int | None:
    value = entry.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KeysFileError(f"{where}: {field} must be a whole number > 0 (or absent: no limit), got {value!r}")
    return value


def read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    try:
        data = yaml.safe_load(path.read_text())      # YAML is a superset of JSON: both read here
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise KeysFileError(f"cannot read the keys file {path}: {type(e).__name__}") from None
    return parse_keys(data, str(path))


class KeyRing:
    """The keys the gateway accepts now."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self.keys = keys

    @property
    def names(self) -> set[str]:
        return {k.name for k in self.keys}

    def find(self, presented: str) -> ApiKey | None:
        digest = hash_key(presented)
        found = None
        for key in self.keys:                 # every entry, in constant time each: no early exit
            if hmac.compare_digest(key.sha256, digest):
                found = key
        return found


class KeysFile:
    """The keys file, re-read when its modification time or size changes. `now` (monotonic seconds) is
    passed in; the file is stat'ed at most every `check_interval_s`."""

    def __init__(self, path: Path, check_interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._stamp = self._stat()
        self.ring = KeyRing(read_keys_file(self.path))     # an invalid file at start: the gateway refuses
        self._checked_s: float | None = None
        if not self.ring.keys:
            log.warning("the keys file %s holds no keys: every API request will get 401", self.path)

    def current(self, now: float) -> KeyRing:
        if self._checked_s is None or now - self._checked_s >= self.check_interval_s:
            self._checked_s = now
            self._reload_if_changed()
        return self.ring

    def _reload_if_changed(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self.ring = KeyRing(read_keys_file(self.path))
        except KeysFileError as e:
            log.warning("keeping the previous %d API keys: %s", len(self.ring.keys), e)
            return
        log.info("reloaded %d API keys from %s", len(self.ring.keys), self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size


# ---- ferry admin api-key create ---------------------------------------------------------------------
def entry_for(name: str, key: str, rpm: int | None, tpm: int | None) -> dict:
    entry: dict = {"name": name, "sha256": hash_key(key)}
    if rpm is not None:
        entry["requests_per_minute"] = rpm
    if tpm is not None:
        entry["tokens_per_minute"] = tpm
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry admin api-key", description="Create a gateway API key.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="print a new key (once) and the keys-file entry holding its hash")
    create.add_argument("name", help="the key's name (metrics label; letters, digits, _ . @ -)")
    create.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    create.add_argument("--tpm", type=int, help="prompt + max_tokens per minute (default: no limit)")
    create.add_argument("--json", action="store_true", help="print one JSON object {key, entry} instead")
    args = parser.parse_args(argv)
    key = new_key()
    entry = entry_for(args.name, key, args.rpm, args.tpm)
    try:
        parse_keys([entry], "the new key")
    except KeysFileError as e:
        parser.error(str(e).removeprefix("the new key: entry 1: "))
    if args.json:
        print(json.dumps({"key": key, "entry": entry}))
        return 0
    print(f"API key {args.name!r} (shown only now; the gateway keeps only its hash):\n\n    {key}\n")
    print("Add this entry to the gateway's keys file (--api-keys-file; it is re-read when it changes):\n")
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0
