"""`ferry serve prefill`: a worker that runs prompts and hands their KV to decode workers."""
from services.worker.main import main as worker_main


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, role="prefill")
