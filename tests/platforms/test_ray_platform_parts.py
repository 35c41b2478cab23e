"""The Ray platform's parts that decide nothing about Ray itself: command lines and placeholders, pool
deployments' options, the autoscaling policy's reading of the scheduler, the join of Ray's replica view
with the scheduler's registry, the closed-network environment, and `ferry up`'s refusals.
(tests/integration/test_ray_platform.py runs it all on a real Ray instance.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.gen.ferry.v1 import scheduler_pb2
from services.platforms.local import build_parser, check_args
from services.platforms.ray_app import ControlPlane, pools, worker_options
from services.platforms.ray_autoscaling import FollowScheduler, desired_of
from services.platforms.ray_cluster import closed_network_env
from services.platforms.ray_registry import gone_instances, instance_id, live_instances
from services.platforms.ray_service import fill
from services.platforms.stack_args import worker_argv
from tests.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
PLANE = ControlPlane("10.0.0.1", 50050, 50051, 6380, 50070)


def args(*argv: str):
    return build_parser().parse_args(["--platform", "ray", *argv])


def test_placeholders_are_filled_and_other_braces_stay():
    argv = ("serve", "decode", "--host", "{host}", "--scheduler-address", "{scheduler}", "--x", '{"a": 1}', "")
    assert fill(argv, {"host": "10.0.0.7", "scheduler": "10.0.0.1:50050"}) == [
        "serve", "decode", "--host", "10.0.0.7", "--scheduler-address", "10.0.0.1:50050", "--x", '{"a": 1}', ""]


def test_pools_autoscaled_by_the_scheduler_and_the_llm_pair_fixed():
    a = args("--engine", "sim", "--served-model-name", "sim", "--llm-pair", "--autoscale", "--max-decode", "3")
    by_name = {p.name: p for p in pools(a)}
    assert set(by_name) == {"prefill", "decode", "prefill-llm", "decode-llm"}
    decode = worker_options(a, by_name["decode"], PLANE)
    scaling = decode["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"], scaling["initial_replicas"]) == (1, 3, 1)
    assert scaling["upscale_delay_s"] == scaling["downscale_delay_s"] == 0
    assert scaling["policy"]["policy_kwargs"] == {"scheduler_address": "10.0.0.1:50050", "pool": "decode",
                                                  "interval_s": 1.0}
    assert "num_replicas" not in decode
    assert decode["graceful_shutdown_timeout_s"] > a.drain_timeout       # room to drain before Ray kills it
    pair = worker_options(a, by_name["decode-llm"], PLANE)
    assert pair["num_replicas"] == 1 and "autoscaling_config" not in pair
    assert worker_options(args("--decode", "2"), pools(args("--decode", "2"))[1], PLANE)["num_replicas"] == 2


def test_gpu_workers_ask_ray_for_gpus():
    cuda = args("--device", "cuda")
    assert worker_options(cuda, pools(cuda)[0], PLANE)["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 1.0}
    cpu = args()
    assert worker_options(cpu, pools(cpu)[0], PLANE)["ray_actor_options"]["num_gpus"] == 0.0
    two = args("--device", "cuda", "--num-gpus-per-worker", "2")
    assert worker_options(two, pools(two)[1], PLANE)["ray_actor_options"]["num_gpus"] == 2.0


def test_the_llm_pair_serves_the_model_folder_and_the_sim_pools_their_own_name():
    a = args("--engine", "sim", "--served-model-name", "sim", "--llm-pair")
    sim = worker_argv(a, "{host}", "{scheduler}", "", 2, 2)
    llm = worker_argv(a, "{host}", "{scheduler}", "", 2, 2, engine="llm")
    assert "--engine" in sim and sim[sim.index("--served-model-name") + 1] == "sim"
    assert "--engine" not in llm and "--served-model-name" not in llm
    assert llm[llm.index("--cpu-threads") + 1] == "1"                   # 2 cores shared by 2 llm workers


def reply(decided: float, **desired: int) -> scheduler_pb2.ScaleRecommendationsReply:
    return scheduler_pb2.ScaleRecommendationsReply(decided_at_unix_s=decided, pools=[
        scheduler_pb2.PoolRecommendation(pool=pool, desired=n) for pool, n in desired.items()])


def test_the_policy_reads_the_pools_desired_size_and_nothing_before_a_decision():
    assert desired_of(reply(10.0, prefill=1, decode=3), "decode") == 3
    assert desired_of(reply(0.0, decode=3), "decode") is None            # the autoscaler has not run yet
    assert desired_of(reply(10.0, prefill=1), "decode") is None


class Context:
    """The fields of Ray Serve's AutoscalingContext the policy reads."""
    def __init__(self, now: float, target: int, state: dict | None = None) -> None:
        self.current_time, self.target_num_replicas, self.policy_state = now, target, state or {}


def test_the_policy_keeps_the_size_while_the_scheduler_cannot_be_asked_and_asks_at_its_interval():
    policy = FollowScheduler(f"127.0.0.1:{free_port()}", "decode", interval_s=5.0)   # nobody listens
    asked = []
    policy.ask = lambda: asked.append(1) or (None if len(asked) == 1 else 4)
    desired, state = policy(Context(100.0, 2))
    assert desired == 2 and len(asked) == 1                               # no answer: keep Ray's target
    desired, state = policy(Context(103.0, 2, state))
    assert desired == 2 and len(asked) == 1                               # within the interval: not asked
    desired, state = policy(Context(105.0, 2, state))
    assert desired == 4 and len(asked) == 2
    desired, _ = policy(Context(106.0, 4, state))
    assert desired == 4 and len(asked) == 2


def test_the_policy_asks_a_real_address_and_survives_its_absence():
    policy = FollowScheduler(f"127.0.0.1:{free_port()}", "decode")
    assert policy.ask() is None                                          # UNAVAILABLE is not an error


def test_rays_view_joins_the_registry_on_the_instance_id():
    deployments = {
        "decode": {"replicas": [{"replica_id": "aaaa", "state": "RUNNING"}, {"replica_id": "bbbb", "state": "STOPPING"}]},
        "prefill": {"replicas": [{"replica_id": "cccc", "state": "STARTING"}]},
        "decode-llm": {"replicas": [{"replica_id": "dddd", "state": "STOPPED"}]},
    }
    live = live_instances(deployments)
    assert live == {"decode.aaaa", "decode.bbbb", "prefill.cccc"}
    registered = ["decode.aaaa", "decode.bbbb", "decode.gone", "decode-llm.dddd", "prefill.cccc", "other-host-worker"]
    assert gone_instances(registered, ["prefill", "decode", "decode-llm"], live) == ["decode-llm.dddd", "decode.gone"]
    assert instance_id("decode-llm", "dddd") == "decode-llm.dddd"


def test_a_local_ray_instance_is_closed_to_the_network(tmp_path):
    env = closed_network_env(tmp_path)
    token = tmp_path / "auth_token"
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert len(token.read_text()) == 64 and token.stat().st_mode & 0o777 == 0o600
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    first = token.read_text()
    closed_network_env(tmp_path)
    assert token.read_text() != first                                   # a fresh token for every start


@pytest.mark.parametrize("argv, problem", [
    (("--address", "auto"), "--platform ray"),
    (("--platform", "ray", "--colocated"), "--platform local only"),
    (("--platform", "ray", "--llm-pair"), "--engine sim"),
    (("--platform", "ray", "--engine", "sim", "--llm-pair"), "another --served-model-name"),
    (("--platform", "ray", "--num-gpus-per-worker", "-1"), ">= 0"),
    (("--platform", "ray", "--drain-timeout", "0"), "> 0"),
])
def test_ferry_up_refuses_what_cannot_work_before_starting_anything(argv, problem):
    assert problem in check_args(build_parser().parse_args(list(argv)))


def test_a_valid_ray_command_line_passes():
    assert check_args(args("--engine", "sim", "--served-model-name", "s", "--llm-pair", "--autoscale")) == ""



def test_the_service_token_made_for_a_ray_stack_goes_when_ferry_up_ends(tmp_path):
    """`--platform ray --service-auth` without --log-dir keeps the token in a temp folder of its own; it is
    removed when `ferry up` returns, here after a start that fails (ray imported before its settings)."""
    code = ("import sys, ray; from services.platforms.local import main; "
            "sys.exit(main(['--platform', 'ray', '--service-auth', '--engine', 'sim']))")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "ray was imported before" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
