"""The scheduler's decisions, as pure functions of a cluster snapshot (no grpc, no clock, no I/O)."""
from services.scheduler.policies.config import default_policy, load_policy
from services.scheduler.policies.routing import RoutingPolicy, RoutingProfile, decide

__all__ = ["RoutingPolicy", "RoutingProfile", "decide", "default_policy", "load_policy"]
