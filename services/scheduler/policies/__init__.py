"""The scheduler's decisions, as pure functions of a cluster snapshot (no grpc, no clock, no I/O)."""
from services.scheduler.policies.routing import RoutingPolicy, RoutingProfile, decide
from services.scheduler.policies.scorers import default_policy

__all__ = ["RoutingPolicy", "RoutingProfile", "decide", "default_policy"]
