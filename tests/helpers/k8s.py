"""Kubernetes checks shared by the deploy tests (test_deploy.py, test_deploy_scale.py): the
API versions manifests are validated against, ``kubectl kustomize``, and strict schema
validation that names the failing field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

K8S_VERSIONS = sorted({"1.33.0", latest_version()})

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="kubectl (its built-in kustomize) is not installed")


def kubectl_kustomize(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder``: what ``kubectl apply -k`` would send."""
    proc = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def validate_k8s(doc: dict[str, Any]) -> None:
    """Fail naming the kind, name, version and field when ``doc`` is not valid."""
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): "
                        f"{where}: {exc.message}")
