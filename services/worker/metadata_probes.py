"""One look at a cloud's instance-metadata service for a termination notice: the requests each cloud
wants (endpoints, headers, AWS's session token), their answers read by cloud_notices.py.

    AWS    PUT  /latest/api/token              X-aws-ec2-metadata-token-ttl-seconds: 21600  (IMDSv2)
           GET  /latest/meta-data/spot/instance-action                X-aws-ec2-metadata-token
           GET  /latest/meta-data/events/recommendations/rebalance    (logged only)
    GCP    GET  /computeMetadata/v1/instance/preempted                Metadata-Flavor: Google
           GET  /computeMetadata/v1/instance/maintenance-event        Metadata-Flavor: Google
    Azure  GET  /metadata/instance/compute/name?api-version=2021-02-01&format=text   Metadata: true
           GET  /metadata/scheduledevents?api-version=2020-07-01                     Metadata: true

A failed look raises `PollError` with a kind for the metrics: `timeout`, `unreachable`, `status`
(an unexpected HTTP status, e.g. 5xx) or `malformed` (cloud_notices.MalformedDocument).
"""
from __future__ import annotations

import logging
import time
from typing import ClassVar, Protocol

import httpx

from services.worker import cloud_notices as notices
from services.worker.cloud_notices import CloudNotice, MalformedDocument

log = logging.getLogger(__name__)

DEFAULT_URLS = {"aws": "http://169.254.169.254", "gcp": "http://metadata.google.internal",
                "azure": "http://169.254.169.254"}
SOURCES = {"aws": "aws-metadata", "gcp": "gcp-metadata", "azure": "azure-metadata"}
AWS_TOKEN_TTL_S = 21600          # IMDSv2's longest session; renewed a minute before it ends
ERROR_KINDS = ("timeout", "unreachable", "status", "malformed")


class PollError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class MetadataProbe(Protocol):
    source: str                   # the notice's source for the scheduler: "aws-metadata", ...

    async def look(self, client: httpx.AsyncClient) -> CloudNotice | None: ...


async def fetch(client: httpx.AsyncClient, method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    try:
        return await client.request(method, url, headers=headers)
    except httpx.TimeoutException as e:
        raise PollError("timeout", f"{method} {url}: timed out ({type(e).__name__})") from None
    except httpx.HTTPError as e:
        raise PollError("unreachable", f"{method} {url}: {type(e).__name__}: {e}") from None


def expect(response: httpx.Response, *codes: int) -> httpx.Response:
    if response.status_code not in codes:
        raise PollError("status", f"{response.request.method} {response.request.url}: HTTP {response.status_code}")
    return response


def parsed(parse, *args):
    try:
        return parse(*args)
    except MalformedDocument as e:
        raise PollError("malformed", str(e)) from None


class AwsProbe:
    source = SOURCES["aws"]

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token: tuple[str, float] | None = None     # (token, monotonic time to renew it)
        self._rebalance_seen: str | None = None

    async def look(self, client: httpx.AsyncClient) -> CloudNotice | None:
        headers = {"X-aws-ec2-metadata-token": await self._session_token(client)}
        reply = await fetch(client, "GET", f"{self.base_url}/latest/meta-data/spot/instance-action", headers)
        if reply.status_code == 401:        # the token expired early (an IMDS restart): get a new one
            self._token = None
        notice = parsed(notices.parse_aws_instance_action, expect(reply, 200, 404).status_code, reply.content)
        if notice is None:
            await self._log_rebalance(client, headers)
        return notice

    async def _session_token(self, client: httpx.AsyncClient) -> str:
        if self._token is None or time.monotonic() >= self._token[1]:
            reply = expect(await fetch(client, "PUT", f"{self.base_url}/latest/api/token",
                                       {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)}), 200)
            self._token = reply.text.strip(), time.monotonic() + AWS_TOKEN_TTL_S - 60
        return self._token[0]

    async def _log_rebalance(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        """A rebalance recommendation is a raised risk, not a termination: log it once, act on nothing."""
        try:
            reply = await fetch(client, "GET", f"{self.base_url}/latest/meta-data/events/recommendations/rebalance",
                                headers)
            when = parsed(notices.parse_aws_rebalance, reply.status_code, reply.content)
        except PollError as e:
            log.debug("rebalance recommendation not read: %s", e)
            return
        if when is not None and when != self._rebalance_seen:
            log.info("AWS rebalance recommendation since %s: a spot interruption is more likely "
                     "(not acted on; an instance-action notice drains this worker)", when)
        self._rebalance_seen = when


class GcpProbe:
    source = SOURCES["gcp"]
    headers: ClassVar[dict[str, str]] = {"Metadata-Flavor": "Google"}

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/") + "/computeMetadata/v1/instance"

    async def look(self, client: httpx.AsyncClient) -> CloudNotice | None:
        reply = expect(await fetch(client, "GET", f"{self.base_url}/preempted", self.headers), 200)
        notice = parsed(notices.parse_gcp_preempted, reply.content)
        if notice is not None:
            return notice
        reply = expect(await fetch(client, "GET", f"{self.base_url}/maintenance-event", self.headers), 200)
        return parsed(notices.parse_gcp_maintenance_event, reply.content)


class AzureProbe:
    source = SOURCES["azure"]
    headers: ClassVar[dict[str, str]] = {"Metadata": "true"}

    def __init__(self, base_url: str, vm_name: str = "") -> None:
        self.base_url = base_url.rstrip("/") + "/metadata"
        self.vm_name = vm_name            # empty: asked of the instance metadata on the first look

    async def look(self, client: httpx.AsyncClient) -> CloudNotice | None:
        if not self.vm_name:
            reply = expect(await fetch(client, "GET", f"{self.base_url}/instance/compute/name"
                                       "?api-version=2021-02-01&format=text", self.headers), 200)
            if not reply.text.strip():
                raise PollError("malformed", "instance/compute/name is empty")
            self.vm_name = reply.text.strip()
            log.info("Azure VM name %s: scheduled events naming it drain this worker", self.vm_name)
        # The first call enables Scheduled Events for the VM and may take up to 2 minutes: it times
        # out, is counted, and a later poll finds the service on.
        reply = expect(await fetch(client, "GET", f"{self.base_url}/scheduledevents?api-version=2020-07-01",
                                   self.headers), 200)
        return parsed(notices.parse_azure_scheduled_events, reply.content, self.vm_name)


def make_probe(cloud: str, base_url: str = "", vm_name: str = "") -> MetadataProbe:
    """The probe of `cloud` (aws, gcp or azure) at `base_url` (default: the cloud's metadata address)."""
    url = base_url or DEFAULT_URLS[cloud]
    if cloud == "aws":
        return AwsProbe(url)
    if cloud == "gcp":
        return GcpProbe(url)
    if cloud == "azure":
        return AzureProbe(url, vm_name)
    raise ValueError(f"preemption source {cloud!r}: use one of none, {', '.join(DEFAULT_URLS)}")
