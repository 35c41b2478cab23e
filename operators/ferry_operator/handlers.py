"""The kopf handlers: observe the API server and the scheduler, call the pure core, carry out its plan.

    InferenceCluster  resume/create/update + a resync loop ─▶ reconcile_cluster():
        read the cluster fresh ─▶ parse_spec ─▶ render ─▶ observe objects/pods ─▶ ListInstances
        ─▶ reconcile() ─▶ apply/prune ─▶ cancel drains ─▶ status (drain records) ─▶ start drains
        ─▶ delete drained pods ─▶ scale ─▶ preemption notices for pods on tainted nodes
    Node              on.event ─▶ termination_signal() ─▶ NotifyPreemption for its Ferry workers

Failures raise kopf.TemporaryError(delay=…) (kopf retries; never a sleep here). The periodic,
level-triggered pass is one loop over every InferenceCluster rather than a kopf timer: kopf puts a
finalizer on objects with timers, and a finalizer outliving its operator (`helm uninstall` removes
both at once) makes deleting the cluster hang. Without one, deletion never waits for the operator;
owner references let the API server's garbage collector remove what the cluster owned. Node events are not
retried by kopf, so a notice that fails there is sent by the cluster's next reconcile instead: both
paths share one record of what was sent, so each (node, pod) gets one notice.

Run: `kopf run --standalone -m operators.ferry_operator.handlers [-n NS | -A]`, or
`python -m operators.ferry_operator` (which reads the same FERRY_OPERATOR_* settings).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

import kopf
from kubernetes import client, config
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from urllib3.exceptions import HTTPError

from operators.ferry_operator.kube import Kube, pod_state
from operators.ferry_operator.manifests import RenderOptions, render
from operators.ferry_operator.names import CLUSTER_LABEL, GROUP, PLURAL, POOLS, VERSION, ClusterRef
from operators.ferry_operator.nodes import (
    TERMINATION_TAINTS,
    Notice,
    Signal,
    pending_notices,
    termination_signal,
)
from operators.ferry_operator.reconcile import Observed, Plan, reconcile
from operators.ferry_operator.scheduler_client import SchedulerClient, SchedulerUnavailable
from operators.ferry_operator.settings import OperatorSettings, load_settings
from operators.ferry_operator.spec import parse_spec
from operators.ferry_operator.status import invalid_spec_status, status_patch

log = logging.getLogger("ferry.operator")


@dataclass
class Runtime:
    """The operator's in-memory edge state (everything durable lives in the API server)."""
    settings: OperatorSettings = field(default_factory=OperatorSettings)   # read again at startup
    kube: Kube | None = None
    schedulers: dict[str, SchedulerClient] = field(default_factory=dict)    # address → client
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)            # cluster uid → one reconcile at a time
    next_due: dict[str, float] = field(default_factory=dict)                # cluster uid → unix s
    node_signals: dict[str, Signal] = field(default_factory=dict)           # node → its termination signal
    sent: set[tuple[str, str]] = field(default_factory=set)                 # (node, pod) notified
    resync: asyncio.Task | None = None                                      # the periodic pass

    def reset(self, settings: OperatorSettings, kube: Kube) -> None:
        """A fresh start (locks and channels belong to one event loop: kopf.testing runs several)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if callable(f.default_factory) else f.default)
        self.resync = None
        self.settings, self.kube = settings, kube

    def scheduler(self, ref: ClusterRef) -> SchedulerClient:
        address = self.settings.scheduler_address_of(ref.name, ref.namespace)
        if address not in self.schedulers:
            self.schedulers[address] = SchedulerClient(address, self.settings.grpc_timeout_seconds)
        return self.schedulers[address]


RUNTIME = Runtime()


def _api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        # KUBECONFIG as it is now (the client's own default was read when it was imported)
        return config.new_client_from_config(os.environ.get("KUBECONFIG") or None)


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else KUBECONFIG as it is when the operator starts."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING          # events for warnings and errors only
    settings.watching.server_timeout = 300             # re-open watches now and then (no silent stalls)
    settings.watching.client_timeout = 330
    RUNTIME.reset(load_settings(), await asyncio.to_thread(lambda: Kube(_api_client())))
    RUNTIME.resync = asyncio.create_task(_resync_forever(logger), name="ferry-resync")
    logger.info("ferry operator: PodDisruptionBudgets as %s; %s", RUNTIME.kube.pdb_api_version, RUNTIME.settings)


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    if RUNTIME.resync is not None:
        RUNTIME.resync.cancel()
        await asyncio.gather(RUNTIME.resync, return_exceptions=True)
    for scheduler in RUNTIME.schedulers.values():
        await scheduler.close()
    RUNTIME.schedulers.clear()


def _kube() -> Kube:
    if RUNTIME.kube is None:
        raise kopf.TemporaryError("the operator has not finished starting", delay=1)
    return RUNTIME.kube


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def ensure_cluster(body: kopf.Body, logger: logging.Logger, **_) -> None:
    await reconcile_cluster(ClusterRef.of(body), logger, force=True)


async def _resync_forever(logger: logging.Logger) -> None:
    """Every tick, each cluster whose reconcile is due (resync_seconds when settled, sooner while it
    converges): the level-triggered half, which catches what no event announces (pods becoming
    ready, drains finishing, the scheduler coming back)."""
    while True:
        await asyncio.sleep(RUNTIME.settings.tick_seconds)
        try:
            refs = await asyncio.to_thread(_kube().list_clusters, RUNTIME.settings.namespace or None)
        except (client.ApiException, HTTPError, OSError, kopf.TemporaryError) as e:
            logger.warning("resync: cannot list InferenceClusters: %s", e)
            continue
        for ref in refs:
            try:
                await reconcile_cluster(ref, logger, force=False)
            except kopf.TemporaryError as e:
                logger.warning("resync of %s/%s: %s", ref.namespace, ref.name, e)
            except Exception:   # one broken cluster must not stop the others' resync
                logger.exception("resync of %s/%s failed", ref.namespace, ref.name)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
async def forget_cluster(body: kopf.Body, **_) -> None:
    uid = ClusterRef.of(body).uid
    RUNTIME.locks.pop(uid, None)
    RUNTIME.next_due.pop(uid, None)


async def reconcile_cluster(ref: ClusterRef, logger: logging.Logger, force: bool) -> None:
    """One reconcile of one cluster, unless a timer tick finds it not due yet."""
    lock = RUNTIME.locks.setdefault(ref.uid, asyncio.Lock())
    async with lock:
        now = time.time()
        if not force and now < RUNTIME.next_due.get(ref.uid, 0.0):
            return
        try:
            plan = await _reconcile_once(ref, logger, now)
        except (client.ApiException, ResourceNotFoundError, SchedulerUnavailable, HTTPError, OSError) as e:
            RUNTIME.next_due.pop(ref.uid, None)
            raise kopf.TemporaryError(f"reconcile failed: {e}", delay=RUNTIME.settings.drain_poll_seconds) from e
        wait = RUNTIME.settings.resync_seconds if plan is None or plan.requeue_after is None else plan.requeue_after
        RUNTIME.next_due[ref.uid] = now + wait


async def _reconcile_once(ref: ClusterRef, logger: logging.Logger, now: float) -> Plan | None:
    kube = _kube()
    body = await asyncio.to_thread(kube.get_cluster, ref)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    generation, status = int(body["metadata"].get("generation") or 1), body.get("status") or {}
    try:
        spec = parse_spec(body.get("spec"))
    except ValueError as e:
        new = invalid_spec_status(str(e), status, generation, now)
        patch = status_patch(status, new)
        if patch:
            logger.warning("invalid spec: %s", e)
            await asyncio.to_thread(kube.patch_status, ref, patch)
        return None
    settings = RUNTIME.settings
    options = RenderOptions(settings.control_plane_image, settings.worker_image, settings.bind_pod_ip,
                            kube.pdb_api_version)
    objects = await asyncio.to_thread(kube.observe, ref)
    scheduler = RUNTIME.scheduler(ref)
    recommendations: dict[str, int] = {}
    try:
        instances = await scheduler.list_instances()
        if spec.scheduler.autoscaling.enabled:
            recommendations = await scheduler.recommendations()
    except SchedulerUnavailable as e:
        log.debug("%s/%s: %s", ref.namespace, ref.name, e)
        instances = None
    plan = reconcile(Observed(
        spec=spec, generation=generation, desired=render(ref, spec, options), existing=objects.existing,
        deployments=objects.deployments, pods=objects.pods, instances=instances, status=status, now=now,
        poll_seconds=settings.drain_poll_seconds, recommendations=recommendations))
    await execute(ref, plan, status, scheduler, logger)
    if instances is not None:
        await _send_notices(pending_notices([p for pool in POOLS for p in objects.pods.get(pool, ())],
                                            RUNTIME.node_signals, RUNTIME.sent), scheduler)
    return plan


async def execute(ref: ClusterRef, plan: Plan, status: dict, scheduler: SchedulerClient,
                  logger: logging.Logger) -> None:
    """Carry out a plan in the order that keeps every step safe to interrupt (see pool_plan.py)."""
    kube = _kube()
    for obj in plan.apply:
        await asyncio.to_thread(kube.apply, obj)
        logger.info("applied %s %s", obj["kind"], obj["metadata"]["name"])
    for key in plan.prune:
        await asyncio.to_thread(kube.delete, ref.namespace, key)
        logger.info("deleted %s %s (no longer in the spec)", *key)
    for pod in plan.cancel_drains:          # before the records go: a failed cancel is retried
        await scheduler.drain(pod, cancel=True)
        logger.info("cancelled the drain of %s: its pool grew again", pod)
    patch = status_patch(status, plan.status)
    if patch:                                # records first, so a restarted operator resumes the drains
        await asyncio.to_thread(kube.patch_status, ref, patch)
    for pod in plan.start_drains:           # a failed one stays recorded: the next reconcile sends it again
        try:
            num = await scheduler.drain(pod)
        except SchedulerUnavailable as e:
            logger.warning("cannot start draining %s yet: %s", pod, e)
            continue
        logger.info("draining %s (%s requests to move)", pod, "no" if num is None else num)
    for pod in plan.delete_pods:
        await asyncio.to_thread(kube.delete_pod, ref.namespace, pod)
        level = logging.WARNING if pod in plan.timed_out else logging.INFO
        logger.log(level, "deleted %s%s", pod, " at the drain timeout" if pod in plan.timed_out else " (drained)")
    for pool, replicas in plan.scale.items():
        await asyncio.to_thread(kube.scale, ref, pool, replicas)
        logger.info("scaled %s to %d", pool, replicas)


async def _send_notices(notices: tuple[Notice, ...], scheduler: SchedulerClient) -> None:
    for notice in notices:
        try:
            await scheduler.notify_preemption(notice.pod, notice.signal.deadline_unix_s, notice.signal.source)
        except SchedulerUnavailable as e:
            log.warning("preemption notice for %s (node %s) not delivered yet: %s", notice.pod, notice.node, e)
            continue
        RUNTIME.sent.add((notice.node, notice.pod))
        log.warning("node %s is going away (%s): preemption notice sent for %s", notice.node,
                    notice.signal.source, notice.pod)


def _forget_node(node: str) -> None:
    RUNTIME.node_signals.pop(node, None)
    RUNTIME.sent.difference_update({s for s in RUNTIME.sent if s[0] == node})


def _is_node_of_interest(body: kopf.Body, **_) -> bool:
    """Nodes with a termination taint, or that had one: the rest are not even logged as handled."""
    taints = (body.get("spec") or {}).get("taints") or []
    return body["metadata"]["name"] in RUNTIME.node_signals or any(
        t.get("key") in TERMINATION_TAINTS for t in taints)


async def watch_node(body: kopf.Body, type: str | None, **_) -> None:
    node = body["metadata"]["name"]
    signal = None if type == "DELETED" else termination_signal(body, time.time())
    if signal is None:
        _forget_node(node)
        return
    known = RUNTIME.node_signals.get(node)
    if known is None or known.source != signal.source:     # keep the deadline of the first sighting
        RUNTIME.node_signals[node] = signal
    if RUNTIME.kube is None:
        return
    try:
        pods = await asyncio.to_thread(RUNTIME.kube.worker_pods_on_node, node,
                                     RUNTIME.settings.namespace or None)
    except client.ApiException as e:
        log.warning("node %s: cannot list its pods (%s); the clusters' next reconcile sends the notices", node, e)
        return
    for pod in pods:
        meta = pod["metadata"]
        ref = ClusterRef(name=meta["labels"][CLUSTER_LABEL], namespace=meta["namespace"])
        notices = pending_notices([pod_state(pod)], RUNTIME.node_signals, RUNTIME.sent)
        await _send_notices(notices, RUNTIME.scheduler(ref))


# Registered only with watch_nodes (FERRY_OPERATOR_WATCH_NODES, read when this module is imported:
# __main__ puts every setting in the env first): without it kopf never lists Nodes, and the chart
# leaves out the cluster-wide Node permission.
if load_settings().watch_nodes:
    kopf.on.event("", "v1", "nodes", when=_is_node_of_interest)(watch_node)
