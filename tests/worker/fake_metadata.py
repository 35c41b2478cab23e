"""A fake instance-metadata service on a free 127.0.0.1 port that answers as AWS, GCP and Azure do,
switched between "none", "notice" and failures by the test. It checks each cloud's headers (a request
without them gets the cloud's refusal) and records every path asked for.

    FakeMetadata.mode    none | notice | error (HTTP 500) | malformed | slow (answers after 0.6 s)

A notice's time is `deadline_unix_s` (default: two minutes after the fake started, in whole seconds, as
AWS gives), written as each cloud writes it.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AWS_TOKEN = "AQAEAfake-token=="
AZURE_VM = "ferry-worker-vm_3"


def aws_time(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def azure_time(unix_s: float) -> str:
    return formatdate(unix_s, usegmt=True)          # RFC 1123: "Wed, 02 Dec 2026 09:00:00 GMT"


def azure_events(event_type: str, not_before: str, vm_name: str = AZURE_VM) -> dict:
    return {"DocumentIncarnation": 2, "Events": [
        {"EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123", "EventStatus": "Scheduled",
         "EventType": event_type, "ResourceType": "VirtualMachine", "Resources": [vm_name],
         "NotBefore": not_before, "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}]}


class FakeMetadata:
    def __init__(self) -> None:
        self.mode = "none"
        self.deadline_unix_s = float(int(time.time()) + 120)
        self.gcp_maintenance = "NONE"
        self.paths: list[str] = []
        self.num_tokens = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                fake.paths.append(f"PUT {self.path}")
                if self.path != "/latest/api/token":
                    return self._reply(404, b"")
                if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self._reply(400, b"missing TTL")
                fake.num_tokens += 1
                self._reply(200, AWS_TOKEN.encode())

            def do_GET(self) -> None:
                fake.paths.append(f"GET {self.path}")
                if fake.mode == "slow":
                    threading.Event().wait(0.6)
                if fake.mode == "error":
                    return self._reply(500, b"internal error")
                if self.path.startswith("/latest/"):
                    return self._aws()
                if self.path.startswith("/computeMetadata/"):
                    return self._gcp()
                if self.path.startswith("/metadata/"):
                    return self._azure()
                self._reply(404, b"")

            def _aws(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != AWS_TOKEN:
                    return self._reply(401, b"")
                if self.path == "/latest/meta-data/spot/instance-action" and fake.mode != "none":
                    body = b"{not json" if fake.mode == "malformed" else \
                        json.dumps({"action": "terminate", "time": aws_time(fake.deadline_unix_s)}).encode()
                    return self._reply(200, body)
                if self.path == "/latest/meta-data/events/recommendations/rebalance":
                    return self._reply(200, json.dumps({"noticeTime": aws_time(time.time())}).encode())
                self._reply(404, b"")

            def _gcp(self) -> None:
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._reply(403, b"missing Metadata-Flavor")
                if self.path == "/computeMetadata/v1/instance/preempted":
                    value = {"none": b"FALSE", "notice": b"TRUE"}.get(fake.mode, b"MAYBE")
                    return self._reply(200, value)
                if self.path == "/computeMetadata/v1/instance/maintenance-event":
                    return self._reply(200, fake.gcp_maintenance.encode())
                self._reply(404, b"")

            def _azure(self) -> None:
                if self.headers.get("Metadata") != "true":
                    return self._reply(400, b"missing Metadata: true")
                if self.path == "/metadata/instance/compute/name?api-version=2021-02-01&format=text":
                    return self._reply(200, AZURE_VM.encode())
                if self.path == "/metadata/scheduledevents?api-version=2020-07-01":
                    doc = {"DocumentIncarnation": 1, "Events": []} if fake.mode == "none" else \
                        azure_events("Preempt", azure_time(fake.deadline_unix_s))
                    body = b"[1, 2" if fake.mode == "malformed" else json.dumps(doc).encode()
                    return self._reply(200, body)
                self._reply(404, b"")

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, name="fake-metadata", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
