"""Kubernetes operators of Ferry (the kopf operator lives in operators.ferry_operator)."""
