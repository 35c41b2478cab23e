"""A small test kubelet: fake GPU Nodes whose pods run as local processes (see pod_spec.py).

    kube-scheduler binds a pod to ferry-gpu-N ──▶ TestKubelet (one thread, a 0.3 s level-triggered loop)
        start:   pod IP 127.1.x.y, env (downward API, ConfigMaps, Secrets, $(VAR)), service-account
                 token (TokenRequest), `unshare --mount` + the container's command in its local image
        status:  Running/Ready from readiness probes, restarts (Always) with back-off, exit codes
        delete:  SIGTERM, the grace period, SIGKILL, then the final delete (grace 0)
        hosts:   one /etc/hosts for every pod: each Service's names → a ready pod's IP, and
                 kubernetes.default.svc → an address whose :443 forwards to the API server

Like kwok, but the processes are real: requests flow through the pods end to end.
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.kube import pod_spec
from tests.kube.probes import ProbeState, run_probe
from tests.kube.proxy import TcpForwarder

log = logging.getLogger("ferry.test_kubelet")
GPU_NODE_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "8"}
BACKOFF_S = (1, 2, 4, 8, 10)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerRun:
    spec: dict
    env: dict[str, str]
    argv: list[str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    started_at: str = ""
    restarts: int = 0
    restart_at: float = 0.0
    last_exit: int | None = None
    readiness: ProbeState | None = None
    error: str = ""


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    pod_ip: str
    node: str
    containers: list[ContainerRun] = field(default_factory=list)
    terminating: bool = False
    last_status: dict | None = None
    waiting_reason: str = ""
    waiting_message: str = ""
    start_time: str = field(default_factory=_now)


class TestKubelet:
    """`start()` registers the nodes and runs the loop in a thread; `stop()` kills every pod process."""

    def __init__(self, api: client.ApiClient, apiserver_port: int, ca_file: Path, workdir: Path,
                 service_ip: str, node_names: tuple[str, ...] = ("ferry-gpu-0", "ferry-gpu-1")):
        self.core = client.CoreV1Api(api)
        self.apiserver_port, self.ca_file, self.service_ip = apiserver_port, ca_file, service_ip
        self.forwarder: TcpForwarder | None = None
        self.workdir, self.node_names = workdir, node_names
        self.hosts_file = workdir / "hosts"
        self.pods: dict[str, PodRun] = {}
        self.num_ips = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="test-kubelet", daemon=True)
        self._lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> TestKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_hosts({})
        self.forwarder = TcpForwarder((self.service_ip, 443), ("127.0.0.1", self.apiserver_port))
        for name in self.node_names:
            self._register_node(name)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for run in list(self.pods.values()):
            self._kill(run, grace=3)
        if self.forwarder is not None:
            self.forwarder.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        for run in self.pods.values():
            if (run.namespace, run.name) == (namespace, pod):
                return "".join(c.log_path.read_text(errors="replace") for c in run.containers
                               if container in (None, c.spec["name"]) and c.log_path.exists())
        return ""

    def _register_node(self, name: str) -> None:
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "node.kubernetes.io/instance-type": "ferry-test-gpu", "nvidia.com/gpu.present": "true"}
        try:
            self.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        except ApiException as e:
            if e.status != 409:
                raise
        now = _now()
        conditions = [{"type": t, "status": s, "reason": r, "lastHeartbeatTime": now, "lastTransitionTime": now}
                      for t, s, r in (("Ready", "True", "KubeletReady"), ("MemoryPressure", "False", "Ok"),
                                      ("DiskPressure", "False", "Ok"), ("PIDPressure", "False", "Ok"))]
        self.core.patch_node_status(name, {"status": {
            "capacity": GPU_NODE_CAPACITY, "allocatable": GPU_NODE_CAPACITY, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "nodeInfo": {"kubeletVersion": "v1.20.2-ferry-test", "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local-process://1",
                         "osImage": "Debian", "kernelVersion": os.uname().release, "machineID": name,
                         "systemUUID": name, "bootID": name}}})
        # the NodeRestriction-era admission taints a new node not-ready; a kubelet's node controller
        # lifts it once the node reports Ready (here: at once)
        self.core.patch_node(name, {"spec": {"taints": None}})

    # --- the loop ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:   # the loop must survive API hiccups; it is level-triggered
                log.exception("test kubelet sync failed")
            self._stop.wait(0.3)

    def _sync(self) -> None:
        pods = [p for p in self.core.list_pod_for_all_namespaces().items if p.spec.node_name in self.node_names]
        seen = set()
        for pod in pods:
            uid = pod.metadata.uid
            seen.add(uid)
            run = self.pods.get(uid)
            if pod.metadata.deletion_timestamp is not None:
                if run is None:
                    self._final_delete(pod.metadata.namespace, pod.metadata.name, uid)
                elif not run.terminating:
                    run.terminating = True
                    grace = pod.metadata.deletion_grace_period_seconds
                    threading.Thread(target=self._terminate, args=(run, 30 if grace is None else grace),
                                     daemon=True).start()
                continue
            if pod.status.phase in ("Succeeded", "Failed"):
                continue
            if run is None:
                run = self.pods[uid] = self._admit(self.core.api_client.sanitize_for_serialization(pod))
            if not run.terminating:
                self._tend(run)
        with self._lock:
            gone = [self.pods.pop(uid) for uid in set(self.pods) - seen]   # force-deleted pods
        for run in gone:
            self._kill(run, grace=0)
        self._write_hosts(self._service_ips())

    # --- starting a pod ----------------------------------------------------------------------------------
    def _admit(self, pod: dict) -> PodRun:
        meta = pod["metadata"]
        self.num_ips += 1
        ip = f"127.1.{self.num_ips // 250}.{self.num_ips % 250 + 2}"
        run = PodRun(uid=meta["uid"], namespace=meta["namespace"], name=meta["name"], pod_ip=ip,
                     node=pod["spec"]["nodeName"])
        facts = pod_spec.PodFacts(name=run.name, namespace=run.namespace, uid=run.uid, pod_ip=ip, node_name=run.node,
                                  service_account=pod["spec"].get("serviceAccountName") or "default",
                                  labels=meta.get("labels") or {}, annotations=meta.get("annotations") or {})
        pod_dir = self.workdir / "pods" / f"{run.namespace}_{run.name}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        try:
            if pod["spec"].get("initContainers"):
                raise ValueError("init containers are not supported by the test kubelet")
            sa_dir = self._service_account(pod, facts, pod_dir)
            for c in pod["spec"]["containers"]:
                run.containers.append(self._container(pod, c, facts, pod_dir, sa_dir))
        except (LookupError, ValueError, ApiException) as e:
            run.waiting_reason, run.waiting_message = "CreateContainerConfigError", str(e)
            log.warning("pod %s/%s: %s", run.namespace, run.name, e)
        return run

    def _container(self, pod: dict, c: dict, facts, pod_dir: Path, sa_dir: Path | None) -> ContainerRun:
        image = pod_spec.local_image(c["image"])
        if image is None:
            raise ValueError(f"image {c['image']!r} has no local stand-in (tests/kube/pod_spec.py: local_image)")
        base = {**image.env, "KUBERNETES_SERVICE_HOST": self.service_ip, "KUBERNETES_SERVICE_PORT": "443",
                "HOSTNAME": facts.name}
        env = pod_spec.container_env(c, facts, lambda kind, name, key: self._lookup(facts.namespace, kind, name, key),
                                     base)
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            folder = pod_dir / "volumes" / m["name"]
            folder.mkdir(parents=True, exist_ok=True)
            files = pod_spec.volume_files(volumes.get(m["name"], {"name": m["name"]}),
                                          lambda kind, name, key: self._lookup(facts.namespace, kind, name, key))
            for path, (content, mode) in (files or {}).items():
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_text(content)
                (folder / path).chmod(mode)
        script = pod_spec.mount_script(pod, c, self.hosts_file, sa_dir, pod_dir / "volumes")
        argv = pod_spec.wrap(script, Path(c.get("workingDir") or image.cwd), pod_spec.command_line(c, image, env))
        readiness = c.get("readinessProbe")
        return ContainerRun(spec=c, env=env, argv=argv, cwd=image.cwd, log_path=pod_dir / f"{c['name']}.log",
                            readiness=ProbeState(readiness, 0.0, ready=readiness is None))

    def _service_account(self, pod: dict, facts, pod_dir: Path) -> Path | None:
        if pod["spec"].get("automountServiceAccountToken") is False:
            return None
        body = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=["https://kubernetes.default.svc"], expiration_seconds=7200))
        token = self.core.create_namespaced_service_account_token(facts.service_account, facts.namespace, body)
        sa_dir = pod_dir / "serviceaccount"
        sa_dir.mkdir(exist_ok=True)
        (sa_dir / "token").write_text(token.status.token)
        (sa_dir / "namespace").write_text(facts.namespace)
        shutil.copy(self.ca_file, sa_dir / "ca.crt")
        return sa_dir

    def _lookup(self, namespace: str, kind: str, name: str, key: str | None):
        try:
            obj = (self.core.read_namespaced_config_map if kind == "configMap"
                   else self.core.read_namespaced_secret)(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        data = dict(obj.data or {})
        if kind == "secret":
            import base64
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
        return data if key is None else data.get(key)

    # --- keeping it running --------------------------------------------------------------------------------
    def _tend(self, run: PodRun) -> None:
        now = time.monotonic()
        for c in run.containers:
            if c.proc is not None and c.proc.poll() is not None:
                c.last_exit, c.proc = c.proc.returncode, None
                c.restart_at = now + BACKOFF_S[min(c.restarts, len(BACKOFF_S) - 1)]
                c.readiness = ProbeState(c.readiness.probe, 0.0, ready=c.readiness.probe is None)
                log.warning("pod %s/%s container %s exited %s", run.namespace, run.name, c.spec["name"], c.last_exit)
            if c.proc is None and now >= c.restart_at:
                if c.last_exit is not None:
                    c.restarts += 1
                self._spawn(c)
                c.readiness.started_at = now
            if c.proc is not None and c.readiness.due(now):
                c.readiness.record(run_probe(c.readiness.probe, c.spec, run.pod_ip, c.env), now)
        self._report(run)

    def _spawn(self, c: ContainerRun) -> None:
        out = open(c.log_path, "ab")  # noqa: SIM115 (the child owns it)
        c.proc = subprocess.Popen(c.argv, env=c.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        c.started_at = _now()

    def _report(self, run: PodRun) -> None:
        statuses, all_ready = [], bool(run.containers)
        for c in run.containers:
            running = c.proc is not None
            ready = running and c.readiness.ready
            all_ready &= ready
            state = ({"running": {"startedAt": c.started_at}} if running else
                     {"waiting": {"reason": "CrashLoopBackOff", "message": f"exited {c.last_exit}"}})
            statuses.append({"name": c.spec["name"], "image": c.spec["image"], "imageID": "", "ready": ready,
                             "started": running, "restartCount": c.restarts, "state": state,
                             **({"lastState": {"terminated": {"exitCode": c.last_exit}}}
                                if c.last_exit is not None else {})})
        if run.waiting_reason:
            statuses = [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                         "state": {"waiting": {"reason": run.waiting_reason, "message": run.waiting_message}}}
                        for c in self._containers_of(run)]
        phase = "Running" if any(c.proc is not None for c in run.containers) else "Pending"
        status = {"phase": phase, "podIP": run.pod_ip, "podIPs": [{"ip": run.pod_ip}], "hostIP": "127.0.0.1",
                  "startTime": run.start_time, "containerStatuses": statuses,
                  "conditions": self._conditions(run, all_ready)}
        key = repr({k: v for k, v in status.items() if k != "conditions"}) + str(all_ready)
        if run.last_status == key:
            return
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
            run.last_status = key
        except ApiException as e:
            if e.status != 404:
                raise

    def _containers_of(self, run: PodRun) -> list[dict]:
        return self.core.api_client.sanitize_for_serialization(
            self.core.read_namespaced_pod(run.name, run.namespace).spec.containers)

    @staticmethod
    def _conditions(run: PodRun, ready: bool) -> list[dict]:
        now, flag = _now(), "True" if ready else "False"
        return [{"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
                {"type": "Ready", "status": flag, "lastTransitionTime": now}]

    # --- stopping a pod -----------------------------------------------------------------------------------
    def _terminate(self, run: PodRun, grace: float) -> None:
        self._kill(run, grace)
        self._final_delete(run.namespace, run.name, run.uid)
        with self._lock:
            self.pods.pop(run.uid, None)

    @staticmethod
    def _kill(run: PodRun, grace: float) -> None:
        procs = [c.proc for c in run.containers if c.proc is not None and c.proc.poll() is None]
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def _final_delete(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0,
                                            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid)))
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- Services: a hosts file instead of DNS + kube-proxy ------------------------------------------------
    def _service_ips(self) -> dict[str, str]:
        names: dict[str, str] = {}
        ready = {}
        for run in self.pods.values():
            if run.terminating or not run.containers:
                continue
            ready[(run.namespace, run.name)] = (run.pod_ip, all(c.proc is not None and c.readiness.ready
                                                               for c in run.containers))
        pods = {(p.metadata.namespace, p.metadata.name): p.metadata.labels or {}
                for p in self.core.list_pod_for_all_namespaces().items}
        for svc in self.core.list_service_for_all_namespaces().items:
            selector = svc.spec.selector or {}
            if not selector:
                continue
            ns, name = svc.metadata.namespace, svc.metadata.name
            matches = sorted((not ok, key[1], ip) for key, (ip, ok) in ready.items()
                             if key[0] == ns and selector.items() <= pods.get(key, {}).items())
            if matches:
                for alias in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                    names[alias] = matches[0][2]
        return names

    def _write_hosts(self, names: dict[str, str]) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.service_ip} kubernetes kubernetes.default kubernetes.default.svc kubernetes.default.svc.cluster.local"]
        lines += [f"{ip} {alias}" for alias, ip in sorted(names.items())]
        text = "\n".join(lines) + "\n"
        if self.hosts_file.exists() and self.hosts_file.read_text() == text:
            return
        with open(self.hosts_file, "r+" if self.hosts_file.exists() else "w") as f:   # same inode: bind mounts see it
            f.write(text)
            f.truncate()
