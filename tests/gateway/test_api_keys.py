"""API keys and rate limits, pure parts: the token-bucket limiter, the keys file, key lookup, key creation."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from services.gateway.api_keys import (
    KEY_PREFIX,
    ApiKey,
    KeyRing,
    KeysFile,
    KeysFileError,
    hash_key,
    main,
    new_key,
    parse_keys,
)
from services.gateway.rate_limit import RateLimiter

# ---- the limiter -------------------------------------------------------------------------------------
# Each case: per-minute limit, then (time s, cost, allowed, remaining, retry_after_s) steps on one bucket.
LIMITER_CASES = {
    "burst up to the limit, then refused": (3, [(0, 1, True, 2, 0), (0, 1, True, 1, 0), (0, 1, True, 0, 0),
                                                (0, 1, False, 0, 20.0)]),
    "refills at limit/60 per second": (60, [(0, 60, True, 0, 0), (0.5, 1, False, 0, 0.5), (1, 1, True, 0, 0),
                                            (3, 2, True, 0, 0)]),
    "never above the limit after idling": (2, [(0, 2, True, 0, 0), (3600, 3, None, 2, None)]),
    "a refusal takes nothing": (6, [(0, 5, True, 1, 0), (0, 2, False, 1, 10.0), (0, 1, True, 0, 0)]),
    "cost over the whole minute never fits": (10, [(0, 11, False, 10, None), (0, 10, True, 0, 0)]),
    "zero cost always passes": (1, [(0, 1, True, 0, 0), (0, 0, True, 0, 0)]),
    "a clock that steps back refills nothing": (60, [(10, 60, True, 0, 0), (5, 1, False, 0, 1.0)]),
}


@pytest.mark.parametrize("per_minute, steps", LIMITER_CASES.values(), ids=LIMITER_CASES.keys())
def test_token_bucket(per_minute, steps):
    limiter = RateLimiter()
    for now, cost, allowed, remaining, retry in steps:
        d = limiter.try_take(("k", "requests"), per_minute, cost, now)
        assert d.is_allowed is bool(allowed), (now, cost)
        assert d.limit == per_minute
        assert d.remaining == remaining, (now, cost)
        if not d.is_allowed:
            assert d.retry_after_s == (pytest.approx(retry) if retry is not None else None), (now, cost)


def test_buckets_are_per_key_and_per_kind_and_forgotten_with_their_key():
    limiter = RateLimiter()
    assert limiter.try_take(("a", "requests"), 1, 1, 0).is_allowed
    assert not limiter.try_take(("a", "requests"), 1, 1, 0).is_allowed
    assert limiter.try_take(("b", "requests"), 1, 1, 0).is_allowed
    assert limiter.try_take(("a", "tokens"), 1, 1, 0).is_allowed
    limiter.retain({"b"})                       # "a" left the keys file: a new "a" starts full
    assert limiter.try_take(("a", "requests"), 1, 1, 0).is_allowed
    assert not limiter.try_take(("b", "requests"), 1, 1, 0).is_allowed


def test_reset_says_when_the_bucket_is_full_again():
    d = RateLimiter().try_take(("k", "requests"), 60, 30, 0)
    assert d.reset_s == pytest.approx(30.0)


@pytest.mark.parametrize("per_minute, cost", [(0, 1), (-1, 1), (5, -1)])
def test_limiter_rejects_nonsense(per_minute, cost):
    with pytest.raises(ValueError):
        RateLimiter().try_take(("k", "requests"), per_minute, cost, 0)


# ---- keys and the keys file --------------------------------------------------------------------------
def test_new_keys_are_random_prefixed_and_hash_to_64_hex():
    a, b = new_key(), new_key()
    assert a != b and a.startswith(KEY_PREFIX) and len(a) >= 40
    assert len(hash_key(a)) == 64 and hash_key(a) == hash_key(a) != hash_key(b)
    assert hash_key("test") == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_parse_a_list_or_a_keys_mapping():
    digest = hash_key("k")
    entries = [{"name": "team-a", "sha256": digest.upper(), "requests_per_minute": 60},
               {"name": "b", "sha256": hash_key("k2"), "tokens_per_minute": 1000}]
    want = (ApiKey("team-a", digest, 60, None), ApiKey("b", hash_key("k2"), None, 1000))
    assert parse_keys(entries) == want
    assert parse_keys({"keys": entries}) == want
    assert parse_keys(None) == () and parse_keys([]) == ()


BAD_FILES = {
    "not a list": ({"name": "a"}, "list"),
    "entry not a mapping": (["a"], "mapping"),
    "no name": ([{"sha256": hash_key("x")}], "name"),
    "name with a space": ([{"name": "a b", "sha256": hash_key("x")}], "name"),
    "the key, not its hash": ([{"name": "a", "sha256": "fk-abc"}], "64 hex"),
    "short hash": ([{"name": "a", "sha256": "abc123"}], "64 hex"),
    "unknown field": ([{"name": "a", "sha256": hash_key("x"), "key": "fk-x"}], "unknown field"),
    "zero limit": ([{"name": "a", "sha256": hash_key("x"), "requests_per_minute": 0}], "> 0"),
    "text limit": ([{"name": "a", "sha256": hash_key("x"), "tokens_per_minute": "lots"}], "whole number"),
    "bool limit": ([{"name": "a", "sha256": hash_key("x"), "tokens_per_minute": True}], "whole number"),
    "same name twice": ([{"name": "a", "sha256": hash_key("x")}, {"name": "a", "sha256": hash_key("y")}],
                        "twice"),
    "same hash twice": ([{"name": "a", "sha256": hash_key("x")}, {"name": "b", "sha256": hash_key("x")}],
                        "twice"),
}


@pytest.mark.parametrize("data, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_invalid_keys_files_say_what_to_change(data, message):
    with pytest.raises(KeysFileError, match=message):
        parse_keys(data)


def test_ring_finds_a_key_by_its_hash_only():
    ring = KeyRing(parse_keys([{"name": "a", "sha256": hash_key("fk-one")},
                               {"name": "b", "sha256": hash_key("fk-two")}]))
    assert ring.find("fk-one").name == "a"
    assert ring.find("fk-two").name == "b"
    assert ring.find("fk-three") is None
    assert ring.find(hash_key("fk-one")) is None          # the hash itself is not a key
    assert ring.find("") is None
    assert ring.names == {"a", "b"}


def write(path, entries, stamp_ns):
    path.write_text(yaml.safe_dump(entries))
    os.utime(path, ns=(stamp_ns, stamp_ns))           # a distinct mtime however coarse the filesystem's clock


def test_keys_file_is_reread_when_it_changes_at_most_every_interval(tmp_path):
    path = tmp_path / "keys.yaml"
    write(path, [{"name": "a", "sha256": hash_key("fk-a")}], 1_000_000_000)
    keys = KeysFile(path, check_interval_s=5)
    assert keys.current(100).find("fk-a").name == "a"
    write(path, [{"name": "b", "sha256": hash_key("fk-b")}], 2_000_000_000)
    assert keys.current(104).find("fk-b") is None          # not looked at again yet
    ring = keys.current(105)
    assert ring.find("fk-b").name == "b" and ring.find("fk-a") is None
    assert keys.current(111) is ring                       # unchanged: the same ring


def test_keys_file_keeps_the_last_good_keys_when_a_change_is_invalid_or_the_file_goes(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([{"name": "a", "sha256": hash_key("fk-a")}]))    # JSON reads too
    keys = KeysFile(path, check_interval_s=0)
    write(path, [{"name": "a", "sha256": "not-a-hash"}], 3_000_000_000)
    assert keys.current(1).find("fk-a").name == "a"
    path.unlink()
    assert keys.current(2).find("fk-a").name == "a"


def test_an_invalid_keys_file_at_start_raises(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("- name: a\n  sha256: fk-the-key-itself\n")
    with pytest.raises(KeysFileError, match="64 hex"):
        KeysFile(path)
    path.write_text("[unclosed")
    with pytest.raises(KeysFileError, match="cannot read") as e:
        KeysFile(path)
    assert "unclosed" not in str(e.value)                 # the file's text never lands in a message


# ---- ferry admin api-key create ----------------------------------------------------------------------
def test_create_prints_the_key_once_and_an_entry_with_only_its_hash(capsys):
    assert main(["create", "team-a", "--rpm", "60", "--tpm", "40000"]) == 0
    out = capsys.readouterr().out
    key = next(word for word in out.split() if word.startswith(KEY_PREFIX))
    entries = yaml.safe_load(out[out.index("- name:"):])
    assert entries == [{"name": "team-a", "sha256": hash_key(key), "requests_per_minute": 60,
                        "tokens_per_minute": 40000}]
    assert KeyRing(parse_keys(entries)).find(key).name == "team-a"


def test_create_json_and_bad_input(capsys):
    assert main(["create", "ci", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["entry"] == {"name": "ci", "sha256": hash_key(made["key"])}
    for argv in (["create", "a b"], ["create", "a", "--rpm", "0"], ["create", "a", "--tpm", "-5"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


# ---- the gateway setting -----------------------------------------------------------------------------
def test_keys_are_off_by_default_and_the_file_comes_from_a_flag_or_the_env(tmp_path, monkeypatch):
    from services.common.settings import parse_settings
    from services.gateway.main import GatewaySettings
    from tests.procs import ROOT

    model = str(ROOT / "models" / "SmolLM2-135M-Instruct")
    assert GatewaySettings(model=model).api_keys_file == ""
    path = tmp_path / "keys.yaml"
    path.write_text("[]")
    monkeypatch.setenv("FERRY_GATEWAY_API_KEYS_FILE", str(path))
    assert parse_settings(GatewaySettings, ["--model", model], prog="gw",
                          env_prefix="FERRY_GATEWAY_").api_keys_file == str(path)
    with pytest.raises(ValueError, match="not a file"):
        GatewaySettings(model=model, api_keys_file=str(tmp_path / "missing.yaml"))
