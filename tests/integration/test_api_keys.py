"""API keys at a real gateway: a second gateway process with `--api-keys-file` in front of the disagg
stack's scheduler and workers. 401 without a key, 200 through the `openai` client with one, 429 past
the key's requests per minute (counted in the stack's Redis, `--rate-limit-redis-url`), /health and
/metrics open, and neither the key nor the prompt nor the generated text in the gateway's log (at DEBUG)."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml

from services.gateway.api_keys import hash_key, new_key
from tests.integration.stack import MODEL
from tests.procs import eventually, free_port, start, stop, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RPM = 2             # one request back every 30 s: far longer than the test's few requests take
SECRET_PROMPT = "The vault code is PROMPT-SECRET-7781. What is the capital of France?"


@dataclass(frozen=True)
class KeyedGateway:
    url: str
    key: str
    log: Path


def get(url: str, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET with an optional key: status, headers (lower-case names), body."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture(scope="module")
def keyed_gateway(disagg_stack, smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed_gateway")
    key = new_key()
    keys_file = folder / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([{"name": "ci", "sha256": hash_key(key), "requests_per_minute": RPM}]))
    port, log = free_port(), folder / "gateway.log"
    proc = start(["serve", "gateway", "--model", str(smollm2_path), "--port", str(port), "--sink-port",
                  str(free_port()), "--scheduler-address", disagg_stack.scheduler_address,
                  "--api-keys-file", str(keys_file), "--rate-limit-redis-url", disagg_stack.redis_url],
                 log=log, env={"FERRY_LOG_LEVEL": "DEBUG"})
    try:
        wait_for_port(port, proc, timeout=60)
        url = f"http://127.0.0.1:{port}"

        def lists_model() -> bool:
            status, _, body = get(f"{url}/v1/models", key)
            return status == 200 and any(m["id"] == MODEL for m in json.loads(body)["data"])

        assert eventually(lists_model, timeout=30, interval=0.2), log.read_text()[-3000:]
        assert key not in keys_file.read_text()             # hashed at rest
        yield KeyedGateway(url, key, log)
    finally:
        stop(proc)


def test_keys_rate_limits_and_clean_logs(keyed_gateway):
    gw = keyed_gateway
    status, headers, body = get(f"{gw.url}/v1/models")
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert get(f"{gw.url}/health")[0] == 200                # open for load balancers
    assert get(f"{gw.url}/metrics")[0] == 200               # open for Prometheus

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="fk-WRONG-KEY-SECRET", max_retries=0).models.list()

    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": SECRET_PROMPT}], max_tokens=8, temperature=0)
    assert raw.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert raw.headers["x-ratelimit-remaining-requests"] == str(RPM - 1)
    output = raw.parse().choices[0].message.content
    assert output
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=SECRET_PROMPT, max_tokens=8, temperature=0, stream=True) if chunk.choices)

    with pytest.raises(openai.RateLimitError) as e:         # the third request within the minute
        client.completions.create(model=MODEL, prompt=SECRET_PROMPT, max_tokens=8)
    assert int(e.value.response.headers["retry-after"]) >= 1
    assert e.value.body["code"] == "rate_limit_exceeded"

    metrics = get(f"{gw.url}/metrics")[2].decode()
    assert 'ferry_gateway_requests_rejected_total{key="ci",reason="rate_limited"} 1.0' in metrics
    assert 'ferry_gateway_requests_rejected_total{key="",reason="unauthenticated"} 2.0' in metrics
    assert "ferry_gateway_rate_limit_shared 1.0" in metrics  # counted in the stack's Redis

    log = gw.log.read_text(errors="replace")
    assert "API keys required" in log                       # the log was written, at DEBUG
    leaks = [s for s in (gw.key, gw.key[3:], "fk-WRONG-KEY-SECRET", "PROMPT-SECRET", "vault code", "Bearer",
                         "uthorization") if s in log]
    leaks += [f"output {text!r}" for text in (output.strip(), streamed.strip()) if len(text) >= 8 and text in log]
    assert not leaks, f"the gateway log holds {leaks}"
