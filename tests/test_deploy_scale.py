"""Deployment of the scale-out split: deploy/compose.scale.yml and the k8s scale overlays.

As in test_deploy.py (kept apart: that file is long enough, and imports much), nothing here
runs a container engine or a cluster: the compose file is checked against the Compose
Specification's schema and read for its services, commands, environment and volumes (with
``docker compose config`` when Docker's compose plugin exists); the overlays are rendered
by ``kubectl kustomize`` and every object validated against the Kubernetes schemas, except
CloudNativePG's ``Cluster`` (a CRD the schemas do not know), whose shape is checked here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from helpers.k8s import kubectl_kustomize, needs_kubectl, validate_k8s
from helpers.tools import REPO

from aiworker.config_loader import load_config

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
IMAGE_CONFIG = "/etc/aiworker/aiworker.yaml"  # where the image reads its YAML
SCALE_COMPOSE = DEPLOY / "compose.scale.yml"
AIWORKER_SERVICES = {"receiver-1", "receiver-2", "worker", "worker-infer", "worker-gpu"}
STAGE_QUEUES = "select,results,outbox"


# --- compose ------------------------------------------------------------------------------


def scale_compose() -> dict[str, Any]:
    return yaml.safe_load(SCALE_COMPOSE.read_text())


def substituted(value: str) -> str:
    """A compose value with its ``${NAME:-default}`` references replaced by the defaults."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_the_scale_compose_file_follows_the_compose_specification():
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}"
                for e in validator.iter_errors(scale_compose())]
    assert problems == []
    assert set(scale_compose()["services"]) == {"postgres", "orthanc", *AIWORKER_SERVICES}


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True)
                    .returncode != 0 if shutil.which("docker") else True,
                    reason="docker with the compose plugin is not installed")
def test_docker_compose_accepts_the_scale_file():
    proc = subprocess.run(["docker", "compose", "-f", str(SCALE_COMPOSE), "--profile", "gpu",
                           "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_postgres_is_the_official_image_with_a_volume_and_a_readiness_healthcheck():
    compose = scale_compose()
    postgres = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+", postgres["image"])
    [volume] = postgres["volumes"]
    source, target = volume.split(":")
    assert target == "/var/lib/postgresql/data" and source in compose["volumes"]
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("pg_isready ")
    assert "ports" not in postgres  # only the compose network reaches it


def test_every_aiworker_container_shares_postgres_and_one_spool_volume():
    compose = scale_compose()
    services, env = compose["services"], compose["services"]["postgres"]["environment"]
    for name in AIWORKER_SERVICES:
        service = services[name]
        url = urlsplit(substituted(service["environment"]["AIWORKER_STATE__URL"]))
        assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432), name
        assert (url.username, url.password, url.path) == \
            (env["POSTGRES_USER"], substituted(env["POSTGRES_PASSWORD"]),
             f"/{env['POSTGRES_DB']}"), name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts["/data"] == "aiworker-spool" and "aiworker-spool" in compose["volumes"]
        assert (DEPLOY / mounts[IMAGE_CONFIG]).resolve() == DEPLOY / "aiworker.compose.yaml"
        assert service["command"][1:3] == ["--config", IMAGE_CONFIG], name


def test_two_receivers_on_their_own_host_ports_both_named_as_orthanc_calls_the_node():
    services = scale_compose()["services"]
    modality = json.loads(ORTHANC_JSON.read_text())["DicomModalities"]["aiworker"]
    host_ports = set()
    for name in ("receiver-1", "receiver-2"):
        receiver = services[name]
        assert receiver["command"] == ["serve", "--config", IMAGE_CONFIG, "--role", "receive"]
        dicom = [p for p in receiver["ports"] if p.endswith(f":{modality['Port']}")]
        [published] = [p.split(":")[0] for p in dicom]
        host_ports.add(published)
        assert modality["Host"] in receiver["networks"]["default"]["aliases"]
        assert any(p.startswith("127.0.0.1:") and p.endswith(":8080")
                   for p in receiver["ports"])
    assert host_ports == {"11112", "11113"}


def test_workers_split_the_queues_and_the_gpu_one_reserves_a_gpu_behind_a_profile():
    services = scale_compose()["services"]
    worker, cpu_infer, gpu = services["worker"], services["worker-infer"], services["worker-gpu"]
    assert worker["command"] == ["worker", "--config", IMAGE_CONFIG, "--queues", STAGE_QUEUES]
    assert worker["deploy"]["replicas"] >= 2 and "profiles" not in worker
    for infer in (cpu_infer, gpu):
        assert infer["command"] == ["worker", "--config", IMAGE_CONFIG, "--queues", "infer"]
    assert "profiles" not in cpu_infer
    assert cpu_infer["environment"]["AIWORKER_INFERENCE__DEVICE"] == "cpu"
    assert cpu_infer["image"] == "aiworker:cpu" and cpu_infer["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["profiles"] == ["gpu"]
    assert gpu["image"] == "aiworker:cuda" and gpu["build"]["args"]["VARIANT"] == "cuda"
    assert gpu["environment"]["AIWORKER_INFERENCE__DEVICE"] == "cuda"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # the documented commands
    header = SCALE_COMPOSE.read_text()
    assert "docker compose -f compose.scale.yml up -d --build" in header
    assert "--profile gpu up -d --build --scale worker-infer=0" in header


def node_environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's AIWORKER_ variables with compose's defaults substituted."""
    return {k: substituted(str(v)) for k, v in service["environment"].items()}


@pytest.mark.parametrize("name", sorted(AIWORKER_SERVICES))
def test_each_scale_container_gets_a_valid_node_config(name):
    service = scale_compose()["services"][name]
    config = load_config(DEPLOY / "aiworker.compose.yaml", environ=node_environment(service))
    assert str(config.storage.data_dir) == "/data"
    assert str(config.state.url).startswith("postgresql://aiworker:")
    device = service["environment"].get("AIWORKER_INFERENCE__DEVICE")
    assert device is None or config.inference.device == device


# --- Kubernetes ---------------------------------------------------------------------------




def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    return main


def deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def state_url_source(deployment: dict[str, Any]) -> dict[str, str]:
    [var] = [e for e in container(deployment)["env"] if e["name"] == "AIWORKER_STATE__URL"]
    return var["valueFrom"]["secretKeyRef"]


def claim(deployment: dict[str, Any]) -> str:
    """The PVC mounted at the config's storage.data_dir (/data)."""
    mounts = {m["mountPath"]: m["name"] for m in container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    return volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]


def validate_all(docs: list[dict[str, Any]]) -> None:
    """Every object against the Kubernetes schemas, but the CNPG Cluster (a CRD)."""
    for doc in docs:
        if doc["apiVersion"] != "postgresql.cnpg.io/v1":
            validate_k8s(doc)


@needs_kubectl
def test_the_scale_overlay_has_receivers_behind_the_dicom_service_workers_and_one_spool():
    docs = kubectl_kustomize(K8S / "scale")
    validate_all(docs)
    found = deployments(docs)
    assert set(found) == {"aiworker", "aiworker-worker"}
    receiver, worker = found["aiworker"], found["aiworker-worker"]
    assert receiver["spec"]["replicas"] >= 2
    assert receiver["spec"]["strategy"]["type"] == "RollingUpdate"
    assert container(receiver)["args"] == ["serve", "--config", IMAGE_CONFIG,
                                           "--role", "receive"]
    assert container(worker)["args"] == ["worker", "--config", IMAGE_CONFIG]  # all queues
    assert worker["spec"]["replicas"] >= 1

    # the DICOM Services reach the receivers, never the workers
    receiver_labels = receiver["spec"]["template"]["metadata"]["labels"]
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert selector <= receiver_labels.items() and not selector <= worker_labels.items()

    # one ReadWriteMany spool for all; the single node's RWO claim is gone
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert set(claims) == {"aiworker-spool"}
    assert claims["aiworker-spool"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim(receiver) == claim(worker) == "aiworker-spool"

    # an external server: the URL from the Secret aiworker-state
    for deployment in found.values():
        assert state_url_source(deployment) == {"name": "aiworker-state", "key": "url"}

    # both reach PostgreSQL through their NetworkPolicies
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    for name, labels in (("aiworker", receiver_labels), ("aiworker-worker", worker_labels)):
        spec = policies[name]["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items()
        ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
        assert 5432 in ports, name


@needs_kubectl
def test_the_cuda_scale_overlay_adds_gpu_workers_that_take_the_infer_queue():
    docs = kubectl_kustomize(K8S / "cuda" / "scale")
    validate_all(docs)
    found = deployments(docs)
    assert set(found) == {"aiworker", "aiworker-worker", "aiworker-worker-gpu"}
    gpu, cpu = container(found["aiworker-worker-gpu"]), container(found["aiworker-worker"])
    assert gpu["args"] == ["worker", "--config", IMAGE_CONFIG, "--queues", "infer"]
    assert cpu["args"] == ["worker", "--config", IMAGE_CONFIG, "--queues", STAGE_QUEUES]
    assert gpu["image"] == "aiworker:cuda" and cpu["image"] == "aiworker:cpu"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in gpu["env"]}["AIWORKER_INFERENCE__DEVICE"] == \
        "cuda"
    assert claim(found["aiworker-worker-gpu"]) == "aiworker-spool"
    selectors = [d["spec"]["selector"]["matchLabels"] for d in found.values()]
    assert len({tuple(sorted(s.items())) for s in selectors}) == 3  # no two share pods
    # and the single-node cuda overlay is still one node
    assert set(deployments(kubectl_kustomize(K8S / "cuda"))) == {"aiworker"}


def cnpg_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [cluster] = [d for d in docs if d["kind"] == "Cluster"]
    return cluster


@needs_kubectl
def test_the_cnpg_overlay_runs_postgresql_by_the_operator_and_uses_its_secret():
    docs = kubectl_kustomize(K8S / "scale-cnpg")
    validate_all(docs)
    cluster = cnpg_cluster(docs)
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec, name = cluster["spec"], cluster["metadata"]["name"]
    assert isinstance(spec["instances"], int) and spec["instances"] >= 1
    assert re.fullmatch(r"\d+Gi", spec["storage"]["size"])
    assert set(spec["bootstrap"]) == {"initdb"}
    assert set(spec["bootstrap"]["initdb"]) >= {"database", "owner"}
    assert not any(d["kind"] == "StatefulSet" for d in docs)  # the operator runs it
    for deployment in deployments(docs).values():  # CNPG's application Secret: <cluster>-app
        assert state_url_source(deployment) == {"name": f"{name}-app", "key": "uri"}


@needs_kubectl
def test_the_cnpg_component_also_serves_the_gpu_setup(tmp_path: Path):
    """cuda/scale's kustomization says to uncomment its components line for CNPG: done
    here, every Deployment (the GPU workers too) takes the operator's Secret."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "cuda" / "scale" / "kustomization.yaml"
    text = overlay.read_text()
    enabled = text.replace("# components:\n#   - ../../components/cnpg",
                           "components:\n  - ../../components/cnpg")
    assert enabled != text
    overlay.write_text(enabled)
    docs = kubectl_kustomize(overlay.parent)
    name = cnpg_cluster(docs)["metadata"]["name"]
    found = deployments(docs)
    assert len(found) == 3
    for deployment in found.values():
        assert state_url_source(deployment) == {"name": f"{name}-app", "key": "uri"}


def test_the_cnpg_cluster_manifest_has_the_operators_shape():
    """Without kubectl too: the Cluster file itself (apiVersion, kind, instances, storage)."""
    [cluster] = [d for d in yaml.safe_load_all(
        (K8S / "components" / "cnpg" / "cluster.yaml").read_text()) if d]
    assert (cluster["apiVersion"], cluster["kind"]) == ("postgresql.cnpg.io/v1", "Cluster")
    assert cluster["spec"]["instances"] == 3
    assert cluster["spec"]["storage"]["size"].endswith("Gi")
    assert cluster["spec"]["bootstrap"]["initdb"] == {"database": "aiworker",
                                                      "owner": "aiworker"}
