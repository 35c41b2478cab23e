"""`ferry serve gateway`: the OpenAI-compatible HTTP API and the TokenSink workers push tokens to.

    ferry serve gateway --model models/SmolLM2-135M-Instruct --port 8000 --scheduler-address 127.0.0.1:50050
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from services.common.grpc_util import aio_channel, aio_server, bind
from services.common.lifecycle import run_service
from services.common.settings import check_redis_url, parse_settings, setting
from services.gen.ferry.v1 import token_sink_pb2_grpc

log = logging.getLogger("ferry.gateway")


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    model: str = setting("models/SmolLM2-135M-Instruct", "model folder whose tokenizer and chat template to use")
    host: str = setting("127.0.0.1", "HTTP address to listen on")
    port: int = setting(8000, "HTTP port")
    sink_port: int = setting(50070, "gRPC port of the TokenSink (0: any free port)")
    sink_advertise_address: str = setting("", "host:port workers push tokens to (default: host:sink_port)")
    scheduler_address: str = setting("127.0.0.1:50050", "scheduler host:port")
    token_timeout_s: float = setting(120.0, "fail a request when no token arrives for this long")
    slo_ttft_ms: float = setting(2000.0, "time-to-first-token objective a request meets (ferry_gateway_slo_*)")
    slo_tpot_ms: float = setting(100.0, "time-per-output-token objective a request meets (ferry_gateway_slo_*)")
    api_keys_file: str = setting("", "YAML/JSON list of API keys {name, sha256, requests_per_minute, "
                                 "tokens_per_minute} (`ferry admin api-key create`); re-read when it changes. "
                                 "Empty: no keys, the API is open; /health and /metrics always are")
    rate_limit_redis_url: str = setting("", "count the API keys' rate limits in this Redis (redis://host:port/db), "
                                        "shared by every gateway replica; empty: each replica counts alone")
    max_body_mb: float = setting(16.0, "largest request body accepted, in MiB (larger: 413 before it is read whole)")

    def __post_init__(self) -> None:
        if not (Path(self.model) / "tokenizer.json").is_file() and not (Path(self.model) / "tokenizer.model").is_file():
            raise ValueError(f"{self.model!r} has no tokenizer (run `make install`, or pass --model)")
        for name in ("port", "sink_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} {getattr(self, name)} is outside 0..65535")
        if self.token_timeout_s <= 0:
            raise ValueError("token_timeout_s must be > 0")
        if self.max_body_mb <= 0:
            raise ValueError(f"--max-body-mb {self.max_body_mb} must be > 0")
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0:
            raise ValueError(f"the SLO must be > 0 ms, got TTFT {self.slo_ttft_ms} and TPOT {self.slo_tpot_ms}: "
                             "set --slo-ttft-ms and --slo-tpot-ms")
        if self.rate_limit_redis_url and not self.api_keys_file:
            raise ValueError("--rate-limit-redis-url counts API keys' rate limits: it needs --api-keys-file")
        check_redis_url("--rate-limit-redis-url", self.rate_limit_redis_url)
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ValueError(f"--api-keys-file {self.api_keys_file!r} is not a file "
                             "(`ferry admin api-key create NAME` prints an entry for it)")


async def serve(s: GatewaySettings, stop: asyncio.Event) -> None:
    import uvicorn
    from transformers import AutoTokenizer

    from services.gateway.api_keys import KeysFile, KeysFileError
    from services.gateway.app import Gateway, create_app
    from services.gateway.auth import Access
    from services.gateway.metrics import SLO, GatewayMetrics
    from services.gateway.scheduler_client import SchedulerClient
    from services.gateway.token_sink import TokenSink
    from services.gateway.worker_watch import WorkerWatch

    try:                                             # a bad keys file stops the gateway before it listens
        keys = KeysFile(Path(s.api_keys_file)) if s.api_keys_file else None
    except KeysFileError as e:
        raise SystemExit(f"ferry gateway: {e}") from None
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, s.model)
    sink = TokenSink()
    grpc_server = aio_server()
    token_sink_pb2_grpc.add_TokenSinkServicer_to_server(sink, grpc_server)
    sink_port = bind(grpc_server, s.host, s.sink_port)
    await grpc_server.start()
    scheduler = SchedulerClient(s.scheduler_address)
    channels: dict = {}

    def channel(address: str):
        if address not in channels:
            channels[address] = aio_channel(address)
        return channels[address]

    watch = WorkerWatch(sink, channel)              # a worker gone mid-request: its requests resume
    sink.on_push_ended = watch.push_ended
    sink.on_unknown = watch.tokens_unclaimed
    scheduler.on_refresh = watch.scheduler_listed
    metrics = GatewayMetrics(SLO(ttft_s=s.slo_ttft_ms / 1000, tpot_s=s.slo_tpot_ms / 1000))
    gw = Gateway(tokenizer=tokenizer, sink=sink, sink_address=s.sink_advertise_address or f"{s.host}:{sink_port}",
                 scheduler=scheduler, channels=channel, metrics=metrics, token_timeout_s=s.token_timeout_s,
                 max_body_bytes=int(s.max_body_mb * 2**20))
    buckets = None
    if keys is not None:
        if s.rate_limit_redis_url:
            from services.gateway.rate_limit_redis import RedisBuckets
            buckets = RedisBuckets(s.rate_limit_redis_url, on_shared=metrics.rate_limit_shared.set)
        gw.access = Access(keys, metrics, buckets=buckets)
        log.info("API keys required: %d keys in %s; rate limits counted %s", len(keys.ring.keys), keys.path,
                 "in Redis, across replicas" if buckets else "by this replica")
    refresher = asyncio.create_task(scheduler.keep_refreshed())
    config = uvicorn.Config(create_app(gw), host=s.host, port=s.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3, lifespan="off")
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None       # run_service owns the signals
    http_task = asyncio.create_task(http.serve())
    log.info("gateway on http://%s:%d (token sink %s:%d, scheduler %s)", s.host, s.port, s.host, sink_port,
             s.scheduler_address)
    await asyncio.wait({http_task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    http.should_exit = True
    await http_task
    if http.started is False and not stop.is_set():
        raise OSError(f"cannot serve HTTP on {s.host}:{s.port} (in use?)")
    refresher.cancel()
    await grpc_server.stop(grace=1)
    await scheduler.close()
    if buckets is not None:
        await buckets.close()
    for c in channels.values():
        await c.close()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = parse_settings(GatewaySettings, argv, prog="ferry serve gateway", env_prefix="FERRY_GATEWAY_",
                              description="The OpenAI-compatible HTTP API of a Ferry cluster.")
    return run_service("gateway", lambda stop: serve(settings, stop))
