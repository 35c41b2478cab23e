"""`ferry bench` end to end against a tiny OpenAI-format SSE server on loopback, plus the client's
stream parsing (httpx.MockTransport) and the CLI's errors."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.benchmark.cli import main
from services.benchmark.client import build_body, send_request
from services.benchmark.workload import RequestSpec
from tests.procs import ROOT, free_port

FIRST_DELAY = 0.05  # s before the first token
TOKEN_DELAY = 0.01  # s between tokens
MODEL = "fake-model"


def make_app(state: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state["bodies"].append(body)
        state["count"] += 1
        if state["fail_every"] and state["count"] % state["fail_every"] == 0:
            return JSONResponse({"error": {"message": "rejected by the test server", "code": 400}}, 400)
        n = int(body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if not chat else len(body["messages"][0]["content"].split())

        def chunk(text: str, finish=None) -> str:
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return f"data: {json.dumps({'id': 'x', 'model': MODEL, 'choices': [choice]})}\n\n"

        async def stream():
            await asyncio.sleep(FIRST_DELAY)
            for i in range(n):
                if i:
                    await asyncio.sleep(TOKEN_DELAY)
                yield chunk(f" t{i}")
            yield chunk("", "length")
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    state = {"bodies": [], "count": 0, "fail_every": 0}
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "test server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def fake(server):
    url, state = server
    state.update(bodies=[], count=0, fail_every=0)
    return url, state


def bench(*args: str) -> int:
    return main(["--disable-tqdm", *args])


def test_bench_end_to_end(fake, tmp_path, capsys):
    url, state = fake
    out = tmp_path / "res" / "run.json"
    rc = bench("--base-url", url, "--num-prompts", "6", "--input-len", "16", "--output-len", "5",
               "--max-concurrency", "3", "--slo", "ttft:10000,e2el:20000", "--json", str(out), "--save-detailed",
               "--label", "smoke", "--vocab-range", "500:600")
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "============ Serving Benchmark Result ============" in captured.out
    assert "Successful requests:                     6" in captured.out
    assert "Request goodput (req/s):" in captured.out

    for body in state["bodies"]:
        assert body["model"] == MODEL  # resolved from GET /v1/models
        assert len(body["prompt"]) == 16 and all(500 <= t < 600 for t in body["prompt"])
        assert body["max_tokens"] == 5 and body["stream"] is True and body["temperature"] == 0
        assert body["stream_options"] == {"include_usage": True} and body["ignore_eos"] is True
    assert len(state["bodies"]) == 6

    doc = json.loads(out.read_text())
    assert set(doc) == {"label", "date", "settings", "workload", "summary", "requests"}
    assert doc["label"] == "smoke" and doc["settings"]["model"] == MODEL
    assert doc["settings"]["max_concurrency"] == 3 and doc["settings"]["vocab_range"] == [500, 600]
    assert doc["workload"]["kind"] == "synthetic" and doc["workload"]["num_requests"] == 6
    s = doc["summary"]
    for key in ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
                "total_token_throughput", "peak_concurrency", "request_goodput", "slo_attainment_pct",
                *(f"{stat}_{m}_ms" for stat in ("mean", "median", "std", "p90", "p99")
                  for m in ("ttft", "tpot", "itl", "e2el"))):
        assert key in s, key
    assert s["completed"] == 6 and s["failed"] == 0
    assert s["total_output_tokens"] == 30 and s["total_input_tokens"] == 96
    assert 1 <= s["peak_concurrency"] <= 3
    assert s["good_requests"] == 6 and s["slo_attainment_pct"] == 100.0
    assert s["mean_ttft_ms"] >= FIRST_DELAY * 1000
    rows = doc["requests"]
    assert len(rows) == 6 and all(r["success"] for r in rows)
    for r in rows:
        assert r["ttft_ms"] >= FIRST_DELAY * 1000
        assert r["output_tokens"] == 5 and len(r["itl_ms"]) == 4
        assert r["e2el_ms"] >= (FIRST_DELAY + 4 * TOKEN_DELAY) * 1000  # the server's last send
        assert r["tpot_ms"] == pytest.approx((r["e2el_ms"] - r["ttft_ms"]) / 4)


def test_bench_counts_failed_requests(fake, tmp_path, capsys):
    url, state = fake
    state["fail_every"] = 3  # requests 3 and 6 get HTTP 400
    out = tmp_path / "run.json"
    rc = bench("--base-url", url, "--num-prompts", "6", "--input-len", "4", "--output-len", "3",
               "--request-rate", "200", "--json", str(out), "--save-detailed")
    captured = capsys.readouterr()
    assert rc == 0
    assert "Successful requests:                     4" in captured.out
    assert "Failed requests:                         2" in captured.out
    assert "rejected by the test server" in captured.err
    s = json.loads(out.read_text())["summary"]
    assert s["completed"] == 4 and s["failed"] == 2
    assert s["errors"] == {"HTTP 400: rejected by the test server": 2}
    rows = json.loads(out.read_text())["requests"]
    assert sum(1 for r in rows if r["http_status"] == 400 and not r["success"]) == 2


def test_bench_all_failed_exits_1(fake, capsys):
    url, state = fake
    state["fail_every"] = 1
    assert bench("--base-url", url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2") == 1
    assert "every request failed" in capsys.readouterr().err


def test_bench_trace_replay_on_chat_endpoint(fake, tmp_path, capsys):
    url, state = fake
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.0000000,400,40\n"
                     "2023-11-16 18:15:46.5000000,200,9\n"
                     "2023-11-16 18:15:47.0000000,90,1000\n"
                     "2023-11-16 18:15:49.0000000,10,10\n")
    out = tmp_path / "t.json"
    rc = bench("--base-url", url, "--endpoint", "/v1/chat/completions", "--model", "m1", "--no-ignore-eos",
               "--trace", str(trace), "--num-prompts", "3", "--trace-time-scale", "0.2", "--length-scale", "0.1",
               "--max-output-len", "6", "--json", str(out))
    assert rc == 0, capsys.readouterr().err
    bodies = sorted(state["bodies"], key=lambda b: -len(b["messages"][0]["content"].split()))
    assert [len(b["messages"][0]["content"].split()) for b in bodies] == [40, 20, 9]
    assert [b["max_tokens"] for b in bodies] == [4, 1, 6]
    assert all(b["model"] == "m1" and "ignore_eos" not in b and "prompt" not in b for b in bodies)
    doc = json.loads(out.read_text())
    assert doc["workload"]["kind"] == "trace" and doc["workload"]["arrival_span_s"] == pytest.approx(0.2)
    s = doc["summary"]
    assert s["completed"] == 3 and s["total_output_tokens"] == 11 and s["total_input_tokens"] == 69
    assert s["duration_s"] >= 0.2
    assert s["mean_tpot_ms"] > 0  # from the two multi-token requests only
    assert "requests" not in doc


def test_unreachable_endpoint_exits_1_with_one_line(capsys):
    rc = bench("--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2")
    err = capsys.readouterr().err
    assert rc == 1
    assert "cannot reach http://127.0.0.1:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_missing_trace_is_a_clear_error(tmp_path, capsys):
    assert bench("--trace", str(tmp_path / "nope.csv")) == 1
    assert "trace not found" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["--request-rate", "0"], ["--num-prompts", "0"], ["--slo", "ttfx:5"], ["--vocab-range", "9:3"],
    ["--save-detailed"], ["--trace-start", "-1"], ["--bogus"],
])
def test_bad_flags_are_argparse_errors(args, capsys):
    with pytest.raises(SystemExit) as exc:
        bench(*args)
    assert exc.value.code == 2
    assert "usage: ferry bench" in capsys.readouterr().err


def test_ferry_bench_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--request-rate" in result.stdout and "--trace" in result.stdout and "--slo" in result.stdout


# --- the client's stream parsing, without a server ---------------------------------------------

def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


async def run_client(content: bytes, status: int = 200) -> object:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=content))
    spec = RequestSpec(0, 0.0, 7, 3, [1] * 7)
    async with httpx.AsyncClient(transport=transport) as client:
        body = build_body(spec, model="m", endpoint="/v1/completions")
        return await send_request(client, "http://x/v1/completions", body, spec, time.perf_counter())


def text_event(text: str) -> str:
    return json.dumps({"choices": [{"index": 0, "text": text}]})


async def test_client_counts_content_chunks_without_usage():
    res = await run_client(sse(text_event("a"), text_event(""), text_event("b"), text_event("c"), "[DONE]"))
    assert res.success and res.output_tokens == 3 and len(res.itl) == 2
    assert res.prompt_tokens == 7 and res.latency >= res.ttft > 0


async def test_client_prefers_usage():
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 5}})
    res = await run_client(sse(text_event("ab"), text_event("cd"), usage, "[DONE]"))
    assert res.success and res.output_tokens == 5 and res.prompt_tokens == 8


async def test_client_error_in_stream_fails_the_request():
    err = json.dumps({"error": {"message": "engine died", "code": 500}})
    res = await run_client(sse(text_event("a"), err))
    assert not res.success and "engine died" in res.error


async def test_client_http_error_and_empty_stream():
    res = await run_client(b'{"detail": "bad prompt"}', status=422)
    assert not res.success and res.error == "HTTP 422: bad prompt" and res.http_status == 422
    res = await run_client(sse("[DONE]"))
    assert not res.success and "no tokens" in res.error
