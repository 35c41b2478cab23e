"""`ferry serve decode`: a worker that takes requests' KV from prefill workers and generates."""
from services.worker.main import main as worker_main


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, role="decode")
