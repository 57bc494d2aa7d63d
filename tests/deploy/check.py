#!/usr/bin/env python3
"""Checks the Kubernetes deployment in deploy/: the Helm chart and the plain manifests.

Run it with `cargo test --test deploy` (tests/deploy.rs), which hands it the code's metrics in
S3NFS_METRICS_EXPOSITION; python3 tests/deploy/check.py alone, from anywhere, checks the rest
and fails on that variable's absence (with a file the test wrote, e.g.
S3NFS_METRICS_EXPOSITION=target/tmp/deploy-metrics.txt, it checks everything).
Needs helm-python-sdk (Helm's Go SDK as a shared library: renders and lints charts offline, no
helm binary), kubernetes-validate (the Kubernetes OpenAPI schemas), promql-parser, and node with
the npm package of tests/deploy/package.json; .ci/run installs them.

What it checks:
  1. every value of values.yaml is set, to something else, in tests/deploy/all-values.yaml, and
     changing any single value changes the render (no value is dead);
  2. `helm lint --strict` passes with the default values and with all-values.yaml;
  3. every rendered object, and every object in deploy/manifests/, validates against the
     Kubernetes schemas in strict mode (unknown fields fail), for the chart's minimum version
     (kubeVersion in Chart.yaml) and the newest kubernetes-validate ships, and has no null field;
  4. the properties the driver depends on (host network, Bidirectional propagation, privileged
     node plugin, the CSIDriver's fields, the StorageClass's secret parameters, RBAC, ...);
  5. deploy/manifests/ equals a fresh render of the chart's defaults;
  6. with all-values.yaml, the custom kubelet directory is behind every host path and the old
     one appears nowhere;
  7. ReadWriteMany: the node plugin's Lease Role (get/create/update, nothing more), its token,
     env and key pair mount when readWriteMany.enabled; the generated key pair (a matching
     ECDSA P-256 pair, a new one per install) or the named Secret; nothing of it when disabled;
  8. metrics: the ports, --metrics-listen and headless Services; the ServiceMonitor and
     PrometheusRule validate against prometheus-operator's schemas (node and the npm package in
     tests/deploy/package.json); every PromQL expression of the alerts and of the Grafana
     dashboard parses (promql-parser) and names only metrics the code exports and labels it or
     Prometheus sets, and keeps the labels its legend or annotations print; the alerts follow
     their values; the dashboard's panels have unique ids, places that do not overlap and
     queries on the datasource variable, and its ConfigMap carries the file as it is. The
     exported names come from the code itself: tests/deploy.rs renders s3nfs::metrics::global()
     into the file S3NFS_METRICS_EXPOSITION names.
Exits 1 listing every failure, 2 when a Python package, node or the npm package is missing.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import pathlib
import re
import ssl
import subprocess
import sys
import tempfile
from typing import Any, Iterator

sys.dont_write_bytecode = True  # no __pycache__ in deploy/ from importing render-manifests.py

PINNED = "helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 promql-parser==0.12.0"

try:
    import helm_python as helm
    import kubernetes_validate
    import promql_parser
    import yaml
except ImportError as e:
    print(
        f"tests/deploy/check.py: the Python package {e.name!r} is missing. Run .ci/run, or:\n"
        f"    python3 -m pip install {PINNED}",
        file=sys.stderr,
    )
    sys.exit(2)

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "s3nfs"
MANIFESTS = ROOT / "deploy" / "manifests"
ALL_VALUES_FILE = ROOT / "tests" / "deploy" / "all-values.yaml"

DRIVER = "csi.s3nfs.io"
DASHBOARD = CHART / "dashboards" / "s3nfs.json"
# Kinds whose schemas come from prometheus-operator (validate-crds.mjs), not kubernetes-validate.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
CRD_VALIDATOR = ROOT / "tests" / "deploy" / "validate-crds.mjs"
# Labels a series may carry besides the code's own: what Prometheus's Kubernetes discovery and
# the ServiceMonitor add.
SCRAPE_LABELS = {"namespace", "pod", "node", "service", "job", "instance", "endpoint", "container"}
README = ROOT / "deploy" / "README.md"
# The chart's generated ReadWriteMany key pair: its own template, different at every render.
PEER_TEMPLATE = "peer-secret.yaml"
# The node plugin's environment that only ReadWriteMany brings.
RWX_ENV = ("S3NFS_LEASE_API", "POD_NAMESPACE", "NODE_IP", "S3NFS_PEER_CERT", "S3NFS_PEER_KEY")
# DER of the OID prime256v1 (NIST P-256), which an EC key in PEM names.
P256_OID = bytes.fromhex("06082a8648ce3d030107")
# The chart's minimum (its kubeVersion) and the newest version kubernetes-validate ships.
_minimum = re.search(r">=\s*v?(\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
KUBE_VERSIONS = [_minimum.group(1), ".".join(kubernetes_validate.latest_version().split(".")[:2])]
# The values every install must give (the secret's credentials and endpoint have no default).
REQUIRED = {
    "secret": {
        "accessKey": "test-access-key",
        "secretKey": "test-secret-key",
        "endpoint": "http://minio.minio:9000",
    }
}
# Maps whose keys are the user's own: compared as a whole, not key by key.
FREE_FORM = {"nodeSelector", "affinity", "labels"}
SECRET_PARAMS = [
    f"csi.storage.k8s.io/{step}-secret-{what}"
    for step in ("provisioner", "controller-expand", "node-stage", "node-publish")
    for what in ("name", "namespace")
]

failures: list[str] = []


def check(ok: Any, message: str) -> bool:
    if not ok:
        failures.append(message)
    return bool(ok)


def load_render_manifests():
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "deploy" / "render-manifests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def nested(path: tuple[str, ...], value: Any) -> dict:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def leaves(values: dict, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every leaf: scalars, lists, empty maps and free-form maps."""
    for key, value in values.items():
        p = path + (key,)
        if isinstance(value, dict) and value and key not in FREE_FORM:
            yield from leaves(value, p)
        else:
            yield p, value


def lookup(values: dict, path: tuple[str, ...]) -> tuple[bool, Any]:
    cur: Any = values
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return False, None
        cur = cur[key]
    return True, cur


def render(values: dict | None, release: str, namespace: str) -> dict[str, str]:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=release, namespace=namespace, is_install=True)
    return {p.rsplit("/templates/", 1)[-1]: t for p, t in out.items() if not p.endswith("NOTES.txt")}


def stable(files: dict[str, str]) -> dict[str, str]:
    """The render with the generated key pair blanked, so that two renders compare equal when
    only the pair differs."""
    out = dict(files)
    if PEER_TEMPLATE in out:
        out[PEER_TEMPLATE] = re.sub(r"^(\s*tls\.(?:crt|key)):.*$", r"\1: GENERATED", out[PEER_TEMPLATE], flags=re.M)
    return out


def parse(files: dict[str, str], label: str) -> list[dict]:
    docs = []
    for name, text in sorted(files.items()):
        try:
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    doc["__source__"] = f"{label}:{name}"
                    docs.append(doc)
        except yaml.YAMLError as e:
            check(False, f"{label}:{name}: not valid YAML: {e}")
    return docs


def strip(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "__source__"}


def ident(doc: dict) -> str:
    meta = doc.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc.get('kind')} {ns}{meta.get('name')} ({doc['__source__']})"


def nulls(value: Any, path: str = "") -> Iterator[str]:
    if value is None:
        yield path or "."
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from nulls(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nulls(v, f"{path}[{i}]")


def validate_operator_objects(docs: list[dict]) -> None:
    """ServiceMonitor and PrometheusRule against prometheus-operator's schemas (node)."""
    if not docs:
        return
    body = json.dumps([strip(d) for d in docs])
    try:
        r = subprocess.run(["node", str(CRD_VALIDATOR)], input=body, capture_output=True, text=True,
                           cwd=CRD_VALIDATOR.parent, timeout=120)
    except FileNotFoundError:
        print("tests/deploy/check.py: node is missing. Run .ci/run, or: apt-get install nodejs npm", file=sys.stderr)
        sys.exit(2)
    if "ERR_MODULE_NOT_FOUND" in r.stderr:
        print("tests/deploy/check.py: the npm package is missing. Run .ci/run, or: npm ci --prefix tests/deploy",
              file=sys.stderr)
        sys.exit(2)
    for line in r.stdout.splitlines():
        check(False, f"prometheus-operator schema: {line}")
    check(r.returncode in (0, 1) and (r.returncode == 0) == (not r.stdout.strip()),
          f"validate-crds.mjs failed: {r.stderr.strip()[-500:]}")


def validate(docs: list[dict]) -> None:
    seen = set()
    validate_operator_objects([d for d in docs if d.get("kind") in OPERATOR_KINDS])
    for doc in docs:
        body = strip(doc)
        key = (doc.get("kind"), (doc.get("metadata") or {}).get("namespace"), (doc.get("metadata") or {}).get("name"))
        check(key not in seen, f"{ident(doc)}: defined twice")
        seen.add(key)
        for path in nulls(body):
            check(False, f"{ident(doc)}: {path} is null (a value rendered empty?)")
        if doc.get("kind") in OPERATOR_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(body, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                check(False, f"{ident(doc)}: invalid for Kubernetes {version} at {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                check(False, f"{ident(doc)}: {e.message}")
            except Exception as e:  # noqa: BLE001 - any other failure is a failure too
                check(False, f"{ident(doc)}: could not be validated for {version}: {e!r}")


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    if not check(len(found) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(found)}"):
        return {"metadata": {"name": "?"}, "spec": {}, "__source__": "missing"}
    return found[0]


def container(pod: dict, name: str) -> dict:
    found = [c for c in pod.get("containers", []) if c.get("name") == name]
    check(len(found) == 1, f"pod template has no container {name!r}")
    return found[0] if found else {}


def env_of(c: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def volume(pod: dict, name: str) -> dict:
    found = [v for v in pod.get("volumes", []) if v.get("name") == name]
    check(len(found) == 1, f"pod template has no volume {name!r}")
    return found[0] if found else {}


def mount_of(c: dict, path: str) -> dict:
    found = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == path]
    check(len(found) == 1, f"container {c.get('name')!r} mounts nothing at {path}")
    return found[0] if found else {}


def rule_verbs(role: dict, group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for rule in role.get("rules", []):
        if group in rule.get("apiGroups", []) and resource in rule.get("resources", []):
            verbs |= set(rule.get("verbs", []))
    return verbs


def check_structure(docs: list[dict], namespace: str, label: str) -> None:
    """Consistency every render must have, whatever the values."""
    sas = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    roles = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("Role", "ClusterRole")}
    cluster_scoped = {"CSIDriver", "ClusterRole", "ClusterRoleBinding", "StorageClass", "Namespace"}
    for d in docs:
        ns = d["metadata"].get("namespace")
        if d["kind"] in cluster_scoped:
            check(ns is None, f"{label}: {ident(d)} is cluster-scoped but has a namespace")
        else:
            check(ns == namespace, f"{label}: {ident(d)} is not in namespace {namespace}")
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            ref = d["roleRef"]
            check((ref["kind"], ref["name"]) in roles, f"{label}: {ident(d)} refers to a missing {ref['kind']} {ref['name']}")
            for s in d["subjects"]:
                check(s["kind"] == "ServiceAccount" and s["name"] in sas and s.get("namespace") == namespace,
                      f"{label}: {ident(d)} binds {s}, not a ServiceAccount of this release")
        if d["kind"] in ("Deployment", "DaemonSet"):
            spec = d["spec"]
            pod = spec["template"]["spec"]
            labels = spec["template"]["metadata"].get("labels", {})
            for k, v in spec["selector"]["matchLabels"].items():
                check(labels.get(k) == v, f"{label}: {ident(d)}: selector {k}={v} does not match the pod labels")
            check(pod.get("serviceAccountName") in sas, f"{label}: {ident(d)} uses a missing ServiceAccount {pod.get('serviceAccountName')}")
            names = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                check(":" in c["image"] and not c["image"].endswith(":latest"), f"{label}: {ident(d)}: {c['name']} image {c['image']} is not pinned")
                for m in c.get("volumeMounts", []):
                    check(m["name"] in names, f"{label}: {ident(d)}: {c['name']} mounts an undeclared volume {m['name']}")
                for arg in c.get("args", []):
                    for var in re.findall(r"\$\((\w+)\)", arg):
                        check(var in env_of(c), f"{label}: {ident(d)}: {c['name']} argument {arg} uses $({var}), which is not in its env")


def check_defaults(docs: list[dict]) -> None:
    """The default render (release and namespace s3nfs)."""
    ns = "s3nfs"
    kinds = sorted(d["kind"] for d in docs)
    check(kinds == sorted(["CSIDriver", "ServiceAccount", "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole",
                           "ClusterRoleBinding", "ClusterRoleBinding", "ClusterRoleBinding",
                           "Role", "RoleBinding", "Role", "RoleBinding",
                           "Deployment", "DaemonSet", "StorageClass", "Secret", "Secret", "Service", "Service"]),
          f"default render: unexpected set of objects {kinds}")

    # CSIDriver
    drv = one(docs, "CSIDriver", DRIVER)["spec"]
    # Attachment is how Kubernetes keeps a ReadWriteOnce volume on one node at a time.
    check(drv.get("attachRequired") is True, "CSIDriver: attachRequired must be true (no Multi-Attach check without it)")
    check(drv.get("podInfoOnMount") is True, "CSIDriver: podInfoOnMount must be true")
    check(drv.get("fsGroupPolicy") == "File", "CSIDriver: fsGroupPolicy must default to File")
    check(drv.get("volumeLifecycleModes") == ["Persistent"], "CSIDriver: volumeLifecycleModes must be [Persistent]")
    check(drv.get("requiresRepublish") is False, "CSIDriver: requiresRepublish must be false")

    # Node plugin
    ds = one(docs, "DaemonSet", "s3nfs-node")
    pod = ds["spec"]["template"]["spec"]
    check(pod.get("hostNetwork") is True, "node DaemonSet: hostNetwork must be true (the gateways listen on the host's loopback)")
    check(pod.get("dnsPolicy") == "ClusterFirstWithHostNet", "node DaemonSet: dnsPolicy must be ClusterFirstWithHostNet")
    check(pod.get("priorityClassName") == "system-node-critical", "node DaemonSet: priorityClassName must default to system-node-critical")
    check(pod.get("terminationGracePeriodSeconds") == 30, "node DaemonSet: terminationGracePeriodSeconds must default to 30")
    check({"operator": "Exists"} in pod.get("tolerations", []), "node DaemonSet: must tolerate every taint by default")
    upd = ds["spec"].get("updateStrategy", {})
    check(upd.get("type") == "RollingUpdate" and upd.get("rollingUpdate", {}).get("maxUnavailable") == 1,
          "node DaemonSet: updateStrategy must be RollingUpdate with maxUnavailable 1")
    node = container(pod, "s3nfs")
    check(node.get("securityContext", {}).get("privileged") is True, "node plugin container must be privileged")
    check(node.get("command") == ["/usr/local/bin/s3nfs"], "node plugin: command must be /usr/local/bin/s3nfs")
    args = node.get("args", [])
    for a in ("csi", "--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)", "--state-dir=/csi/state"):
        check(a in args, f"node plugin: argument {a} missing from {args}")
    check(env_of(node).get("NODE_NAME") == {"fieldRef": {"fieldPath": "spec.nodeName"}}, "node plugin: NODE_NAME must come from spec.nodeName")
    check(env_of(node).get("RUST_LOG") == "info", "node plugin: RUST_LOG must default to info")
    check(env_of(node).get("S3NFS_LOG_FORMAT") == "json", "node plugin: logs must default to JSON (S3NFS_LOG_FORMAT=json)")
    kubelet = mount_of(node, "/var/lib/kubelet")
    check(kubelet.get("mountPropagation") == "Bidirectional", "node plugin: the kubelet dir must be mounted with mountPropagation Bidirectional")
    check(volume(pod, kubelet.get("name", "")).get("hostPath", {}).get("path") == "/var/lib/kubelet", "node plugin: the kubelet dir mount is not the host's /var/lib/kubelet")
    csi = mount_of(node, "/csi")
    check(volume(pod, csi.get("name", "")).get("hostPath", {}).get("path") == f"/var/lib/kubelet/plugins/{DRIVER}",
          "node plugin: /csi must be the host's plugin dir (socket and state)")
    check(csi.get("mountPropagation") in (None, "None"), "node plugin: /csi needs no mount propagation")
    port = [p for p in node.get("ports", []) if p.get("name") == "healthz"]
    check(port and port[0]["containerPort"] == 9810, "node plugin: healthz port must default to 9810")
    check(node.get("livenessProbe", {}).get("httpGet", {}).get("port") == "healthz", "node plugin: livenessProbe must hit the healthz port")
    reg = container(pod, "node-driver-registrar")
    check("--csi-address=/csi/csi.sock" in reg.get("args", []), "registrar: --csi-address=/csi/csi.sock missing")
    check(f"--kubelet-registration-path=/var/lib/kubelet/plugins/{DRIVER}/csi.sock" in reg.get("args", []), "registrar: wrong --kubelet-registration-path")
    regdir = mount_of(reg, "/registration")
    check(volume(pod, regdir.get("name", "")).get("hostPath", {}).get("path") == "/var/lib/kubelet/plugins_registry", "registrar: /registration must be the kubelet's plugins_registry")
    check(mount_of(reg, "/csi").get("name") == csi.get("name"), "registrar: must share the plugin's /csi")
    live = container(pod, "liveness-probe")
    check("--csi-address=/csi/csi.sock" in live.get("args", []) and "--health-port=9810" in live.get("args", []),
          f"livenessprobe: wrong arguments {live.get('args')}")
    check(mount_of(live, "/csi").get("name") == csi.get("name"), "livenessprobe: must share the plugin's /csi")
    for c in pod["containers"]:
        check(c["image"].startswith("registry.k8s.io/sig-storage/") or c["name"] == "s3nfs", f"node: unexpected image {c['image']}")
    check(container(pod, "s3nfs").get("image") == "ghcr.io/s3nfs/s3nfs:0.1.0", "node plugin: image must default to ghcr.io/s3nfs/s3nfs:0.1.0")

    # Controller
    dep = one(docs, "Deployment", "s3nfs-controller")
    check(dep["spec"].get("replicas") == 1, "controller: one replica by default")
    pod = dep["spec"]["template"]["spec"]
    check(not pod.get("hostNetwork"), "controller: must use the pod network")
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True, "controller: runAsNonRoot must be true")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "controller: seccompProfile must be RuntimeDefault")
    for c in pod["containers"]:
        sc = c.get("securityContext", {})
        check(sc.get("readOnlyRootFilesystem") is True, f"controller: {c['name']} must have a read-only root filesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"controller: {c['name']} must not allow privilege escalation")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"controller: {c['name']} must drop ALL capabilities")
        check(not sc.get("privileged"), f"controller: {c['name']} must not be privileged")
        check(not any("leader-election" in a for a in c.get("args", [])), f"controller: {c['name']} must not use leader election with one replica")
    ctl = container(pod, "s3nfs")
    check(ctl.get("command") == ["/usr/local/bin/s3nfs"], "controller: command must be /usr/local/bin/s3nfs")
    check(env_of(ctl).get("S3NFS_LOG_FORMAT") == "json", "controller: logs must default to JSON (S3NFS_LOG_FORMAT=json)")
    for a in ("csi", "--mode=controller", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)"):
        check(a in ctl.get("args", []), f"controller: argument {a} missing from {ctl.get('args')}")
    socket = mount_of(ctl, "/csi")
    check("emptyDir" in volume(pod, socket.get("name", "")), "controller: the socket dir must be an emptyDir")
    prov = container(pod, "csi-provisioner")
    check(re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-provisioner:v5\.\d+\.\d+", prov.get("image", "")), f"controller: provisioner image {prov.get('image')} is not a v5.x")
    for a in ("--csi-address=/csi/csi.sock", "--v=2", "--extra-create-metadata", "--timeout=120s"):
        check(a in prov.get("args", []), f"controller: provisioner argument {a} missing")
    res = container(pod, "csi-resizer")
    check(re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-resizer:v1\.\d+\.\d+", res.get("image", "")), f"controller: resizer image {res.get('image')} is not a v1.x")
    for a in ("--csi-address=/csi/csi.sock", "--timeout=120s"):
        check(a in res.get("args", []), f"controller: resizer argument {a} missing")
    att = container(pod, "csi-attacher")
    check(re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-attacher:v4\.\d+\.\d+", att.get("image", "")), f"controller: attacher image {att.get('image')} is not a v4.x")
    for a in ("--csi-address=/csi/csi.sock", "--timeout=120s"):
        check(a in att.get("args", []), f"controller: attacher argument {a} missing")
    for c in (prov, res, att):
        check(mount_of(c, "/csi").get("name") == socket.get("name"), f"controller: {c.get('name')} must share the socket dir")

    # RBAC
    prov_role = one(docs, "ClusterRole", "s3nfs-provisioner")
    for group, resource, verbs in [
        ("", "persistentvolumes", {"get", "list", "watch", "create", "delete", "patch"}),
        ("", "persistentvolumeclaims", {"get", "list", "watch", "update"}),
        ("storage.k8s.io", "storageclasses", {"get", "list", "watch"}),
        ("", "events", {"list", "watch", "create", "update", "patch"}),
        ("storage.k8s.io", "csinodes", {"get", "list", "watch"}),
        ("", "nodes", {"get", "list", "watch"}),
        ("storage.k8s.io", "volumeattachments", {"get", "list", "watch"}),
        ("", "secrets", {"get"}),
    ]:
        got = rule_verbs(prov_role, group, resource)
        check(verbs <= got, f"provisioner ClusterRole: {resource} needs {sorted(verbs - got)}")
    res_role = one(docs, "ClusterRole", "s3nfs-resizer")
    for group, resource, verbs in [
        ("", "persistentvolumes", {"get", "list", "watch", "patch"}),
        ("", "persistentvolumeclaims", {"get", "list", "watch"}),
        ("", "persistentvolumeclaims/status", {"patch"}),
        ("", "events", {"list", "watch", "create", "update", "patch"}),
        ("", "pods", {"get", "list", "watch"}),
    ]:
        got = rule_verbs(res_role, group, resource)
        check(verbs <= got, f"resizer ClusterRole: {resource} needs {sorted(verbs - got)}")
    for role in (prov_role, res_role):
        check(rule_verbs(role, "", "secrets") == {"get"}, f"{role['metadata']['name']}: secrets must be get only")
    att_role = one(docs, "ClusterRole", "s3nfs-attacher")
    for group, resource, verbs in [
        ("", "persistentvolumes", {"get", "list", "watch", "patch"}),
        ("storage.k8s.io", "csinodes", {"get", "list", "watch"}),
        ("storage.k8s.io", "volumeattachments", {"get", "list", "watch", "patch"}),
        ("storage.k8s.io", "volumeattachments/status", {"patch"}),
    ]:
        got = rule_verbs(att_role, group, resource)
        check(verbs <= got, f"attacher ClusterRole: {resource} needs {sorted(verbs - got)}")
    # ControllerPublishVolume takes no secret: the StorageClass names no controller-publish Secret.
    check(not rule_verbs(att_role, "", "secrets"), "attacher ClusterRole: must not read secrets")
    lease = one(docs, "Role", "s3nfs-leader-election")
    check({"get", "watch", "list", "delete", "update", "create"} <= rule_verbs(lease, "coordination.k8s.io", "leases"),
          "leader election Role: leases need get/watch/list/delete/update/create")
    bound = {(d["roleRef"]["name"], s["name"]) for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d["subjects"]}
    for role in ("s3nfs-provisioner", "s3nfs-resizer", "s3nfs-attacher", "s3nfs-leader-election"):
        check((role, "s3nfs-controller") in bound, f"{role} is not bound to the controller's ServiceAccount")
    check({r for r, s in bound if s == "s3nfs-node"} == {"s3nfs-node-leases"},
          "the node ServiceAccount must have the Lease Role of ReadWriteMany and no other role")

    # StorageClass and Secret
    sc = one(docs, "StorageClass", "s3nfs")
    check(sc.get("provisioner") == DRIVER, f"StorageClass: provisioner must be {DRIVER}")
    check(sc.get("allowVolumeExpansion") is True, "StorageClass: allowVolumeExpansion must be true")
    check(sc.get("volumeBindingMode") == "Immediate", "StorageClass: volumeBindingMode must be Immediate")
    check(sc.get("reclaimPolicy") == "Delete", "StorageClass: reclaimPolicy must default to Delete")
    check("mountOptions" not in sc, "StorageClass: no mountOptions")
    params = sc.get("parameters", {})
    for p in SECRET_PARAMS:
        check(params.get(p) == ("s3nfs-secret" if p.endswith("-name") else ns), f"StorageClass: {p} must point at s3nfs-secret in {ns}")
    check("bucket" not in params, "StorageClass: no bucket parameter by default (a bucket per volume)")
    for k, v in {"mounter": "s3nfs", "options": "", "onDelete": "delete", "flushDelay": "2s", "refresh": "5s"}.items():
        check(params.get(k) == v, f"StorageClass: parameter {k} must default to {v!r}, not {params.get(k)!r}")
    check(all(isinstance(v, str) for v in params.values()), "StorageClass: every parameter must be a string")
    secret = one(docs, "Secret", "s3nfs-secret")
    data = secret.get("stringData", {})
    check(sorted(data) == sorted(["accessKeyID", "secretAccessKey", "endpoint", "region", "insecure"]),
          f"Secret: keys must be csi-s3's, not {sorted(data)}")
    check(data.get("region") == "us-east-1" and data.get("insecure") == "false", "Secret: region/insecure defaults are wrong")
    check(all(isinstance(v, str) for v in data.values()), "Secret: every value must be a string")


def check_rwx_on(docs: list[dict], label: str, prefix: str, secret_name: str, duration: str) -> None:
    """ReadWriteMany enabled: what the node plugin needs for its Leases and its peers."""
    ds = one(docs, "DaemonSet", f"{prefix}-node")
    pod = ds["spec"]["template"]["spec"]
    node = container(pod, "s3nfs")
    check(pod.get("automountServiceAccountToken") is True,
          f"{label}: the node pod must mount its service account token (ReadWriteMany's Leases)")
    check(one(docs, "ServiceAccount", f"{prefix}-node").get("automountServiceAccountToken") is True,
          f"{label}: the node ServiceAccount must have automountServiceAccountToken true")
    env = env_of(node)
    check(env.get("S3NFS_LEASE_API") == "in-cluster", f"{label}: node plugin: S3NFS_LEASE_API must be in-cluster, not {env.get('S3NFS_LEASE_API')!r}")
    check(env.get("POD_NAMESPACE") == {"fieldRef": {"fieldPath": "metadata.namespace"}},
          f"{label}: node plugin: POD_NAMESPACE must come from metadata.namespace")
    check(env.get("NODE_IP") == {"fieldRef": {"fieldPath": "status.hostIP"}},
          f"{label}: node plugin: NODE_IP must come from status.hostIP")
    check(f"--lease-duration={duration}" in node.get("args", []), f"{label}: node plugin: --lease-duration={duration} missing")
    secret_volumes = [v for v in pod.get("volumes", []) if "secret" in v]
    if check(len(secret_volumes) == 1, f"{label}: the node pod must have one Secret volume (the key pair), not {secret_volumes}"):
        vol = secret_volumes[0]
        check(vol["secret"].get("secretName") == secret_name,
              f"{label}: the key pair volume must be the Secret {secret_name}, not {vol['secret'].get('secretName')}")
        check(vol["secret"].get("defaultMode") == 0o400,
              f"{label}: the key pair volume must have defaultMode 0400, not {vol['secret'].get('defaultMode')!r}")
        check("items" not in vol["secret"] or {i["path"] for i in vol["secret"]["items"]} == {"tls.crt", "tls.key"},
              f"{label}: the key pair volume must hold tls.crt and tls.key")
        mounts = [m for m in node.get("volumeMounts", []) if m.get("name") == vol["name"]]
        if check(len(mounts) == 1, f"{label}: node plugin must mount the key pair once, not {mounts}"):
            m = mounts[0]
            check(m.get("readOnly") is True, f"{label}: node plugin must mount the key pair readOnly")
            check("subPath" not in m, f"{label}: node plugin must mount the key pair's directory, not a subPath")
            where = m["mountPath"].rstrip("/")
            check(env.get("S3NFS_PEER_CERT") == f"{where}/tls.crt",
                  f"{label}: S3NFS_PEER_CERT {env.get('S3NFS_PEER_CERT')!r} is not {where}/tls.crt")
            check(env.get("S3NFS_PEER_KEY") == f"{where}/tls.key",
                  f"{label}: S3NFS_PEER_KEY {env.get('S3NFS_PEER_KEY')!r} is not {where}/tls.key")
        for c in pod["containers"]:
            if c["name"] != "s3nfs":
                check(all(m.get("name") != vol["name"] for m in c.get("volumeMounts", [])),
                      f"{label}: {c['name']} must not mount the key pair")
    role = one(docs, "Role", f"{prefix}-node-leases")
    rules = role.get("rules", [])
    exact = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "get", "update"]}]
    check([{**r, "verbs": sorted(r.get("verbs", []))} for r in rules] == exact,
          f"{label}: {role['metadata']['name']} must grant exactly get, create, update on leases.coordination.k8s.io, not {rules}")
    node_bindings = sorted(
        (d["kind"], d["metadata"]["name"], d["roleRef"]["kind"], d["roleRef"]["name"])
        for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for s in d["subjects"] if s.get("kind") == "ServiceAccount" and s.get("name") == f"{prefix}-node"
    )
    check([(k, rk, rn) for k, _, rk, rn in node_bindings] == [("RoleBinding", "Role", f"{prefix}-node-leases")],
          f"{label}: the node ServiceAccount must be bound, by a RoleBinding, to {prefix}-node-leases alone, not {node_bindings}")


def check_rwx_off(docs: list[dict], label: str, prefix: str) -> None:
    """readWriteMany.enabled=false: none of ReadWriteMany's objects or settings."""
    ds = one(docs, "DaemonSet", f"{prefix}-node")
    pod = ds["spec"]["template"]["spec"]
    node = container(pod, "s3nfs")
    check(pod.get("automountServiceAccountToken") is False, f"{label}: without ReadWriteMany the node pod must not mount a token")
    check(one(docs, "ServiceAccount", f"{prefix}-node").get("automountServiceAccountToken") is False,
          f"{label}: without ReadWriteMany the node ServiceAccount must have automountServiceAccountToken false")
    present = sorted(set(RWX_ENV) & set(env_of(node)))
    check(not present, f"{label}: without ReadWriteMany the node plugin must not have {present}")
    args = [a for a in node.get("args", []) if a.startswith(("--lease", "--peer", "--node-address"))]
    check(not args, f"{label}: without ReadWriteMany the node plugin must not have {args}")
    check(not any("secret" in v for v in pod.get("volumes", [])), f"{label}: without ReadWriteMany the node pod mounts no Secret")
    tls = [ident(d) for d in docs if d["kind"] == "Secret" and d.get("type") == "kubernetes.io/tls"]
    check(not tls, f"{label}: without ReadWriteMany no key pair Secret, found {tls}")
    check(not any(d["kind"] == "Role" and d["metadata"]["name"] == f"{prefix}-node-leases" for d in docs),
          f"{label}: without ReadWriteMany no Lease Role for the node plugin")
    bound = [ident(d) for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
             for s in d["subjects"] if s.get("name") == f"{prefix}-node"]
    check(not bound, f"{label}: without ReadWriteMany the node ServiceAccount must have no role, found {bound}")


def check_peer_secret(docs: list[dict], label: str, name: str) -> bytes:
    """The chart's generated key pair: a kubernetes.io/tls Secret whose certificate and key match,
    an ECDSA P-256 key. Returns the key's PEM."""
    secret = one(docs, "Secret", name)
    check(secret.get("type") == "kubernetes.io/tls", f"{label}: Secret {name} must be of type kubernetes.io/tls")
    data = secret.get("data") or {}
    if not check(sorted(data) == ["tls.crt", "tls.key"] and "stringData" not in secret,
                 f"{label}: Secret {name} must hold exactly tls.crt and tls.key in data, not {sorted(data)}"):
        return b""
    try:
        crt, key = base64.b64decode(data["tls.crt"], validate=True), base64.b64decode(data["tls.key"], validate=True)
    except (ValueError, TypeError) as e:
        check(False, f"{label}: Secret {name}: data is not base64: {e}")
        return b""
    check(crt.startswith(b"-----BEGIN CERTIFICATE-----"), f"{label}: Secret {name}: tls.crt is not a PEM certificate")
    body = re.search(rb"-----BEGIN (EC )?PRIVATE KEY-----(.*?)-----END", key, re.S)
    if check(body, f"{label}: Secret {name}: tls.key is not a PEM EC or PKCS#8 private key"):
        check(P256_OID in base64.b64decode(b"".join(body.group(2).split())), f"{label}: Secret {name}: tls.key is not an ECDSA P-256 key")
    # OpenSSL refuses a certificate with a key that is not its own.
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "tls.crt").write_bytes(crt)
        (pathlib.Path(tmp) / "tls.key").write_bytes(key)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(f"{tmp}/tls.crt", f"{tmp}/tls.key")
        except ssl.SSLError as e:
            check(False, f"{label}: Secret {name}: tls.crt and tls.key are not one key pair: {e}")
    return key


def exported() -> tuple[set[str], set[str]] | None:
    """(metric names, label names) of the code's exposition text (see tests/deploy.rs)."""
    path = os.environ.get("S3NFS_METRICS_EXPOSITION")
    if not check(path, "S3NFS_METRICS_EXPOSITION is not set: run this through `cargo test --test deploy`, which "
                       "renders the code's metrics into a file and names it there (the PromQL is parsed, but "
                       "its metric and label names are left unchecked)"):
        return None
    text = pathlib.Path(path).read_text()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    labels = set(re.findall(r"[{,]([a-zA-Z_]\w*)=\"", text))
    check("s3nfs_volume_pending_seconds" in names and "volume" in labels and "op" in labels,
          f"{path}: not the code's metrics (no s3nfs_volume_pending_seconds, volume or op)")
    return names, labels


def promql_names(tree) -> tuple[list[str], set[str], set[str]]:
    """(metric names selected, labels matched or grouped on, labels an aggregation keeps) of a
    parsed expression. The last is the union of every `by (...)`: what an alert's annotations
    may name."""
    selected: list[str] = []
    used: set[str] = set()
    kept: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            selected.append(node.name)
            matchers = list(node.matchers.matchers) + [m for group in node.matchers.or_matchers for m in group]
            used.update(m.name for m in matchers)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            used.update(node.modifier.labels)
            if node.modifier.type == promql_parser.AggModifierType.By:
                kept.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                used.update(node.modifier.matching.labels)
            used.update(node.modifier.group_labels or [])
        return True

    promql_parser.walk(tree, visit)
    used.discard("__name__")
    return selected, used, kept


def check_promql(expr: str, where: str, metrics: tuple[set[str], set[str]] | None,
                 shown: set[str] = frozenset()) -> set[str]:
    """`expr` parses, and names only exported metrics and labels (Grafana's variables stand in
    for a duration and a regular expression; `label_values(metric, label)` for a selector).
    `shown`: labels a legend or an annotation prints, which the expression must keep or select.
    Returns the labels its aggregations keep."""
    grafana = (expr.replace("$__rate_interval", "5m").replace("$__interval", "5m")
               .replace("${volume}", ".*").replace("$volume", ".*"))
    m = re.fullmatch(r"\s*label_values\((\w+),\s*(\w+)\)\s*", grafana)
    if m:
        grafana = f"{m.group(1)}{{{m.group(2)}!=\"\"}}"
    try:
        tree = promql_parser.parse(grafana)
    except ValueError as e:
        check(False, f"{where}: PromQL does not parse ({e}): {expr}")
        return set()
    selected, used, kept = promql_names(tree)
    check(selected, f"{where}: names no metric: {expr}")
    for label in shown:
        check(label in kept | used, f"{where}: shows {label}, which the expression drops: {expr}")
    if metrics is not None:
        names, labels = metrics
        for name in selected:
            check(name in names, f"{where}: {name} is not a metric the code exports: {expr}")
        for label in used | set(shown):
            check(label in labels | SCRAPE_LABELS, f"{where}: label {label} is neither the code's nor Prometheus's: {expr}")
    return kept


def check_promql_checker(metrics: tuple[set[str], set[str]] | None) -> None:
    """check_promql refuses what it is there to refuse (else every expression would pass)."""
    bad = [
        ('sum by (op) (rate(s3nfs_s3_errors_total[5m]', "does not parse"),
        ("max(s3nfs_volume_pending_secs) > 900", "not a metric the code exports"),
        ('s3nfs_volume_failed{volumes="x"} == 1', "label volumes"),
        ("sum by (bucket) (rate(s3nfs_s3_requests_total[5m]))", "label bucket"),
        ("a_total / on (tenant) b_total", "label tenant"),
        ("label_values(s3nfs_volume_dirty_bytes, pvc)", "label pvc"),
    ]
    if metrics is None:
        bad = bad[:1]
    global failures
    kept = failures
    for expr, needle in bad:
        failures = []
        check_promql(expr, "self-test", metrics)
        refused = any(needle in f for f in failures)
        failures = kept
        check(refused, f"check_promql accepts {expr!r} (it must report {needle!r})")
    failures = []
    check_promql("sum by (op) (rate(s3nfs_s3_errors_total[5m]))", "self-test", metrics, {"volume"})
    refused = any("drops" in f for f in failures)
    failures = kept
    check(refused, "check_promql accepts an annotation naming a label the expression drops")


def overlaps(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def check_dashboard(metrics: tuple[set[str], set[str]] | None) -> str:
    """The Grafana dashboard file: its structure and every expression. Returns its text."""
    text = DASHBOARD.read_text()
    try:
        dash = json.loads(text)
    except ValueError as e:
        check(False, f"{DASHBOARD}: not JSON: {e}")
        return text
    for key in ("uid", "title", "schemaVersion", "panels", "templating"):
        check(key in dash, f"dashboard: no {key}")
    check(dash.get("uid") == "s3nfs-volumes", "dashboard: its uid must stay s3nfs-volumes (links and imports key on it)")
    check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 39, "dashboard: schemaVersion below 39")
    ids = [p.get("id") for p in dash.get("panels", [])]
    check(len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), f"dashboard: panel ids not unique integers: {ids}")
    placed: list[tuple[str, dict]] = []
    exprs = 0
    for p in dash.get("panels", []):
        where = f"dashboard panel {p.get('id')} {p.get('title')!r}"
        check(p.get("type") and p.get("title"), f"{where}: no type or title")
        g = p.get("gridPos", {})
        if check(all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) and g["x"] >= 0 and g["x"] + g["w"] <= 24,
                 f"{where}: gridPos {g} is not a place on the 24-column grid"):
            for other, h in placed:
                check(not overlaps(g, h), f"{where}: overlaps {other}")
            placed.append((where, g))
        if p.get("type") == "row":
            continue
        check(p.get("datasource", {}).get("uid") == "${datasource}", f"{where}: not on the datasource variable")
        check(p.get("targets"), f"{where}: no query")
        for t in p.get("targets", []):
            exprs += 1
            check(t.get("datasource", {}).get("uid") == "${datasource}", f"{where}: query {t.get('refId')} not on the datasource variable")
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            check_promql(t.get("expr", ""), f"{where} query {t.get('refId')}", metrics, legend)
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    check(variables.get("datasource", {}).get("query") == "prometheus", "dashboard: no Prometheus datasource variable")
    for name, v in variables.items():
        if v.get("type") == "query":
            query = v.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            check(query == v.get("definition"), f"dashboard variable {name}: query and definition differ")
            check(v.get("datasource", {}).get("uid") == "${datasource}", f"dashboard variable {name}: not on the datasource variable")
            check_promql(str(query), f"dashboard variable {name}", metrics)
    check(re.fullmatch(r"label_values\(s3nfs_volume_\w+, volume\)", str(variables.get("volume", {}).get("definition"))),
          "dashboard: no volume variable listing the volume label of a per-volume metric")
    # What the dashboard is for, by metric.
    wanted = ["s3nfs_volume_dirty_bytes", "s3nfs_volume_pending_seconds", "s3nfs_volume_uploaded_bytes_total",
              "s3nfs_s3_requests_total", "s3nfs_s3_request_duration_seconds_bucket", "s3nfs_nfs_ops_total",
              "s3nfs_nfs_op_duration_seconds_bucket", "s3nfs_s3_errors_total", "s3nfs_nfs_errors_total",
              "s3nfs_volume_upload_errors_total", "s3nfs_volume_capacity_bytes", "s3nfs_cache_hit_ratio"]
    for w in wanted:
        check(w in text, f"dashboard: nothing shows {w}")
    for q in ("0.5", "0.99"):
        check(f"histogram_quantile({q}, sum by (le, op) (rate(s3nfs_s3_request_duration_seconds_bucket" in text,
              f"dashboard: no S3 latency quantile {q} by op")
    check(exprs >= 10, f"dashboard: {exprs} queries")
    return text


def check_metrics_on(docs: list[dict], label: str, prefix: str, node_port: int, controller_port: int) -> None:
    """metrics.enabled: ports, --metrics-listen and the headless Services."""
    for kind, name, component, port in [("DaemonSet", f"{prefix}-node", "node", node_port),
                                        ("Deployment", f"{prefix}-controller", "controller", controller_port)]:
        pod = one(docs, kind, name)["spec"].get("template", {}).get("spec", {})
        c = container(pod, "s3nfs")
        check(f"--metrics-listen=0.0.0.0:{port}" in c.get("args", []), f"{label}: {component} has no --metrics-listen=0.0.0.0:{port}")
        ports = [p for p in c.get("ports", []) if p.get("name") == "metrics"]
        check(len(ports) == 1 and ports[0].get("containerPort") == port, f"{label}: {component} has no metrics port {port}")
        svc = one(docs, "Service", f"{prefix}-{component}-metrics")
        spec = svc.get("spec", {})
        check(spec.get("clusterIP") == "None", f"{label}: {component} metrics Service must be headless")
        check(spec.get("selector", {}).get("app.kubernetes.io/component") == component, f"{label}: {component} metrics Service selects other pods")
        pod_labels = one(docs, kind, name)["spec"]["template"]["metadata"]["labels"]
        check(spec.get("selector", {}).items() <= pod_labels.items(), f"{label}: {component} metrics Service selects no pod of {name}")
        sp = spec.get("ports", [{}])
        check(sp[0].get("name") == "metrics" and sp[0].get("port") == port and sp[0].get("targetPort") == "metrics",
              f"{label}: {component} metrics Service port is not metrics/{port}")
        check(svc["metadata"]["labels"].get("s3nfs.io/metrics") == "true", f"{label}: {component} metrics Service lacks the ServiceMonitor's label")


def check_metrics_off(docs: list[dict], label: str) -> None:
    for d in docs:
        check(d["kind"] not in ("Service", "ConfigMap") and d["kind"] not in OPERATOR_KINDS, f"{label}: metrics off, yet {ident(d)}")
        if d["kind"] in ("DaemonSet", "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                check(not any(a.startswith("--metrics-listen") for a in c.get("args", [])), f"{label}: metrics off, yet {c['name']} listens")
                check(not [p for p in c.get("ports", []) if p.get("name") == "metrics"], f"{label}: metrics off, yet {c['name']} has a metrics port")


def check_monitoring(docs: list[dict], label: str, prefix: str, namespace: str, mon: dict,
                     metrics: tuple[set[str], set[str]] | None, dashboard: str) -> None:
    """ServiceMonitor, PrometheusRule and the dashboard's ConfigMap, as `mon` (the metrics
    values) asks."""
    sm = one(docs, "ServiceMonitor", prefix)
    check(mon["serviceMonitor"]["labels"].items() <= sm["metadata"].get("labels", {}).items(), f"{label}: ServiceMonitor labels not applied")
    sel = sm["spec"].get("selector", {}).get("matchLabels", {})
    services = [d for d in docs if d["kind"] == "Service"]
    check(len(services) == 2 and all(sel.items() <= s["metadata"]["labels"].items() for s in services),
          f"{label}: the ServiceMonitor does not select both metrics Services")
    check(sm["spec"].get("namespaceSelector", {}).get("matchNames") == [namespace], f"{label}: ServiceMonitor looks outside {namespace}")
    ep = sm["spec"].get("endpoints", [{}])[0]
    check(ep.get("port") == "metrics" and ep.get("path") == "/metrics" and ep.get("interval") == mon["serviceMonitor"]["interval"],
          f"{label}: ServiceMonitor endpoint {ep}")
    rule = one(docs, "PrometheusRule", prefix)
    check(mon["prometheusRule"]["labels"].items() <= rule["metadata"].get("labels", {}).items(), f"{label}: PrometheusRule labels not applied")
    alerts = {r.get("alert"): r for g in rule["spec"].get("groups", []) for r in g.get("rules", [])}
    check(set(alerts) == {"S3nfsDataNotInS3", "S3nfsS3Errors", "S3nfsUploadsFailing", "S3nfsVolumeAlmostFull", "S3nfsVolumeFailed"},
          f"{label}: alerts {sorted(alerts)}")
    for name, r in alerts.items():
        notes = r.get("annotations", {})
        # Every label the annotations print ({{ $labels.x }}) must survive the expression's
        # aggregations, or the alert reads "volume  ...".
        shown = set(re.findall(r"\$labels\.(\w+)", notes.get("summary", "") + notes.get("description", "")))
        kept = check_promql(str(r.get("expr", "")), f"{label}: alert {name}", metrics, shown)
        check(r.get("labels", {}).get("severity") in ("warning", "critical"), f"{label}: alert {name} has no severity")
        check(re.fullmatch(r"[1-9][0-9]*m", str(r.get("for", ""))) and int(r["for"][:-1]) <= 15,
              f"{label}: alert {name} must wait whole minutes, at most 15, not {r.get('for')!r}")
        check("s3nfs status" in notes.get("description", ""), f"{label}: alert {name} does not say to run s3nfs status")
        check(notes.get("summary") and "{{ $labels." in notes["summary"], f"{label}: alert {name}'s summary names no series")
        if "volume" in kept:
            check("{{ $labels.volume }}" in notes.get("summary", ""), f"{label}: alert {name}'s summary does not name the volume")
    minutes = int(str(mon["prometheusRule"]["pendingFor"]).rstrip("m"))
    check(re.search(rf"s3nfs_volume_pending_seconds\)\s*>\s*{minutes * 60}\b", str(alerts.get("S3nfsDataNotInS3", {}).get("expr"))),
          f"{label}: S3nfsDataNotInS3 does not follow pendingFor {mon['prometheusRule']['pendingFor']}")
    check(re.search(rf"\*\s*100\s*>\s*{mon['prometheusRule']['capacityPercent']}\b", str(alerts.get("S3nfsVolumeAlmostFull", {}).get("expr"))),
          f"{label}: S3nfsVolumeAlmostFull does not follow capacityPercent")
    check(re.search(r"\(s3nfs_volume_failed\)\s*==\s*1$", str(alerts.get("S3nfsVolumeFailed", {}).get("expr"))),
          f"{label}: S3nfsVolumeFailed does not watch s3nfs_volume_failed == 1")
    errors = str(alerts.get("S3nfsS3Errors", {}).get("expr"))
    check(re.search(r"by \([^)]*\bop\)\s*\(rate\(s3nfs_s3_errors_total\[\w+\]\)\)\s*/\s*sum by \([^)]*\bop\)\s*"
                    r"\(rate\(s3nfs_s3_requests_total\[\w+\]\)\)\s*>\s*0\.0\d+$", errors),
          f"{label}: S3nfsS3Errors is not the share of failed S3 requests by op: {errors}")
    cm = one(docs, "ConfigMap", f"{prefix}-dashboard")
    check(mon["dashboard"]["labels"].items() <= cm["metadata"].get("labels", {}).items(), f"{label}: dashboard labels not applied")
    check(cm.get("data", {}).get("s3nfs.json") == dashboard, f"{label}: the ConfigMap does not carry {DASHBOARD.name} as it is")


def check_all_values(docs: list[dict], full: list[dict], values: dict, text: str) -> None:
    """The all-values render: `docs` as given (secret and StorageClass off), `full` with them on."""
    ns, prefix = "storage-system", values["fullnameOverride"]
    kubelet = values["kubeletDir"].rstrip("/")
    kinds = {d["kind"] for d in docs}
    check("Secret" not in kinds, "all-values: secret.create=false must not render a Secret")
    check("StorageClass" not in kinds, "all-values: storageClass.create=false must not render a StorageClass")

    # Every host path lives under the custom kubelet dir, and the default one appears nowhere.
    check("/var/lib/kubelet" not in text, "all-values: /var/lib/kubelet still appears with a custom kubeletDir")
    ds = one(docs, "DaemonSet", f"{prefix}-node")
    pod = ds["spec"]["template"]["spec"]
    paths = [v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v]
    check(len(paths) == 3, f"all-values: expected 3 hostPath volumes, found {paths}")
    for p in paths:
        check(p == kubelet or p.startswith(kubelet + "/"), f"all-values: host path {p} is not under kubeletDir {kubelet}")
    node = container(pod, "s3nfs")
    check(mount_of(node, kubelet).get("mountPropagation") == "Bidirectional", "all-values: the kubelet dir must be mounted at its own path, Bidirectional")
    reg = container(pod, "node-driver-registrar")
    check(f"--kubelet-registration-path={kubelet}/plugins/{DRIVER}/csi.sock" in reg.get("args", []), "all-values: registrar path does not follow kubeletDir")
    check(pod.get("hostNetwork") is True and node.get("securityContext", {}).get("privileged") is True,
          "all-values: the node plugin must stay host-network and privileged")
    check([p["containerPort"] for p in node.get("ports", [])] == [values["node"]["healthPort"]], "all-values: healthz port does not follow node.healthPort")
    check(f"--health-port={values['node']['healthPort']}" in container(pod, "liveness-probe").get("args", []), "all-values: livenessprobe port does not follow node.healthPort")
    check(pod.get("terminationGracePeriodSeconds") == values["node"]["terminationGracePeriodSeconds"], "all-values: terminationGracePeriodSeconds not applied")
    check(pod.get("tolerations") == values["node"]["tolerations"], "all-values: node tolerations not applied")
    # Helm merges maps with the defaults: the default kubernetes.io/os: linux stays.
    check(values["node"]["nodeSelector"].items() <= pod.get("nodeSelector", {}).items(), "all-values: node nodeSelector not applied")
    check(pod.get("affinity") == values["node"]["affinity"], "all-values: node affinity not applied")
    check(pod.get("priorityClassName") == values["node"]["priorityClassName"], "all-values: node priorityClassName not applied")
    check(pod.get("imagePullSecrets") == values["imagePullSecrets"], "all-values: imagePullSecrets not applied to the node plugin")
    env = env_of(node)
    check(env.get("RUST_LOG") == values["logLevel"], "all-values: logLevel not applied to the node plugin")
    for e in values["extraEnv"]:
        check(env.get(e["name"]) == e["value"], f"all-values: extraEnv {e['name']} missing from the node plugin")
    check(node.get("image") == f"{values['image']['repository']}:{values['image']['tag']}", "all-values: node image not applied")
    check(node.get("resources") == values["node"]["resources"], "all-values: node resources not applied")
    for name, key in (("node-driver-registrar", "registrar"), ("liveness-probe", "livenessProbe")):
        c, v = container(pod, name), values["node"][key]
        check(c.get("image") == f"{v['image']['repository']}:{v['image']['tag']}", f"all-values: {name} image not applied")
        check(c.get("resources") == v["resources"], f"all-values: {name} resources not applied")

    dep = one(docs, "Deployment", f"{prefix}-controller")
    check(dep["spec"].get("replicas") == 2, "all-values: controller.replicas not applied")
    pod = dep["spec"]["template"]["spec"]
    for name in ("csi-provisioner", "csi-resizer", "csi-attacher"):
        args = container(pod, name).get("args", [])
        check("--leader-election" in args and f"--leader-election-namespace={ns}" in args,
              f"all-values: {name} must use leader election in {ns} with 2 replicas")
    check(pod.get("tolerations") == values["controller"]["tolerations"], "all-values: controller tolerations not applied")
    check(values["controller"]["nodeSelector"].items() <= pod.get("nodeSelector", {}).items(), "all-values: controller nodeSelector not applied")
    check(pod.get("affinity") == values["controller"]["affinity"], "all-values: controller affinity not applied")
    check(pod.get("priorityClassName") == values["controller"]["priorityClassName"], "all-values: controller priorityClassName not applied")
    for name, key in (("csi-provisioner", "provisioner"), ("csi-resizer", "resizer"), ("csi-attacher", "attacher")):
        c, v = container(pod, name), values["controller"][key]
        check(c.get("image") == f"{v['image']['repository']}:{v['image']['tag']}", f"all-values: {name} image not applied")
        check(c.get("resources") == v["resources"], f"all-values: {name} resources not applied")
    ctl = container(pod, "s3nfs")
    check(ctl.get("resources") == values["controller"]["resources"], "all-values: controller resources not applied")
    check(env_of(ctl).get("RUST_LOG") == values["logLevel"], "all-values: logLevel not applied to the controller")
    for e in values["extraEnv"]:
        check(env_of(ctl).get(e["name"]) == e["value"], f"all-values: extraEnv {e['name']} missing from the controller")
    check(pod.get("imagePullSecrets") == values["imagePullSecrets"], "all-values: imagePullSecrets not applied to the controller")
    check(all(c.get("imagePullPolicy") == "Always" for d in (dep, ds) for c in d["spec"]["template"]["spec"]["containers"]),
          "all-values: image.pullPolicy not applied to every container")

    check(one(docs, "CSIDriver", DRIVER)["spec"].get("fsGroupPolicy") == "None", "all-values: fsGroupPolicy not applied")

    sc = one(full, "StorageClass", values["storageClass"]["name"])
    params = sc.get("parameters", {})
    for p in SECRET_PARAMS:
        check(params.get(p) == (values["secret"]["name"] if p.endswith("-name") else ns), f"all-values: {p} does not follow secret.name and the release namespace")
    check(params.get("bucket") == values["storageClass"]["bucket"], "all-values: bucket parameter missing")
    for k in ("mounter", "options", "onDelete", "flushDelay", "refresh"):
        check(params.get(k) == values["storageClass"][k], f"all-values: parameter {k} not applied")
    check(sc.get("reclaimPolicy") == "Retain", "all-values: reclaimPolicy not applied")
    check(sc["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true", "all-values: isDefault not applied")
    secret = one(full, "Secret", values["secret"]["name"])
    data = secret.get("stringData", {})
    want = {"accessKeyID": values["secret"]["accessKey"], "secretAccessKey": values["secret"]["secretKey"],
            "endpoint": values["secret"]["endpoint"], "region": values["secret"]["region"], "insecure": "true"}
    check(data == want, f"all-values: Secret data {data} != {want}")


def main() -> int:
    render_manifests = load_render_manifests()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    all_values = yaml.safe_load(ALL_VALUES_FILE.read_text())

    # 1. all-values.yaml covers every value, each with another value; every value matters.
    default_render = render(REQUIRED, "s3nfs", "s3nfs")
    for path, value in leaves(defaults):
        dotted = ".".join(path)
        present, other = lookup(all_values, path)
        if not check(present, f"all-values.yaml: {dotted} is missing (every value of values.yaml must be set there)"):
            continue
        if not check(other != value, f"all-values.yaml: {dotted} has its default value {value!r}"):
            continue
        # A value under a map that is off by default (metrics.serviceMonitor.interval) matters
        # once that map is on: compare the renders with it on.
        base = copy.deepcopy(REQUIRED)
        for i in range(1, len(path)):
            if lookup(defaults, path[:i] + ("enabled",)) == (True, False) and path[i:] != ("enabled",):
                base = merge(base, nested(path[:i] + ("enabled",), True))
        try:
            before = default_render if base == REQUIRED else render(base, "s3nfs", "s3nfs")
            changed = render(merge(base, nested(path, other)), "s3nfs", "s3nfs")
            check(stable(changed) != stable(before), f"values.yaml: {dotted} changes nothing in the render (a dead value)")
        except helm.HelmError as e:
            check(False, f"values.yaml: {dotted}={other!r} alone does not render: {e}")
    for path, _ in leaves(all_values):
        check(lookup(defaults, path)[0], f"all-values.yaml: {'.'.join(path)} is not a value of values.yaml")

    # Missing credentials and a bad endpoint are refused with a message.
    for values, needle in [({}, "is required"), (merge(REQUIRED, {"secret": {"endpoint": "minio:9000"}}), "http:// or https://"),
                           (merge(REQUIRED, {"readWriteMany": {"leaseDuration": "500ms"}}), "whole seconds or minutes"),
                           (merge(REQUIRED, {"logFormat": "yaml"}), "logFormat must be json or text"),
                           (merge(REQUIRED, {"metrics": {"prometheusRule": {"enabled": True, "pendingFor": "90s"}}}), "whole minutes"),
                           (merge(REQUIRED, {"metrics": {"prometheusRule": {"enabled": True, "capacityPercent": 150}}}), "capacityPercent must be a percentage"),
                           (merge(REQUIRED, {"metrics": {"prometheusRule": {"enabled": True, "capacityPercent": "90%"}}}), "capacityPercent must be a percentage")]:
        try:
            render(values, "s3nfs", "s3nfs")
            check(False, f"rendering with {values} should fail with a message about {needle}")
        except helm.HelmError as e:
            check(needle in str(e), f"rendering with {values} failed, but not about {needle}: {e}")

    # 2. Lint.
    for label, values in [("defaults", REQUIRED), ("all-values", all_values)]:
        report = helm.lint(str(CHART), values, strict=True, namespace="s3nfs", kube_version=f"v{KUBE_VERSIONS[0]}.0")
        for m in report.get("messages", []):
            check(m.get("severity", 0) < 2, f"helm lint ({label}): {m.get('path')}: {m.get('error')}")
        for e in report.get("errors", []):
            check(False, f"helm lint ({label}): {e}")

    # 3, 4. The default render: schemas and properties.
    docs = parse(default_render, "chart(defaults)")
    validate(docs)
    check_structure(docs, "s3nfs", "defaults")
    check_defaults(docs)

    # 8. Metrics: on by default; the operator's objects and the dashboard when asked for.
    metrics = exported()
    dashboard = check_dashboard(metrics)
    check_metrics_on(docs, "defaults", "s3nfs", 9811, 9812)
    check(not [d for d in docs if d["kind"] in OPERATOR_KINDS | {"ConfigMap"}], "defaults: ServiceMonitor, PrometheusRule and dashboard are opt-in")
    every = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}
    mon_docs = parse(render(merge(REQUIRED, {"metrics": every}), "s3nfs", "s3nfs"), "chart(monitoring)")
    validate(mon_docs)
    check_structure(mon_docs, "s3nfs", "monitoring")
    check_monitoring(mon_docs, "monitoring", "s3nfs", "s3nfs", merge(defaults["metrics"], every), metrics, dashboard)
    # Each alone renders its own object and no other.
    for key, kind in (("serviceMonitor", "ServiceMonitor"), ("prometheusRule", "PrometheusRule"), ("dashboard", "ConfigMap")):
        alone = parse(render(merge(REQUIRED, {"metrics": {key: {"enabled": True}}}), "s3nfs", "s3nfs"), f"chart({key})")
        extra = sorted(d["kind"] for d in alone if d["kind"] in OPERATOR_KINDS | {"ConfigMap"})
        check(extra == [kind], f"metrics.{key}.enabled alone: rendered {extra}, not one {kind}")
    check_promql_checker(metrics)
    off = parse(render(merge(REQUIRED, {"metrics": {"enabled": False, **every}}), "s3nfs", "s3nfs"), "chart(metrics off)")
    check_metrics_off(off, "metrics off")

    # 7. ReadWriteMany: on by default, with a generated key pair that differs per install.
    check_rwx_on(docs, "defaults", "s3nfs", "s3nfs-peer", "15s")
    key = check_peer_secret(docs, "defaults", "s3nfs-peer")
    again = check_peer_secret(parse(render(REQUIRED, "s3nfs", "s3nfs"), "chart(defaults, again)"), "defaults (again)", "s3nfs-peer")
    check(key != again, "defaults: two installs got the same key pair (it must be generated, not part of the chart)")
    # With a Secret of the user's: the chart makes none and mounts that one.
    own = render(merge(REQUIRED, {"readWriteMany": {"peerSecretName": "own-peer-pair"}}), "s3nfs", "s3nfs")
    check(not own.get(PEER_TEMPLATE, "").strip(), f"peerSecretName: {PEER_TEMPLATE} must render nothing")
    own_docs = parse(own, "chart(peerSecretName)")
    check(not [d for d in own_docs if d["kind"] == "Secret" and d["metadata"]["name"] != "s3nfs-secret"],
          "peerSecretName: the chart must create no key pair Secret")
    check_structure(own_docs, "s3nfs", "peerSecretName")
    check_rwx_on(own_docs, "peerSecretName", "s3nfs", "own-peer-pair", "15s")
    # Off: nothing of it.
    off_docs = parse(render(merge(REQUIRED, {"readWriteMany": {"enabled": False}}), "s3nfs", "s3nfs"), "chart(rwx off)")
    validate([d for d in off_docs if d["kind"] in ("DaemonSet", "ServiceAccount")])
    check_structure(off_docs, "s3nfs", "rwx off")
    check_rwx_off(off_docs, "rwx off", "s3nfs")
    check(sorted(d["kind"] for d in docs if d["kind"] not in ("Secret", "Role", "RoleBinding")) ==
          sorted(d["kind"] for d in off_docs if d["kind"] not in ("Secret", "Role", "RoleBinding")),
          "rwx off: only the key pair Secret and the node plugin's Role and RoleBinding may go")

    # 3, 6. The all-values render, as given and with the secret and StorageClass turned on.
    all_render = render(all_values, "tenant", "storage-system")
    all_docs = parse(all_render, "chart(all-values)")
    validate(all_docs)
    check_structure(all_docs, "storage-system", "all-values")
    full_values = merge(all_values, {"secret": {"create": True}, "storageClass": {"create": True},
                                     "readWriteMany": {"enabled": True}})
    full_docs = parse(render(full_values, "tenant", "storage-system"), "chart(all-values, create)")
    validate([d for d in full_docs if d["kind"] in ("Secret", "StorageClass", "Role", "RoleBinding", "DaemonSet", "ServiceAccount")])
    check_structure(full_docs, "storage-system", "all-values+create")
    check_all_values(all_docs, full_docs, all_values, "\n".join(all_render.values()))
    check_metrics_off(all_docs, "all-values")
    check(all(env_of(container(d["spec"]["template"]["spec"], "s3nfs")).get("S3NFS_LOG_FORMAT") == all_values["logFormat"]
              for d in all_docs if d["kind"] in ("DaemonSet", "Deployment")), "all-values: logFormat not applied")
    # And with metrics on: every metrics value of all-values.yaml in the objects.
    on_values = merge(all_values, {"metrics": {"enabled": True}})
    on_docs = parse(render(on_values, "tenant", "storage-system"), "chart(all-values, metrics)")
    validate([d for d in on_docs if d["kind"] in OPERATOR_KINDS | {"Service", "ConfigMap", "DaemonSet", "Deployment"}])
    check_structure(on_docs, "storage-system", "all-values+metrics")
    m = all_values["metrics"]
    check_metrics_on(on_docs, "all-values+metrics", all_values["fullnameOverride"], m["nodePluginPort"], m["controllerPort"])
    check_monitoring(on_docs, "all-values+metrics", all_values["fullnameOverride"], "storage-system", on_values["metrics"], metrics, dashboard)
    prefix = all_values["fullnameOverride"]
    check_rwx_off(all_docs, "all-values", prefix)
    rwx = all_values["readWriteMany"]
    check_rwx_on(full_docs, "all-values+rwx", prefix, rwx["peerSecretName"], rwx["leaseDuration"])
    check(not [d for d in full_docs if d["kind"] == "Secret" and d.get("type") == "kubernetes.io/tls"],
          "all-values+rwx: with peerSecretName the chart must create no key pair Secret")

    # 5. The plain manifests: valid, and exactly the chart's default render.
    manifest_docs = parse({p.name: p.read_text() for p in sorted(MANIFESTS.glob("*.yaml"))}, "deploy/manifests")
    validate(manifest_docs)
    for problem in render_manifests.stale():
        check(False, f"{problem} (run: python3 deploy/render-manifests.py)")
    fresh = render_manifests.render_chart(render_manifests.EXAMPLE_VALUES)
    fresh = {name: text for name, text in fresh.items() if name not in render_manifests.NOT_MANIFESTS}
    chart_objects = sorted((strip(d) for d in parse(fresh, "chart(example)")), key=repr)
    plain_objects = sorted((strip(d) for d in manifest_docs if d["kind"] != "Namespace"), key=repr)
    check(chart_objects == plain_objects, "deploy/manifests/ does not hold the same objects as the chart's default render")
    namespaces = [d for d in manifest_docs if d["kind"] == "Namespace"]
    check([d["metadata"]["name"] for d in namespaces] == ["s3nfs"], "deploy/manifests/namespace.yaml must create the namespace s3nfs")
    check_structure([d for d in manifest_docs if d["kind"] != "Namespace"], "s3nfs", "manifests")
    # No key pair in the manifests (it would be everyone's): the node plugin mounts a Secret the
    # README's command makes.
    check_rwx_on(manifest_docs, "manifests", "s3nfs", render_manifests.PEER_SECRET, "15s")
    check(not [ident(d) for d in manifest_docs if d["kind"] == "Secret" and d.get("type") == "kubernetes.io/tls"],
          "deploy/manifests/ must not carry a key pair")
    check(f"kubectl -n s3nfs create secret tls {render_manifests.PEER_SECRET} --cert=tls.crt --key=tls.key" in README.read_text(),
          f"deploy/README.md must give the command that makes the Secret {render_manifests.PEER_SECRET}")

    if failures:
        print(f"tests/deploy/check.py: {len(failures)} problem(s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    n = len(docs) + len(all_docs) + len(manifest_docs)
    print(f"tests/deploy/check.py: ok ({n} objects validated against Kubernetes {' and '.join(KUBE_VERSIONS)}, "
          f"{sum(1 for _ in leaves(defaults))} values covered, manifests up to date)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
