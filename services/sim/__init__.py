"""Discrete-event simulator of a Ferry cluster: workload traces in, routing and scaling outcomes out."""
