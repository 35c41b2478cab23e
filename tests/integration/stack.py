"""A Ferry cluster as real processes on loopback (redis, scheduler, kvstore, workers, gateway), and the
in-process engine that greedy outputs are compared with. Fixtures: conftest.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai

from services.gen.ferry.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.procs import eventually, free_port, start, start_redis, stop, wait_for_port

MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 180.0


@dataclass
class Stack:
    """One running cluster: its gateway URL, the scheduler address, and the processes by name."""
    name: str
    folder: Path
    url: str = ""
    scheduler_address: str = ""
    redis_url: str = ""                 # the scheduler's Redis
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)     # name -> port of its /metrics (Shape.metrics)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def tails(self, lines: int = 25) -> str:
        out = []
        for name in self.procs:
            path = self.log(name)
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
            out.append(f"---- {self.name}/{name} ({path})\n" + "\n".join(text))
        return "\n".join(out)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"{self.name}: processes exited: {dead}\n{self.tails()}")

    # ---- looking inside -------------------------------------------------------------------
    def instances(self) -> list[scheduler_pb2.InstanceStatus]:
        with grpc.insecure_channel(self.scheduler_address) as channel:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).ListInstances(
                scheduler_pb2.ListInstancesRequest(), timeout=5)
        return list(reply.instances)

    def worker_stats(self) -> list[worker_pb2.WorkerStats]:
        """`Stats` of every worker the scheduler knows, asked of the worker itself."""
        stats = []
        for status in self.instances():
            with grpc.insecure_channel(status.instance.address) as channel:
                stats.append(worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.StatsRequest(), timeout=5))
        return stats

    def idle(self) -> bool:
        """No request runs or waits anywhere and every KV block is free (cached-free counts as free)."""
        stats = self.worker_stats()
        return bool(stats) and all(s.load.num_running == 0 and s.load.num_waiting == 0
                                   and s.load.num_free_blocks == s.load.num_blocks for s in stats)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets); 0 when absent."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    # ---- life -----------------------------------------------------------------------------
    def start_service(self, name: str, args: list[str]) -> subprocess.Popen:
        self.procs[name] = start(args, log=self.log(name))
        return self.procs[name]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group at once, then wait (SIGKILL what lingers)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            stop(proc, timeout)


@dataclass(frozen=True, slots=True)
class Shape:
    """What a stack runs: colocated workers or a prefill pool + decode pool, on the model or the sim
    engine (`--engine sim`: a performance model paced in real time, no weights; `model` then only gives
    the served name and the vocabulary of the placeholder tokens)."""
    colocated: bool = False
    num_decode: int = 1                 # decode workers (colocated: `--role both` workers)
    engine: str = "llm"                 # llm | sim
    sim_profile: str = "llama3-8b-h100"
    metrics: bool = False               # scheduler, kvstore and workers serve /metrics (`Stack.metrics_ports`)
    autoscale_interval_s: float = 0.0   # > 0: the scheduler's autoscaler runs, reading the gateway's /metrics
    scheduler_args: tuple[str, ...] = ()    # more `serve scheduler` settings


def start_stack(name: str, folder: Path, model: Path, colocated: bool = False, *,
                shape: Shape | None = None) -> Stack:
    """Start a cluster: `colocated` alone for the one-worker stacks, or a `Shape` (which then decides)."""
    shape = shape or Shape(colocated=colocated)
    stack = Stack(name, folder)
    started = False
    try:
        _launch(stack, model, shape)
        started = True
    except (RuntimeError, OSError, grpc.RpcError) as e:
        raise RuntimeError(f"the {name} stack did not start: {e}\n{stack.tails(40)}") from None
    finally:
        if not started:                     # also on Ctrl-C: leave no process behind
            stack.stop()
    return stack


def _launch(stack: Stack, model: Path, shape: Shape) -> None:
    redis_port = free_port()
    stack.procs["redis"] = start_redis(redis_port, stack.folder, stack.log("redis"))
    stack.redis_url = f"redis://127.0.0.1:{redis_port}/0"

    http_port = free_port()
    stack.url = f"http://127.0.0.1:{http_port}"

    def metrics(name: str) -> list[str]:
        if not shape.metrics:
            return []
        stack.metrics_ports[name] = free_port()
        return ["--metrics-port", str(stack.metrics_ports[name])]

    scheduler_port = free_port()
    stack.scheduler_address = f"127.0.0.1:{scheduler_port}"
    autoscale = (["--autoscale-interval-s", str(shape.autoscale_interval_s),
                  "--gateway-metrics-urls", f"{stack.url}/metrics"] if shape.autoscale_interval_s > 0 else [])
    stack.start_service("scheduler", ["serve", "scheduler", "--port", str(scheduler_port),
                                      "--redis-url", stack.redis_url,
                                      "--heartbeat-interval-s", "0.2", *metrics("scheduler"), *autoscale,
                                      *shape.scheduler_args])
    kvstore_port = free_port()
    stack.start_service("kvstore", ["serve", "kvstore", "--port", str(kvstore_port), "--capacity-gb", "0.25",
                                    *metrics("kvstore")])
    wait_for_port(scheduler_port, stack.procs["scheduler"], timeout=60)
    wait_for_port(kvstore_port, stack.procs["kvstore"], timeout=60)

    workers, roles = _workers(shape)
    if shape.engine == "sim":           # no model arithmetic: a thread is plenty
        threads, engine = 1, ["--engine", "sim", "--sim-profile", shape.sim_profile]
    else:                               # share the cores (+1: the test process)
        threads, engine = max(1, (os.cpu_count() or 1) // (len(workers) + 1)), []
    common = ["--model", str(model), "--scheduler-address", stack.scheduler_address,
              "--kvstore-address", f"127.0.0.1:{kvstore_port}", "--kv-cache-memory-gb", "0.25",
              "--cpu-threads", str(threads), *engine]
    ports = {}
    for name, service in workers:                   # they load the model in parallel
        ports[name] = free_port()
        stack.start_service(name, ["serve", *service, *common, "--port", str(ports[name]), *metrics(name)])
    for name, port in ports.items():
        wait_for_port(port, stack.procs[name], timeout=READY_TIMEOUT_S)

    if shape.metrics:
        stack.metrics_ports["gateway"] = http_port          # the gateway serves /metrics on its HTTP port
    stack.start_service("gateway", ["serve", "gateway", "--model", str(model), "--port", str(http_port),
                                    "--sink-port", str(free_port()), "--scheduler-address",
                                    stack.scheduler_address])
    wait_for_port(http_port, stack.procs["gateway"], timeout=60)
    for name, port in stack.metrics_ports.items():      # each serves /metrics from a thread of its own
        wait_for_port(port, stack.procs[name], timeout=60)

    def ready() -> bool:
        stack.check_alive()
        if Counter(s.instance.role for s in stack.instances() if s.healthy) != roles:
            return False
        try:
            with urllib.request.urlopen(f"{stack.url}/v1/models", timeout=2) as r:
                return any(m["id"] == MODEL for m in json.load(r)["data"])
        except OSError:
            return False

    if not eventually(ready, timeout=60, interval=0.2):
        raise TimeoutError(f"GET {stack.url}/v1/models does not list {MODEL}")


def _workers(shape: Shape) -> tuple[list[tuple[str, list[str]]], Counter]:
    """(process name, `serve` arguments) of every worker, and how many instances of each role register.
    A single worker of a role is named after it ("decode"); several are numbered ("decode-0", …)."""
    if shape.colocated:
        pools = [("worker", ["decode", "--role", "both"], common_pb2.ROLE_BOTH, shape.num_decode)]
    else:
        pools = [("prefill", ["prefill"], common_pb2.ROLE_PREFILL, 1),
                 ("decode", ["decode"], common_pb2.ROLE_DECODE, shape.num_decode)]
    workers = [(name if count == 1 else f"{name}-{i}", service)
               for name, service, _, count in pools for i in range(count)]
    return workers, Counter({role: count for _, _, role, count in pools})


class Reference:
    """The in-process engine: what a greedy request must produce, token for token."""

    def __init__(self, model: Path) -> None:
        from services.engine.config import EngineConfig
        from services.engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(model=str(model), kv_cache_memory_gb=0.25))
        self.tokenizer = self.engine.tokenizer
        self._cache: dict[tuple, list[int]] = {}

    def prompt_ids(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        import torch

        from services.engine.sampling import SamplingParams

        key = (tuple(prompt_ids), max_tokens)
        if key not in self._cache:
            # One thread: the stacks' workers hold the other cores, and an oversubscribed torch
            # (threads spinning for a descheduled peer) is 10x slower on a small machine.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self._cache[key] = self.engine.generate(
                    [prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
            finally:
                torch.set_num_threads(threads)
        return self._cache[key]

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


# ---- requests through the official client -------------------------------------------------------
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 24


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key="x", timeout=120, max_retries=0)


def complete(stack: Stack, kind: str, stream: bool, **kwargs) -> tuple[str, str | None, object]:
    """(text, finish_reason, usage) of one request; a streamed one asks for the final usage chunk."""
    c = client(stack)
    args = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    create = c.completions.create if kind == "completion" else c.chat.completions.create
    if kind == "completion":
        args.setdefault("prompt", PROMPT)
    else:
        args.setdefault("messages", MESSAGES)
    if not stream:
        r = create(**args)
        text = r.choices[0].text if kind == "completion" else r.choices[0].message.content
        return text, r.choices[0].finish_reason, r.usage
    parts, finish, usage, after_finish = [], None, None, 0
    for chunk in create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.usage is not None:
            assert chunk.choices == [], "the usage chunk has no choices"
            usage = chunk.usage
            continue
        assert usage is None, "the usage chunk is the last one"
        assert len(chunk.choices) == 1
        ch = chunk.choices[0]
        after_finish += finish is not None
        parts.append(ch.text if kind == "completion" else (ch.delta.content or ""))
        finish = ch.finish_reason or finish
    assert after_finish == 0, "no chunk after the one with finish_reason"
    assert usage is not None, "stream_options.include_usage gives a final usage chunk"
    return "".join(parts), finish, usage


def expected(reference: Reference, kind: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[int]]:
    prompt = reference.prompt_ids(PROMPT) if kind == "completion" else reference.prompt_ids(messages=MESSAGES)
    return prompt, reference.greedy(prompt, max_tokens)


def check_greedy_parity(stack: Stack, reference: Reference, kind: str, stream: bool) -> None:
    """Greedy text, usage and finish_reason equal what the in-process engine gives for the same ids."""
    prompt, output = expected(reference, kind)
    text, finish, usage = complete(stack, kind, stream)
    assert text == reference.text(output)
    assert usage.completion_tokens == len(output)
    assert usage.prompt_tokens == len(prompt)
    assert usage.total_tokens == len(prompt) + len(output)
    eos = output[-1] in reference.engine.eos_token_ids
    assert finish == ("stop" if eos else "length")
