"""``ferry bench``: drive an OpenAI-compatible endpoint with a synthetic or trace workload and report
vLLM-style serving metrics (TTFT, TPOT, ITL, E2E latency, throughput, goodput).

    ferry bench --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
        --input-len 512 --output-len 128
    ferry bench --trace ../shared/data/traces/azure_llm_2023_conv.csv --num-prompts 500 \\
        --trace-time-scale 0.5 --length-scale 0.25 --slo ttft:500,tpot:50 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from services.benchmark import workload as wl
from services.benchmark.client import build_body, is_chat, send_request
from services.benchmark.metrics import RequestResult, format_table, parse_slo, summarize

DEFAULT_TRACE = "../shared/data/traces/azure_llm_2023_conv.csv"


class BenchError(Exception):
    """A failure worth one line on stderr and exit code 1 (no traceback)."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _vocab_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI integers, got {text!r}") from None
    if not sep or not 0 <= lo_i < hi_i:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 0 <= LO < HI, got {text!r}")
    return lo_i, hi_i


def _trace_start(text: str) -> int | str:
    if text == "random":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 or 'random'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ferry bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Benchmark an OpenAI-compatible endpoint (streaming) with vLLM `bench serve` metrics.")
    t = p.add_argument_group("target")
    t.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root URL")
    t.add_argument("--endpoint", default="/v1/completions",
                   help="API path: /v1/completions (token-id prompts) or /v1/chat/completions (text)")
    t.add_argument("--model", default=None, help="model name (default: the first id from GET /v1/models)")
    t.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    t.add_argument("--request-timeout", type=_positive_float, default=600.0, help="per-request timeout (s)")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=_positive_int, default=100, help="number of requests")
    w.add_argument("--request-rate", type=_positive_float, default=None,
                   help="Poisson arrival rate (req/s); inf = all at once. Synthetic default: inf; "
                        "with --trace it overrides the trace's timestamps")
    w.add_argument("--max-concurrency", type=_positive_int, default=None, help="cap on in-flight requests")
    w.add_argument("--input-len", type=_positive_int, default=1024, help="synthetic prompt length (tokens)")
    w.add_argument("--output-len", type=_positive_int, default=128, help="synthetic output length (tokens)")
    w.add_argument("--seed", type=int, default=0, help="seed for arrivals, prompts and trace sampling")
    w.add_argument("--vocab-range", type=_vocab_range, default=wl.DEFAULT_VOCAB_RANGE,
                   metavar="LO:HI", help="token ids for random prompts are drawn from [LO, HI)")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos=true (outputs may then stop early)")
    tr = p.add_argument_group("trace replay (Azure LLM CSV: TIMESTAMP,ContextTokens,GeneratedTokens)")
    tr.add_argument("--trace", default=None, metavar="PATH",
                    help=f"replay this trace, e.g. {DEFAULT_TRACE}")
    tr.add_argument("--trace-start", type=_trace_start, default=0,
                    help="first trace row to replay, or 'random' for a seeded random window")
    tr.add_argument("--trace-time-scale", type=float, default=1.0,
                    help="multiply inter-arrival gaps (<1 = faster)")
    tr.add_argument("--length-scale", type=_positive_float, default=1.0,
                    help="multiply input and output lengths (min 1)")
    tr.add_argument("--max-input-len", type=_positive_int, default=None, help="cap trace input lengths")
    tr.add_argument("--max-output-len", type=_positive_int, default=None, help="cap trace output lengths")
    o = p.add_argument_group("output")
    o.add_argument("--slo", "--goodput", dest="slo", nargs="+", default=None, metavar="KIND:MS",
                   help="SLOs for goodput, e.g. ttft:500,tpot:50,e2el:10000 (any subset)")
    o.add_argument("--json", default=None, metavar="PATH", help="write settings and summary as JSON")
    o.add_argument("--save-detailed", action="store_true", help="add per-request rows to the JSON")
    o.add_argument("--label", default=None, help="name of this run in the JSON")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    return p


def build_workload(args: argparse.Namespace) -> tuple[list[wl.RequestSpec], dict]:
    chat = is_chat(args.endpoint)
    if args.trace:
        path = Path(args.trace)
        if not path.is_file():
            raise BenchError(f"trace not found: {path} (traces live in ../shared/data/traces/, "
                             "see its README.md)")
        try:
            rows = wl.load_trace(path)
            specs = wl.trace_workload(
                rows, num_prompts=args.num_prompts, start=args.trace_start, seed=args.seed,
                time_scale=args.trace_time_scale, length_scale=args.length_scale,
                max_input_len=args.max_input_len, max_output_len=args.max_output_len,
                request_rate=args.request_rate, chat=chat, vocab_range=args.vocab_range)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        info = {"kind": "trace", "trace": str(path), "trace_rows": len(rows),
                "arrivals": "poisson" if args.request_rate is not None else "trace timestamps",
                "trace_time_scale": args.trace_time_scale if args.request_rate is None else None,
                "length_scale": args.length_scale}
    else:
        rate = math.inf if args.request_rate is None else args.request_rate
        specs = wl.synthetic_workload(num_prompts=args.num_prompts, input_len=args.input_len,
                                      output_len=args.output_len, request_rate=rate, seed=args.seed,
                                      chat=chat, vocab_range=args.vocab_range)
        info = {"kind": "synthetic", "arrivals": "all at once" if math.isinf(rate) else "poisson"}
    info.update({"num_requests": len(specs),
                 "planned_input_tokens": sum(s.input_len for s in specs),
                 "planned_output_tokens": sum(s.output_len for s in specs),
                 "arrival_span_s": max((s.arrival for s in specs), default=0.0)})
    return specs, info


async def resolve_model(client: httpx.AsyncClient, base_url: str, model: str | None) -> str:
    """Check the server answers (GET /v1/models); return ``model`` or the first listed id."""
    url = f"{base_url}/v1/models"
    try:
        resp = await client.get(url, timeout=10.0)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach {base_url}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
    if model:
        return model
    if resp.status_code != 200:
        raise BenchError(f"GET {url} returned HTTP {resp.status_code}; pass --model")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise BenchError(f"GET {url} listed no models; pass --model") from None


async def run(args: argparse.Namespace, specs: list[wl.RequestSpec]) -> tuple[str, list[RequestResult], float]:
    base_url = args.base_url.rstrip("/")
    url = base_url + "/" + args.endpoint.lstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=min(args.request_timeout, 30.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        model = await resolve_model(client, base_url, args.model)
        bodies = [build_body(s, model=model, endpoint=args.endpoint, ignore_eos=args.ignore_eos) for s in specs]
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        bar = None
        if not args.disable_tqdm and sys.stdout.isatty():
            from tqdm import tqdm

            bar = tqdm(total=len(specs), desc="requests", unit="req")

        async def one(spec: wl.RequestSpec, body: dict, t0: float) -> RequestResult:
            delay = t0 + spec.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if sem is None:
                res = await send_request(client, url, body, spec, t0)
            else:
                async with sem:
                    res = await send_request(client, url, body, spec, t0)
            if bar is not None:
                bar.update(1)
            return res

        t0 = time.perf_counter()
        try:
            results = await asyncio.gather(*(one(s, b, t0) for s, b in zip(specs, bodies, strict=True)))
        finally:
            if bar is not None:
                bar.close()
        duration = time.perf_counter() - t0
    return model, list(results), duration


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        slo = parse_slo(args.slo)
    except ValueError as exc:
        parser.error(str(exc))
    if args.trace_time_scale < 0:
        parser.error("--trace-time-scale must be >= 0")
    if args.save_detailed and not args.json:
        parser.error("--save-detailed needs --json PATH")
    try:
        specs, info = build_workload(args)
        how = f"{info['kind']}, {info['arrivals']}"
        if info["kind"] == "trace":  # say which scaling was used (traces/README.md asks for it)
            if info["trace_time_scale"] is not None:
                how += f" x{info['trace_time_scale']:g}"
            how += f", lengths x{info['length_scale']:g}"
        print(f"ferry bench: {len(specs)} requests ({how}) -> {args.base_url.rstrip('/')}{args.endpoint}",
              flush=True)
        model, results, duration = asyncio.run(run(args, specs))
    except BenchError as exc:
        print(f"ferry bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ferry bench: interrupted", file=sys.stderr)
        return 130
    summary = summarize(results, duration, slo)
    print(format_table(summary))
    if summary["errors"]:
        top = sorted(summary["errors"].items(), key=lambda kv: -kv[1])[:5]
        print("Errors:", file=sys.stderr)
        for msg, count in top:
            print(f"  {count} x {msg}", file=sys.stderr)
    if args.json:
        settings = {k: _jsonable(v) for k, v in vars(args).items()}
        settings["model"] = model
        if settings.get("api_key"):
            settings["api_key"] = "***"
        doc = {"label": args.label, "date": datetime.now(UTC).isoformat(timespec="seconds"),
               "settings": settings, "workload": info, "summary": summary}
        if args.save_detailed:
            doc["requests"] = [r.row() for r in results]
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            print(f"ferry bench: error: cannot write {args.json}: {exc}", file=sys.stderr)
            return 1
        print(f"results written to {args.json}")
    if results and summary["completed"] == 0:
        print("ferry bench: error: every request failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
