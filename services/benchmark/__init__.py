"""``ferry bench``: a load generator and benchmark for any OpenAI-compatible endpoint.

Modelled on vLLM's ``vllm bench serve``: :mod:`.workload` builds the request specs (synthetic or a
replayed trace), :mod:`.client` sends one streaming request and times it, :mod:`.metrics` turns the
results into a summary with vLLM's definitions, and :mod:`.cli` runs the whole thing.
"""
