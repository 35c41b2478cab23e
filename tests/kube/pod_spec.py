"""What the test kubelet makes of a pod spec: env, command line, image, mounts (pure functions).

A container runs as a local process; its "image" is mapped to a local install:

    ghcr.io/ferry-serving/ferry:0.1.0        ──▶ this checkout, its .venv on PATH (ENTRYPOINT ferry)
    ghcr.io/ferry-serving/ferry-worker:0.1.0 ──▶ the same
    redis:7.2-alpine                          ──▶ Debian's redis-server

The process starts inside its own mount namespace (`unshare --mount`), where the test kubelet does
what a kubelet does for a container's files: /etc/hosts resolves the cluster's Services (DNS stand-in),
the service-account token, CA and namespace appear at /var/run/secrets/kubernetes.io/serviceaccount
(a tmpfs over /run), emptyDir volumes are fresh directories, secret and configMap volumes are their
files (items, modes; read-only when mounted so), hostPath volumes are bind mounts. What it
does not emulate: a network namespace (pods share loopback; each gets its own 127.1.x.y pod IP, so
services must listen on $(POD_IP)), users (runAsUser is not applied), a read-only root filesystem,
resource limits, liveness restarts and init containers.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True, slots=True)
class LocalImage:
    cwd: Path
    env: dict[str, str]
    entrypoint: tuple[str, ...]


def local_image(image: str) -> LocalImage | None:
    """The local install that stands in for `image`, or None when there is none."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]   # registry/repo/NAME:tag@digest
    if name.startswith("ferry"):
        return LocalImage(cwd=ROOT, env={"PATH": f"{ROOT / '.venv' / 'bin'}:{HOST_PATH}", "PYTHONUNBUFFERED": "1",
                                         "HF_HUB_OFFLINE": "1", "HOME": "/tmp"}, entrypoint=("ferry",))
    if name == "redis":
        return LocalImage(cwd=Path("/"), env={"PATH": HOST_PATH, "HOME": "/tmp"}, entrypoint=("redis-server",))
    return None


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones stay, $$ escapes."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(sub, text)


@dataclass(frozen=True, slots=True)
class PodFacts:
    """What downward-API fields and lookups resolve to for one pod."""
    name: str
    namespace: str
    uid: str
    pod_ip: str
    node_name: str
    service_account: str
    labels: dict[str, str]
    annotations: dict[str, str]


def field_ref(path: str, facts: PodFacts) -> str:
    simple = {"metadata.name": facts.name, "metadata.namespace": facts.namespace, "metadata.uid": facts.uid,
              "status.podIP": facts.pod_ip, "status.hostIP": "127.0.0.1", "spec.nodeName": facts.node_name,
              "spec.serviceAccountName": facts.service_account}
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (facts.labels if m.group(1) == "labels" else facts.annotations).get(m.group(2), "")
    raise ValueError(f"fieldRef {path!r} is not supported by the test kubelet")


def container_env(container: dict, facts: PodFacts, lookup, base: dict[str, str]) -> dict[str, str]:
    """The container's environment. `lookup(kind, name, key)` reads a ConfigMap/Secret value (None if
    missing); `kind` is 'configMap' or 'secret', key None means the whole object's data as a dict."""
    env = dict(base)
    for src in container.get("envFrom") or []:
        for kind in ("configMap", "secret"):
            ref = src.get(f"{kind}Ref")
            if ref:
                data = lookup(kind, ref["name"], None)
                if data is None and not ref.get("optional"):
                    raise LookupError(f"{kind} {ref['name']!r} not found")
                env.update({src.get("prefix", "") + k: v for k, v in (data or {}).items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = expand(item.get("value") or "", env)
            continue
        vf = item.get("valueFrom") or {}
        if "fieldRef" in vf:
            env[item["name"]] = field_ref(vf["fieldRef"]["fieldPath"], facts)
        elif "resourceFieldRef" in vf:
            env[item["name"]] = "0"
        else:
            kind = "configMap" if "configMapKeyRef" in vf else "secret"
            ref = vf[f"{kind}KeyRef"]
            value = lookup(kind, ref["name"], ref["key"])
            if value is None and not ref.get("optional"):
                raise LookupError(f"{kind} {ref['name']!r} key {ref['key']!r} not found")
            if value is not None:
                env[item["name"]] = value
    return env


def command_line(container: dict, image: LocalImage, env: dict[str, str]) -> list[str]:
    command = container.get("command") or list(image.entrypoint)
    args = container.get("args") or []   # args replace the image's CMD; our images have none
    return [expand(c, env) for c in [*command, *args]]


def volume_files(volume: dict, lookup) -> dict[str, tuple[str, int]] | None:
    """A secret or configMap volume's files, path -> (content, mode), as a kubelet projects them (`items`,
    `defaultMode`, `optional`); None for a volume of another kind. `lookup` as in `container_env`."""
    for kind, name_field in (("secret", "secretName"), ("configMap", "name")):
        source = volume.get(kind)
        if source is None:
            continue
        name, optional = source[name_field], bool(source.get("optional"))
        data = lookup(kind, name, None)
        if data is None:
            if optional:
                return {}
            raise LookupError(f"{kind} {name!r} of volume {volume['name']!r} not found")
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        files = {}
        for item in items:
            if item["key"] in data:
                files[item["path"]] = (data[item["key"]], item.get("mode", source.get("defaultMode", 0o644)))
            elif not optional:
                raise LookupError(f"{kind} {name!r} has no key {item['key']!r} (volume {volume['name']!r})")
        return files
    return None


def mount_script(pod: dict, container: dict, hosts_file: Path, sa_dir: Path | None, scratch: Path) -> str:
    """The shell lines run inside the new mount namespace before `exec`ing the container's command.
    A mount path missing on this machine (/etc/ferry/…) is made under an overlay of its top directory,
    private to the namespace, so nothing is written to the machine's own /etc."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    lines, binds = ["set -e"], []
    for m in container.get("volumeMounts") or []:
        vol, target = volumes.get(m["name"], {}), m["mountPath"]
        if "hostPath" in vol:
            source = vol["hostPath"]["path"]
        elif any(kind in vol for kind in ("emptyDir", "secret", "configMap")):
            source = str(scratch / m["name"])
        else:
            continue   # projected/downwardAPI/… volumes: not emulated
        if Path(target) == Path(source) or ROOT.is_relative_to(target):
            continue   # already there, or it would hide the checkout the process runs from
        binds.append((source, target, bool(m.get("readOnly"))))
    def top(target: str) -> str:
        """The top directory to overlay so `target` can be made in it ("" when there is none)."""
        parts = Path(target).parts
        folder = Path("/", parts[1]) if len(parts) > 2 else None
        return str(folder) if folder and folder.is_dir() and not folder.is_symlink() else ""

    overlaid = sorted({top(t) for _, t, _ in binds if not Path(t).exists() and top(t)})
    for folder in overlaid:
        upper, work = (shlex.quote(str(scratch / ".overlay" / folder.strip("/") / d)) for d in ("upper", "work"))
        lines += [f"mkdir -p {upper} {work}",
                  f"mount -t overlay overlay -o lowerdir={folder},upperdir={upper},workdir={work} {folder}"]
    lines.append(f"mount --bind {shlex.quote(str(hosts_file))} /etc/hosts")
    if sa_dir is not None:
        lines += ["mount -t tmpfs -o size=4m tmpfs /run", f"mkdir -p {SA_DIR}",
                  f"cp {shlex.quote(str(sa_dir))}/* {SA_DIR}/"]
    # a mount over a folder that holds other mounts' sources (an emptyDir on /tmp) comes after them
    sources = [Path(source) for source, _, _ in binds]
    binds.sort(key=lambda b: any(source.is_relative_to(b[1]) for source in sources))
    for source, target, read_only in binds:
        t = shlex.quote(target)
        if not Path(target).is_dir() and top(target) not in overlaid:
            lines.append(f"echo 'test kubelet: mount point {target} does not exist here; not mounted' >&2")
            continue
        lines += [f"mkdir -p {t}", f"mount --bind {shlex.quote(source)} {t}"]
        if read_only:
            lines.append(f"mount -o remount,bind,ro {t}")
    return "\n".join(lines)


def wrap(script: str, cwd: Path, argv: list[str]) -> list[str]:
    """`unshare` + the mount script + `exec argv` in `cwd`."""
    body = f"{script}\ncd {shlex.quote(str(cwd))}\nexec \"$@\""
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", body, "pod", *argv]
