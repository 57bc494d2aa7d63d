#!/usr/bin/env python3
"""Writes deploy/manifests/ from the Helm chart in deploy/helm/s3nfs.

The plain manifests are the chart rendered with its default values (release and namespace
"s3nfs"), one file per template, plus namespace.yaml. Run this after changing the chart:

    python3 deploy/render-manifests.py          # rewrite deploy/manifests/
    python3 deploy/render-manifests.py --check  # exit 1 if deploy/manifests/ is stale

Rendering uses helm-python-sdk (`pip install helm-python-sdk`), which carries Helm's Go SDK as
a shared library: no helm binary and no cluster are involved. tests/deploy/check.py runs the same
comparison as part of `cargo test`.
"""

from __future__ import annotations

import pathlib
import sys

DEPLOY = pathlib.Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "s3nfs"
MANIFESTS = DEPLOY / "manifests"

RELEASE = "s3nfs"
NAMESPACE = "s3nfs"

# The secret has no default credentials; the example carries placeholders. The ReadWriteMany key
# pair is a Secret the user makes (deploy/README.md has the command): a pair generated at render
# time would be a different one at every run, and the same one in every cluster that applies it.
PEER_SECRET = "s3nfs-peer"
EXAMPLE_VALUES = {
    "secret": {
        "accessKey": "REPLACE-WITH-ACCESS-KEY-ID",
        "secretKey": "REPLACE-WITH-SECRET-ACCESS-KEY",
        "endpoint": "http://minio.minio:9000",
    },
    "readWriteMany": {"peerSecretName": PEER_SECRET},
}

# Template file -> manifest file. NOTES.txt is Helm's message after an install, not an object;
# peer-secret.yaml renders nothing with EXAMPLE_VALUES (see PEER_SECRET).
FILES = {
    "csidriver.yaml": "csidriver.yaml",
    "rbac.yaml": "rbac.yaml",
    "controller.yaml": "controller.yaml",
    "node.yaml": "node.yaml",
    "storageclass.yaml": "storageclass.yaml",
    "secret.yaml": "secret.example.yaml",
    "metrics-service.yaml": "metrics.yaml",
}
# The Prometheus Operator's objects and the dashboard's ConfigMap render only when asked for
# (their CRDs or a Grafana sidecar must be there): the plain manifests leave them out.
NOT_MANIFESTS = {"NOTES.txt", "peer-secret.yaml", "servicemonitor.yaml", "prometheusrule.yaml", "dashboard.yaml"}

HEADER = """\
# Generated from deploy/helm/s3nfs (default values, namespace s3nfs) by
# deploy/render-manifests.py: do not edit, change the chart and run the script again.
# Apply namespace.yaml first, then the rest: kubectl apply -f deploy/manifests/
"""

SECRET_NOTE = """\
# An example: put your credentials and endpoint in it before applying, or create a Secret of
# this name with these keys yourself.
"""

NODE_NOTE = f"""\
# ReadWriteMany needs the Secret {PEER_SECRET} (the node plugins' key pair), which these manifests
# do not create: deploy/README.md has the command that makes it. Without it the node pods do not
# start.
"""

NAMESPACE_YAML = f"""\
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    app.kubernetes.io/name: s3nfs
    # The node plugin is privileged and uses the host's network and the kubelet directory:
    # only the Pod Security "privileged" level admits it.
    pod-security.kubernetes.io/enforce: privileged
"""


def render_chart(
    values: dict | None, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """The chart's templates rendered offline: template file name -> text."""
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    return {path.rsplit("/templates/", 1)[-1]: text for path, text in rendered.items()}


def manifests() -> dict[str, str]:
    """The contents deploy/manifests/ must have: file name -> text."""
    rendered = render_chart(EXAMPLE_VALUES)
    unknown = set(rendered) - set(FILES) - NOT_MANIFESTS
    if unknown:
        raise SystemExit(
            f"render-manifests: template(s) {sorted(unknown)} have no file in deploy/manifests/: "
            "add them to FILES in deploy/render-manifests.py"
        )
    if rendered.get("peer-secret.yaml", "").strip():
        raise SystemExit("render-manifests: the chart generated a key pair; deploy/manifests/ must not carry one")
    files = {"namespace.yaml": HEADER + "\n" + NAMESPACE_YAML}
    notes = {"secret.example.yaml": SECRET_NOTE, "node.yaml": NODE_NOTE}
    for template, name in FILES.items():
        note = notes.get(name, "")
        files[name] = HEADER + note + "\n" + rendered[template].strip() + "\n"
    return files


def stale() -> list[str]:
    """What differs between deploy/manifests/ and a fresh render (empty when up to date)."""
    want = manifests()
    have = {p.name: p.read_text() for p in MANIFESTS.glob("*") if p.is_file()}
    problems = []
    for name in sorted(set(want) | set(have)):
        if name not in have:
            problems.append(f"deploy/manifests/{name} is missing")
        elif name not in want:
            problems.append(f"deploy/manifests/{name} is not produced by the chart")
        elif have[name] != want[name]:
            problems.append(f"deploy/manifests/{name} differs from the chart's render")
    return problems


def main(argv: list[str]) -> int:
    if argv[1:] == ["--check"]:
        problems = stale()
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            print("run: python3 deploy/render-manifests.py", file=sys.stderr)
        return 1 if problems else 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    MANIFESTS.mkdir(exist_ok=True)
    want = manifests()
    for p in MANIFESTS.glob("*"):
        if p.is_file() and p.name not in want:
            p.unlink()
    for name, text in want.items():
        (MANIFESTS / name).write_text(text)
    print(f"wrote {len(want)} files to {MANIFESTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
