"""The global scheduler: instance registry (fed by heartbeats, persisted in Redis), routing, gRPC API."""
