"""Deployment: the image, the compose file with Orthanc, the Kubernetes manifests.

The test machines run no container engine and no cluster, so each file is checked by what
does run here: the Dockerfile by hadolint; the install steps by running scripts/install.sh,
the one script both the image and ``make run``/``make test`` install through; the compose
files against the Compose Specification's JSON schema, and their Orthanc configuration and
Lua auto-routing in a real (Debian) Orthanc that forwards a phantom knee study to a real node
started from the compose node config and gets the results back; the manifests against the
Kubernetes schemas (kubernetes-validate, strict), the CUDA overlay with its patch applied;
every node config they ship through :func:`aiworker.config_loader.load_config`.
"""

from __future__ import annotations

import ast
import copy
import http.server
import json
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pydicom
import pytest
import yaml
from helpers.k8s import K8S_VERSIONS, kubectl_kustomize, needs_kubectl, validate_k8s
from helpers.node import NodeProcess
from helpers.orthanc import OrthancProcess
from helpers.tools import REPO, dcmtk, deep_merge, free_port, needs_dcmtk, needs_orthanc, wait_until
from test_infer_e2e import HELD_OUT_SEED, needs_knee_demo

from aiworker.config import Config
from aiworker.config_loader import load_config
from aiworker.phantom.protocol import Overrides
from aiworker.phantom.study import StudyOptions, write_study
from aiworker.select.rules import resolve_rules_path

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_BASE = K8S / "base"  # the kustomize base; k8s/ itself and k8s/cuda build on it
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CUDA = DEPLOY / "docker-compose.cuda.yml"
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
ROUTE_LUA = DEPLOY / "orthanc" / "aiworker-route.lua"
COMPOSE_SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
HADOLINT = Path(sys.executable).parent / "hadolint"
INSTALL = REPO / "scripts" / "install.sh"
IMAGE_CONFIG = "/etc/aiworker/aiworker.yaml"  # where the image reads its YAML
# the Kubernetes versions the manifests must validate against: a widely run one and the
# newest kubernetes-validate ships


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def instructions(keyword: str) -> list[str]:
    return [args for key, args in dockerfile() if key == keyword]


def stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each stage (``FROM ... AS name``), in order."""
    found: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for key, args in dockerfile():
        if key == "FROM":
            current = found.setdefault(args.split()[-1], [])
        current.append((key, args))
    return found


def image_env(stage: str = "runtime") -> dict[str, str]:
    """The ENV a stage sets (KEY=VALUE pairs; the runtime stage's: the image's)."""
    env: dict[str, str] = {}
    for key, args in stages()[stage]:
        if key == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(args)))
    return env


def stage_args(stage: str) -> dict[str, str]:
    """The ARGs a stage declares, with their defaults (shell-unquoted; none: '')."""
    declared = [args.partition("=") for key, args in stages()[stage] if key == "ARG"]
    return {name: "".join(shlex.split(default)) for name, _, default in declared}


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path):
    proc = subprocess.run([str(HADOLINT), "--no-color", "-f", "json", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    findings = json.loads(proc.stdout or "null")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}"
                                     for f in findings or [])
    assert proc.returncode == 0, proc.stderr


def test_the_image_is_multi_stage_slim_non_root_with_a_data_volume_and_both_ports():
    bases = instructions("FROM")
    assert len(bases) == 2 and bases[0].endswith(" AS build") and bases[1].endswith(" AS runtime")
    [base_arg] = [a for a in instructions("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", base_arg)
    assert "VARIANT=cpu" in instructions("ARG")  # CPU by default, --build-arg VARIANT=cuda
    [user] = instructions("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    assert instructions("VOLUME") == ['["/data"]']
    assert set(instructions("EXPOSE")[0].split()) == {"11112", "8080"}
    env = image_env()
    assert env["AIWORKER_STORAGE__DATA_DIR"] == "/data"
    assert env["AIWORKER_WEB__HOST"] == env["AIWORKER_NODE__HOST"] == "0.0.0.0"
    assert "/opt/venv/bin" in env["PATH"].split(":")[0]
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["aiworker"]
    assert json.loads(instructions("CMD")[0]) == ["serve"]
    assert env["AIWORKER_CONFIG"] == IMAGE_CONFIG  # every command, docker exec ... status too
    assert f"config/aiworker.yaml {IMAGE_CONFIG}" in instructions("COPY")
    assert "--from=build /opt/venv /opt/venv" in instructions("COPY")


def healthcheck_command() -> list[str]:
    [check] = instructions("HEALTHCHECK")
    return json.loads(check[check.index("CMD") + 3:].strip())


def test_the_healthcheck_asks_healthz_on_the_web_port_with_python_alone():
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    code = command[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "/healthz" in code and "AIWORKER_WEB__PORT" in code and "'8080'" in code


def test_the_healthcheck_passes_while_healthz_answers_and_fails_when_it_does_not(tmp_path):
    """The HEALTHCHECK one-liner run here (with this venv's python) against a real HTTP
    server on a free port: exit 0 on a 200 from /healthz, non-zero on a 503 and when
    nothing listens."""
    server = tmp_path / "server.py"
    server.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        code = 200 if self.path == '/healthz' and sys.argv[2] == 'up' else 503\n"
        "        self.send_response(code); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    command = [sys.executable, *healthcheck_command()[1:]]

    def check(port: int) -> int:
        return subprocess.run(command, env={"AIWORKER_WEB__PORT": str(port)},
                              capture_output=True, timeout=30).returncode

    for state, expected_ok in (("up", True), ("down", False)):
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(server), str(port), state])
        try:
            wait_until(lambda p=port: _answers(p), 10, "the stand-in web server")
            assert (check(port) == 0) is expected_ok, state
        finally:
            proc.terminate()
            proc.wait(10)
    assert check(free_port()) != 0


def test_the_healthcheck_passes_against_a_running_node_and_fails_once_it_stopped(
        node_factory):
    """The HEALTHCHECK one-liner against ``aiworker serve``'s own web server."""
    web_port = free_port()
    node = node_factory(web={"host": "127.0.0.1", "port": web_port})
    command = [sys.executable, *healthcheck_command()[1:]]
    env = {"AIWORKER_WEB__PORT": str(web_port)}
    wait_until(lambda: _answers(web_port), 20, "the node's web server")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    node.stop()
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


def _answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True

# --- hospital networks: a package mirror and an extra CA ----------------------------------

PIP_MIRROR_ARGS = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST")
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's merged trust store
LOCAL_CAS = "/usr/local/share/ca-certificates"


def install_step_index(stage: list[tuple[str, str]]) -> int:
    [index] = [i for i, (key, args) in enumerate(stage)
               if key == "RUN" and "scripts/install.sh" in args]
    return index


def test_a_package_mirror_reaches_pip_as_build_args_the_image_does_not_keep():
    """pip reads PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_TRUSTED_HOST from the
    environment, which the build stage's ARGs are for its RUN steps: declared before the
    install step, empty by default, and never ENV (a mirror's URL stays out of the image)."""
    build = stages()["build"]
    args = stage_args("build")
    names = [key_args.partition("=")[0] for key, key_args in build[:install_step_index(build)]
             if key == "ARG"]
    for name in (*PIP_MIRROR_ARGS, "TORCH_INDEX_URL", "EXTRA_CA_CERT"):
        assert name in names, f"ARG {name} before the install step"
        assert args[name] == "", f"{name} empty by default"
    for stage in stages():
        assert not set(PIP_MIRROR_ARGS) & set(image_env(stage)), stage
    assert not set(PIP_MIRROR_ARGS) & set(stage_args("runtime"))


def pip_index_options(environ: dict[str, str]) -> tuple[str, list[str], list[str], str]:
    """What this venv's pip install makes of ``environ``: index URL, extra index URLs,
    trusted hosts, CA bundle."""
    code = ("from pip._internal.commands import create_command\n"
            "o, _ = create_command('install').parse_args([])\n"
            "print(repr((o.index_url, o.extra_index_urls, o.trusted_hosts, o.cert)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                                           "PIP_CONFIG_FILE": "/dev/null", **environ})
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout)


def test_pip_takes_the_mirror_build_args_and_ignores_them_left_empty():
    given = {"PIP_INDEX_URL": "https://mirror.example.org/pypi/simple",
             "PIP_EXTRA_INDEX_URL": "https://mirror.example.org/extra/simple",
             "PIP_TRUSTED_HOST": "mirror.example.org", "PIP_CERT": BUNDLE}
    assert set(given) == {*PIP_MIRROR_ARGS, "PIP_CERT"}
    assert pip_index_options(given) == (given["PIP_INDEX_URL"], [given["PIP_EXTRA_INDEX_URL"]],
                                        ["mirror.example.org"], BUNDLE)
    defaults = {name: stage_args("build")[name] for name in PIP_MIRROR_ARGS}
    index, extra, trusted, _ = pip_index_options(defaults)
    assert (index, extra, trusted) == ("https://pypi.org/simple", [], [])


def test_both_stages_trust_the_merged_system_bundle():
    build, runtime = image_env("build"), image_env("runtime")
    assert build["PIP_CERT"] == build["REQUESTS_CA_BUNDLE"] == build["SSL_CERT_FILE"] == BUNDLE
    assert runtime["REQUESTS_CA_BUNDLE"] == runtime["SSL_CERT_FILE"] == BUNDLE
    stage = stages()["runtime"]
    copy = stage.index(("COPY", f"--from=build {LOCAL_CAS}/ {LOCAL_CAS}/"))
    [update] = [i for i, (key, args) in enumerate(stage)
                if key == "RUN" and args.startswith("update-ca-certificates")]
    [user] = [i for i, (key, _) in enumerate(stage) if key == "USER"]
    assert copy < update < user  # as root, before the node's user takes over


def openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key) with common name ``name``."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", key, "-out", cert)
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for localhost signed by ``ca``."""
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key,
            "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
            "-days", "2", "-extfile", ext, "-out", cert)
    return cert, key


def run_ca_step(tmp_path: Path, pem: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The build stage's extra-CA RUN step, run here with sh and the real
    update-ca-certificates on folders under tmp_path instead of the system's; returns the
    merged bundle it wrote."""
    [step] = [args for key, args in stages()["build"]
              if key == "RUN" and "EXTRA_CA_CERT" in args]
    local, etc, hooks = tmp_path / "local", tmp_path / "etc", tmp_path / "hooks"
    for folder in (local, etc, hooks):
        folder.mkdir()
    update = (f"update-ca-certificates --certsconf /etc/ca-certificates.conf "
              f"--localcertsdir {local} --etccertsdir {etc} --hooksdir {hooks}")
    script = (step.replace(LOCAL_CAS, str(local)).replace("/tmp/extra-ca.pem",
                                                          str(tmp_path / "extra-ca.pem"))
              .replace("update-ca-certificates", update))
    proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EXTRA_CA_CERT": pem})
    assert proc.returncode == 0, proc.stderr
    return etc / "ca-certificates.crt", proc


def https_get_status(port: int, bundle: Path) -> int:
    """Exit status of urllib fetching https://localhost:port/ in a fresh Python whose
    SSL_CERT_FILE is ``bundle``, as in the image (0 when the certificate is trusted)."""
    code = (f"import urllib.request; urllib.request.urlopen('https://localhost:{port}/', "
            f"timeout=10)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          env={"SSL_CERT_FILE": str(bundle)}).returncode


needs_update_ca = pytest.mark.skipif(
    shutil.which("update-ca-certificates", path="/usr/sbin:/usr/bin") is None
    or not Path("/etc/ca-certificates.conf").is_file() or shutil.which("openssl") is None,
    reason="needs Debian's update-ca-certificates and openssl")


@needs_update_ca
def test_extra_ca_certificates_join_the_trust_store_and_python_then_trusts_their_servers(
        tmp_path):
    """EXTRA_CA_CERT holding two PEM certificates: each becomes a .crt of its own, the merged
    bundle has both beside the system's, and a Python pointed at it by SSL_CERT_FILE trusts a
    TLS server whose certificate the hospital's CA signed (and did not before)."""
    certs = tmp_path / "certs"
    certs.mkdir()
    hospital = make_ca(certs, "Hospital Root CA")
    proxy, _ = make_ca(certs, "Inspecting Proxy CA")
    pem = hospital[0].read_text() + proxy.read_text()
    bundle, proc = run_ca_step(tmp_path, pem)
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == \
        ["aiworker-extra-1.crt", "aiworker-extra-2.crt"]
    assert (tmp_path / "local" / "aiworker-extra-1.crt").read_text().strip() == \
        hospital[0].read_text().strip()
    merged = bundle.read_text()
    assert hospital[0].read_text().strip() in merged and proxy.read_text().strip() in merged
    assert merged.count("BEGIN CERTIFICATE") > 2  # the system's CAs stay
    for n in (1, 2):  # each has its link in the certificate folder (OpenSSL's CApath)
        assert (bundle.parent / f"aiworker-extra-{n}.pem").resolve() == \
            (tmp_path / "local" / f"aiworker-extra-{n}.crt").resolve()

    server_cert, server_key = make_server_cert(certs, hospital)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert, server_key)
    httpd = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        port = httpd.server_address[1]
        assert https_get_status(port, bundle) == 0
        assert https_get_status(port, Path("/etc/ssl/certs/ca-certificates.crt")) != 0
    finally:
        httpd.shutdown()
        httpd.server_close()


@needs_update_ca
def test_no_extra_ca_leaves_the_trust_store_alone(tmp_path):
    bundle, proc = run_ca_step(tmp_path, "")
    assert list((tmp_path / "local").iterdir()) == [] and not bundle.exists()
    assert proc.stdout == ""


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps ``path`` (the last matching .dockerignore line wins;
    a folder that is let in lets in what is below it)."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(f"{regex}(/.*)?", path):
            allowed = negate
    return allowed


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_local_state():
    sources = [args.split()[:-1] for args in instructions("COPY") if "--from" not in args]
    copied = [src for group in sources for src in group]
    assert set(copied) == {"pyproject.toml", "README.md", "scripts/install.sh", "aiworker",
                           "config", "config/aiworker.yaml"}
    for src in copied:
        assert (REPO / src).exists(), src
        assert dockerignore_allows(src), f"{src} is excluded by .dockerignore"
    for local in (".venv/bin/python", "var/state.db", ".git/HEAD", "tests/test_deploy.py",
                  "aiworker/__pycache__/cli.cpython-311.pyc",
                  "aiworker/models/knee_demo/checkpoint.pt"):
        assert not dockerignore_allows(local), f"{local} would be sent to the build"
    assert dockerignore_allows("aiworker/models/knee_demo/model.pt")


# --- the one install script ---------------------------------------------------------------


def test_make_and_the_image_install_through_the_one_script():
    makefile = (REPO / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert stamp, "the Makefile's $(STAMP) rule"
    assert "scripts/install.sh" in stamp.group(1)  # a changed script reinstalls
    recipe = stamp.group(2)
    assert "sh scripts/install.sh --venv $(VENV) --editable --extras test" in recipe
    assert "pip install" not in makefile
    runs = " ".join(instructions("RUN"))
    assert "sh scripts/install.sh --venv /opt/venv" in runs
    assert 'AIWORKER_TORCH="${VARIANT}"' in runs
    assert "pip install" not in runs


def install_dry_run(variant: str | None, *args: str, index: str | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin"}
    if variant is not None:
        env["AIWORKER_TORCH"] = variant
    if index is not None:
        env["TORCH_INDEX_URL"] = index
    return subprocess.run(["sh", str(INSTALL), "--dry-run", "--venv", "/nonexistent/venv",
                           *args], capture_output=True, text=True, env=env, timeout=30)


def torch_pin() -> str:
    [pin] = re.findall(r'"(torch==[^"]+)"', (REPO / "pyproject.toml").read_text())
    return pin


@pytest.mark.parametrize(("variant", "index", "torch_line"), [
    (None, None, None),
    ("auto", None, None),
    ("cpu", None, "{pin} --index-url https://download.pytorch.org/whl/cpu"),
    ("cuda", None, "{pin}"),
    ("cuda", "https://example.org/whl/cu128", "{pin} --index-url https://example.org/whl/cu128"),
])
def test_the_install_script_picks_the_torch_build_of_the_variant(variant, index, torch_line):
    proc = install_dry_run(variant, index=index)
    assert proc.returncode == 0, proc.stderr
    steps = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    pip = "/nonexistent/venv/bin/python -m pip install -q"
    expected = ["python3 -m venv /nonexistent/venv", f"{pip} --upgrade pip"]
    if torch_line is not None:
        expected.append(f"{pip} {torch_line.format(pin=torch_pin())}")
    assert steps == [*expected, f"{pip} ."]
    assert proc.stdout.rstrip().endswith("dry run: nothing installed")


def test_the_install_script_installs_editable_with_extras_for_make():
    proc = install_dry_run(None, "--editable", "--extras", "test")
    assert proc.returncode == 0, proc.stderr
    assert "+ /nonexistent/venv/bin/python -m pip install -q -e .[test]" in proc.stdout


@pytest.mark.parametrize(("args", "variant", "message"), [
    ((), "gpu", "AIWORKER_TORCH must be auto, cpu or cuda (got 'gpu')"),
    (("--venv",), "cpu", "usage: sh scripts/install.sh"),
    (("--frobnicate",), "cpu", "usage: sh scripts/install.sh"),
])
def test_the_install_script_refuses_what_it_does_not_know(args, variant, message):
    proc = install_dry_run(variant, *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert "+ " not in proc.stdout  # nothing was started


def test_the_install_script_is_posix_sh():
    proc = subprocess.run(["sh", "-n", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert INSTALL.read_text().startswith("#!/bin/sh\n")


# --- compose with Orthanc -----------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def orthanc_json() -> dict[str, Any]:
    return json.loads(ORTHANC_JSON.read_text())


def compose_node_config() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "aiworker.compose.yaml").read_text())


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CUDA], ids=lambda p: p.name)
def test_the_compose_files_follow_the_compose_specification(path):
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}"
                for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
    assert problems == []


def test_the_compose_schema_catches_a_mistake():
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    broken = compose()
    broken["services"]["aiworker"]["portz"] = broken["services"]["aiworker"].pop("ports")
    assert any("portz" in e.message for e in validator.iter_errors(broken))


def volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """target path -> source of a service's short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}


def test_compose_wires_orthanc_and_the_node_to_each_other():
    services = compose()["services"]
    orthanc, node = services["orthanc"], services["aiworker"]
    settings, config = orthanc_json(), compose_node_config()
    assert orthanc["image"].startswith("orthancteam/orthanc:")

    # Orthanc: its config and the Lua route mounted where the config says
    mounts = volume_targets(orthanc)
    assert (DEPLOY / mounts["/etc/orthanc/orthanc.json"]).resolve() == ORTHANC_JSON
    assert settings["LuaScripts"] == ["/etc/orthanc/aiworker-route.lua"]
    assert (DEPLOY / mounts["/etc/orthanc/aiworker-route.lua"]).resolve() == ROUTE_LUA
    assert "/var/lib/orthanc/db" in mounts

    # Orthanc knows the node as the modality "aiworker" the Lua route sends to
    modality = settings["DicomModalities"]["aiworker"]
    assert modality == {"AET": config["node"]["ae_title"], "Host": "aiworker",
                        "Port": config["node"]["port"]}
    assert "local NODE = 'aiworker'" in ROUTE_LUA.read_text()
    assert "AiworkerRouted" in settings["UserMetadata"]

    # the node: its config mounted where the image reads it, /data a volume, both ports
    node_mounts = volume_targets(node)
    assert (DEPLOY / node_mounts[IMAGE_CONFIG]).resolve() == DEPLOY / "aiworker.compose.yaml"
    assert node_mounts["/data"] in compose()["volumes"]
    assert {p.rsplit(":", 1)[-1] for p in node["ports"]} == {"11112", "8080"}
    assert "127.0.0.1:8080:8080" in node["ports"]  # the dashboard stays on the host
    assert node["build"]["context"] == ".." and node["build"]["args"]["VARIANT"] == "cpu"

    # and sends its results back to Orthanc, which it lets call in
    pacs = config["destinations"]["pacs"]
    assert (pacs["host"], pacs["port"], pacs["ae_title"]) == \
        ("orthanc", settings["DicomPort"], settings["DicomAet"])
    assert {"ae_title": settings["DicomAet"]} in config["node"]["allowed_callers"]
    [pipeline] = config["pipelines"]
    assert pipeline["send_to"] == ["pacs"]


def test_the_cuda_compose_override_asks_for_a_gpu_and_the_cuda_image():
    node = yaml.safe_load(COMPOSE_CUDA.read_text())["services"]["aiworker"]
    assert node["build"]["args"]["VARIANT"] == "cuda"
    [device] = node["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert node["environment"]["AIWORKER_INFERENCE__DEVICE"] == "cuda"


def compose_environment() -> dict[str, str]:
    """The AIWORKER_ variables the node's container gets: the image's ENV, then the compose
    file's environment (its ${...:-} defaults substituted)."""
    env = {k: v for k, v in image_env().items() if k.startswith("AIWORKER_")}
    for key, value in compose()["services"]["aiworker"]["environment"].items():
        env[key] = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
    return env


def test_compose_takes_each_variable_from_the_host_under_its_own_name():
    """``AIWORKER_WEB__TOKEN=... docker compose up`` sets the node's AIWORKER_WEB__TOKEN (one
    name on both sides, the config's AIWORKER_<SECTION>__<KEY>), and the build args come
    from host variables named as the Dockerfile's ARGs."""
    node = compose()["services"]["aiworker"]
    for key, value in node["environment"].items():
        host = re.fullmatch(r"\$\{(\w+):-[^}]*\}", str(value))
        assert host is None or host.group(1) == key, (key, value)
    assert node["environment"]["AIWORKER_WEB__TOKEN"] == "${AIWORKER_WEB__TOKEN:-}"
    build_args = stage_args("build")
    forwarded = {k: v for k, v in node["build"]["args"].items() if k != "VARIANT"}
    assert set(forwarded) == {*PIP_MIRROR_ARGS, "TORCH_INDEX_URL", "EXTRA_CA_CERT"}
    for key, value in forwarded.items():
        assert value == f"${{{key}:-}}" and key in build_args, key


def test_the_compose_node_reads_the_mounted_config_for_every_command():
    node = compose()["services"]["aiworker"]
    assert "command" not in node  # the image's CMD: serve, reading AIWORKER_CONFIG
    config = compose_environment()["AIWORKER_CONFIG"]
    assert (DEPLOY / volume_targets(node)[config]).resolve() == \
        DEPLOY / "aiworker.compose.yaml"


def test_the_compose_node_config_is_a_valid_node_config():
    config = load_config(DEPLOY / "aiworker.compose.yaml", environ=compose_environment())
    assert str(config.storage.data_dir) == "/data"
    assert config.web.host == "0.0.0.0" and config.web.port == 8080
    assert config.node.port == 11112
    assert_rules_resolve(config)


def assert_rules_resolve(config: Config) -> None:
    """Every pipeline's rule file exists where the image has it (/app/config/rules, the
    working directory: here the repository)."""
    for pipeline in config.pipelines:
        assert not pipeline.rules.is_absolute()
        assert (REPO / pipeline.rules).is_file() or resolve_rules_path(pipeline.rules).is_file()


# --- Orthanc auto-routing, for real -------------------------------------------------------


def routing_orthanc(workdir: Path, node_port: int) -> OrthancProcess:
    """Debian's Orthanc run with deploy/orthanc/orthanc.json and the Lua route, on free
    loopback ports, its storage under ``workdir``, the node at ``node_port``."""
    shipped = {k: v for k, v in orthanc_json().items()
               if k not in ("DicomPort", "HttpPort", "StorageDirectory", "IndexDirectory")}
    return OrthancProcess(workdir, {}, deep_merge(shipped, {
        "RemoteAccessAllowed": False, "Plugins": [], "StableAge": 1,
        "LuaScripts": [str(ROUTE_LUA)],
        "DicomModalities": {"aiworker": {"Host": "127.0.0.1", "Port": node_port}}}))


def routing_node(tmp_path: Path) -> NodeProcess:
    """A node started from deploy/aiworker.compose.yaml, moved onto loopback and free ports,
    its data under tmp_path, series complete after 1 s; the Orthanc it sends to is set once
    Orthanc has its port (:func:`point_at`)."""
    config = deep_merge(compose_node_config(), {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(tmp_path / "node-var"), "min_free_mb": 1},
        "completion": {"series_stable_seconds": 1.0},
        "web": {"host": "127.0.0.1", "port": free_port()},
        "dispatch": {"interval_s": 0.2}})
    return NodeProcess(tmp_path, "node", config)


def non_knee_study(root: Path) -> list[Path]:
    """A one-series MR shoulder study (a phantom relabelled): Orthanc must keep it."""
    written = write_study(root, StudyOptions(seed=HELD_OUT_SEED + 1, rescan=False,
                                             derived=False, truth=False,
                                             overrides=Overrides(("sag_pd_fs",), 64, 5)))
    for path in written.files:
        ds = pydicom.dcmread(path)
        ds.BodyPartExamined, ds.StudyDescription = "SHOULDER", "MR SHOULDER RIGHT"
        ds.SeriesDescription = "PD FS SAG"
        ds.save_as(path)
    return written.files


@needs_orthanc
@needs_dcmtk
@needs_knee_demo
def test_orthanc_routes_a_knee_mr_study_to_the_node_and_gets_the_results_back(tmp_path):
    node = routing_node(tmp_path)
    orthanc = routing_orthanc(tmp_path, node.port)
    try:
        node.reconfigure(destinations={"pacs": {"host": "127.0.0.1",
                                                "port": orthanc.dicom_port}})
        node.start()
        run_the_route(node, orthanc, tmp_path)
    finally:
        node.close()
        orthanc.kill()


def run_the_route(node: NodeProcess, orthanc: OrthancProcess, tmp_path: Path) -> None:
    """A modality sends a knee MR study and a shoulder MR study to Orthanc; only the knee
    study reaches the node, and its results come back into the same study at Orthanc,
    never to be forwarded again."""
    knee = write_study(tmp_path / "knee", StudyOptions(
        seed=HELD_OUT_SEED, rescan=False, derived=False, truth=False,
        overrides=Overrides(roles=("localizer", "sag_pd_fs", "sag_t1"))))
    shoulder = non_knee_study(tmp_path / "shoulder")
    shoulder_uid = str(pydicom.dcmread(shoulder[0]).StudyInstanceUID)
    for folder in (knee.dicom_dir, shoulder[0].parent):
        proc = dcmtk("storescu", "+sd", "+r", "-aec", "ORTHANC", "127.0.0.1",
                     str(orthanc.dicom_port), folder)
        assert proc.returncode == 0, proc.stdout

    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in knee.files}
    wait_until(lambda: node.instance_count() == len(sent), 60,
               f"Orthanc to forward the knee study's {len(sent)} instances to the node")

    def results() -> list[dict[str, Any]]:
        found = [s for s in orthanc.series(knee.study_uid)
                 if s["MainDicomTags"].get("Manufacturer") == "aiworker"]
        return found if {"SEG", "SR"} <= {s["MainDicomTags"]["Modality"] for s in found} \
            else []

    returned = wait_until(results, 240, "the node's SEG and SR back in Orthanc's study",
                          interval=0.5)
    # the study is stable again (StableAge 1 s) with the results in it: nothing more is sent
    wait_until(lambda: orthanc.study(knee.study_uid)["IsStable"], 30, "the study stable")
    time.sleep(3)
    received = {r["sop_uid"] for r in node.sql("SELECT sop_uid FROM instances")}
    assert received == sent, "the node got exactly the modality's MR instances, once"
    assert node.log_text().count("association released: calling AE ORTHANC") == 1

    marked = {s["ID"] for s in orthanc.series(knee.study_uid)
              if "AiworkerRouted" in orthanc.get(f"/series/{s['ID']}/metadata")}
    mr = {s["ID"] for s in orthanc.series(knee.study_uid)
          if s["MainDicomTags"]["Modality"] == "MR"}
    assert marked == mr and len(mr) == 3
    assert not marked & {s["ID"] for s in returned}
    assert f"sent 3 MR series of study {orthanc.study(knee.study_uid)['ID']}" \
        in orthanc.log_text()

    # the shoulder study stayed at Orthanc
    assert orthanc.study(shoulder_uid)["IsStable"]
    assert not [s for s in orthanc.series(shoulder_uid)
                if "AiworkerRouted" in orthanc.get(f"/series/{s['ID']}/metadata")]
    assert node.study_status(shoulder_uid) is None


# --- Kubernetes ---------------------------------------------------------------------------


def k8s_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def generated_configmaps(folder: Path = K8S_BASE) -> list[dict[str, Any]]:
    """The ConfigMaps of a kustomization's configMapGenerator, as kustomize makes them but
    named without the content hash it appends (and writes into what references them): one
    data key per file, its name the file's, its text the file's."""
    maps = []
    for generator in kustomization(folder).get("configMapGenerator", []):
        assert set(generator) <= {"name", "files", "options"}, generator
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        labels = generator.get("options", {}).get("labels", {})
        maps.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": generator["name"], "labels": labels},
                     "data": data})
    return maps


def base_resources() -> list[dict[str, Any]]:
    """Every resource the base kustomization lists, in order, then the ConfigMaps it
    generates."""
    return [doc for name in kustomization(K8S_BASE)["resources"]
            for doc in k8s_documents(K8S_BASE / name)] + generated_configmaps()


def resource(kind: str, name: str, resources: list[dict[str, Any]] | None = None,
             ) -> dict[str, Any]:
    [found] = [r for r in resources or base_resources()
               if r["kind"] == kind and r["metadata"]["name"] == name]
    return found



def test_the_base_kustomization_lists_every_manifest_in_the_folder():
    listed = kustomization(K8S_BASE)["resources"]
    generated = [f for g in kustomization(K8S_BASE)["configMapGenerator"] for f in g["files"]]
    assert generated == ["aiworker.yaml"]  # the node's config, not a manifest
    on_disk = sorted(p.name for p in K8S_BASE.glob("*.yaml")
                     if p.name not in ("kustomization.yaml", *generated))
    assert sorted(listed) == on_disk
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in base_resources())
    assert kinds == [("ConfigMap", "aiworker-config"), ("Deployment", "aiworker"),
                     ("NetworkPolicy", "aiworker"), ("PersistentVolumeClaim", "aiworker-data"),
                     ("Service", "aiworker"), ("Service", "aiworker-dicom")]
    # the name keeps kustomize's content hash, so an edited config rolls the pod
    assert not kustomization(K8S_BASE).get("generatorOptions", {}).get("disableNameSuffixHash")


def test_kubectl_apply_k_of_the_k8s_folder_and_the_cuda_overlay_both_build_on_the_base():
    """A kustomize base may not contain its overlays (kustomize refuses the cycle), so the
    base has its own folder; deploy/k8s itself is the CPU setup on top of it."""
    assert kustomization(K8S)["resources"] == ["base"]
    assert not (set(kustomization(K8S)) - {"apiVersion", "kind", "resources"})
    assert kustomization(K8S / "cuda")["resources"] == ["../base"]
    assert sorted(p.name for p in K8S.glob("*.yaml")) == ["kustomization.yaml"]


def test_every_base_manifest_validates_against_the_kubernetes_schemas():
    for doc in base_resources():
        validate_k8s(doc)


def test_the_schemas_catch_a_mistake():
    broken = copy.deepcopy(resource("Deployment", "aiworker"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    return main


def configmap_config(environ: dict[str, str] | None = None) -> Config:
    """The generated ConfigMap's aiworker.yaml through load_config, with ``environ`` on
    top."""
    text = resource("ConfigMap", "aiworker-config")["data"]["aiworker.yaml"]
    return load_config_text(text, environ or {})


def load_config_text(text: str, environ: dict[str, str]) -> Config:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "aiworker.yaml"
        path.write_text(text)
        return load_config(path, environ=environ)


def test_the_configmap_is_a_valid_node_config():
    config = configmap_config()
    assert str(config.storage.data_dir) == "/data"
    assert config.web.host == "0.0.0.0"
    assert config.node.allowed_callers, "the example names who may send"
    assert_rules_resolve(config)


def test_the_deployment_runs_the_image_as_configured_with_probes_and_a_volume():
    deployment = resource("Deployment", "aiworker")
    spec, main = deployment["spec"], container(deployment)
    config = configmap_config()
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert main["image"] == "aiworker:cpu"
    assert main["args"] == json.loads(instructions("CMD")[0]) == ["serve"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["AIWORKER_CONFIG"] == image_env()["AIWORKER_CONFIG"] == IMAGE_CONFIG

    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"dicom": config.node.port, "web": config.web.port}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "web"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "web"}
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"

    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes[mounts[str(config.storage.data_dir)]]["persistentVolumeClaim"] == \
        {"claimName": "aiworker-data"}
    assert volumes[mounts[str(Path(IMAGE_CONFIG).parent)]]["configMap"] == \
        {"name": "aiworker-config"}
    assert resource("PersistentVolumeClaim", "aiworker-data")["spec"]["accessModes"] == \
        ["ReadWriteOnce"]

    pod_security = spec["template"]["spec"]["securityContext"]
    [user] = instructions("USER")
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == user.split(":")[0]
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(main["resources"]["requests"]) & \
        set(main["resources"]["limits"])


def test_the_services_reach_the_dicom_and_web_ports():
    deployment = resource("Deployment", "aiworker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    names = {p["name"] for p in container(deployment)["ports"]}
    inside = resource("Service", "aiworker")["spec"]
    assert inside["selector"].items() <= labels.items()
    assert {(p["port"], p["targetPort"]) for p in inside["ports"]} == \
        {(11112, "dicom"), (8080, "web")}
    outside = resource("Service", "aiworker-dicom")["spec"]
    assert outside["type"] == "LoadBalancer" and outside["externalTrafficPolicy"] == "Local"
    assert [p["targetPort"] for p in outside["ports"]] == ["dicom"]
    assert {p["targetPort"] for p in inside["ports"] + outside["ports"]} <= names


def json_patch(doc: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """``doc`` with the JSON Patch (RFC 6902) ``add``/``replace`` operations applied."""
    doc = copy.deepcopy(doc)
    for op in operations:
        assert op["op"] in ("add", "replace"), op
        *parents, last = [part.replace("~1", "/").replace("~0", "~")
                          for part in op["path"].lstrip("/").split("/")]
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if isinstance(target, list):
            if last == "-":
                target.append(op["value"])
            else:
                target.insert(int(last), op["value"])
        else:
            assert op["op"] == "add" or last in target, op
            target[last] = op["value"]
    return doc


def cuda_deployment() -> dict[str, Any]:
    """The aiworker Deployment as `kubectl apply -k deploy/k8s/cuda` renders it: the base
    one, its patch applied, its image retagged."""
    overlay = kustomization(K8S / "cuda")
    assert overlay["resources"] == ["../base"]
    [patch] = overlay["patches"]
    assert patch["target"] == {"group": "apps", "version": "v1", "kind": "Deployment",
                               "name": "aiworker"}
    deployment = json_patch(resource("Deployment", "aiworker"),
                            yaml.safe_load((K8S / "cuda" / patch["path"]).read_text()))
    [image] = overlay["images"]
    main = container(deployment)
    assert main["image"].split(":")[0] == image["name"]
    main["image"] = f"{image['name']}:{image['newTag']}"
    return deployment


def test_the_cuda_overlay_asks_for_one_gpu_and_runs_the_cuda_image():
    deployment = cuda_deployment()
    validate_k8s(deployment)
    main = container(deployment)
    assert main["image"] == "aiworker:cuda"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["resources"]["limits"]["memory"] == \
        container(resource("Deployment", "aiworker"))["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["AIWORKER_INFERENCE__DEVICE"] == "cuda"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        deployment["spec"]["template"]["spec"]["tolerations"]
    config = configmap_config({k: v for k, v in env.items() if v is not None})
    assert config.inference.device == "cuda"


def test_the_network_policy_lets_dicom_in_from_anywhere_web_from_two_namespaces_only():
    """Ingress: the DICOM port from anywhere, the web port only from the monitoring and
    ingress controller namespaces; egress: DNS and every destination port of the config."""
    policy = resource("NetworkPolicy", "aiworker")
    validate_k8s(policy)
    spec, deployment = policy["spec"], resource("Deployment", "aiworker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    config = configmap_config()
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}

    def port_numbers(rule: dict[str, Any]) -> set[int]:
        return {ports.get(p["port"], p["port"]) for p in rule["ports"]}

    dicom, web = spec["ingress"]
    assert "from" not in dicom and port_numbers(dicom) == {config.node.port}
    assert port_numbers(web) == {config.web.port}
    namespaces = [peer["namespaceSelector"]["matchLabels"] for peer in web["from"]]
    assert namespaces == [{"kubernetes.io/metadata.name": "monitoring"},
                          {"kubernetes.io/metadata.name": "ingress-nginx"}]
    assert all(set(peer) == {"namespaceSelector"} for peer in web["from"])

    dns, destinations = spec["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    [peer] = dns["to"]
    assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert port_numbers(destinations) == {d.port for d in config.destinations.values()}
    assert all(p["protocol"] == "TCP" for p in destinations["ports"])



def rendered_config_name(docs: list[dict[str, Any]]) -> str:
    """The generated ConfigMap's name, after checking the Deployment mounts that one."""
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    return configmap["metadata"]["name"]


@needs_kubectl
@pytest.mark.parametrize("folder", [K8S, K8S / "cuda"], ids=["cpu", "cuda"])
def test_kustomize_builds_each_setup_with_the_generated_config_mounted(folder):
    docs = kubectl_kustomize(folder)
    for doc in docs:
        validate_k8s(doc)
    name = rendered_config_name(docs)
    assert re.fullmatch(r"aiworker-config-[a-z0-9]{10}", name)
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmap["data"] == generated_configmaps()[0]["data"]
    assert {d["kind"] for d in docs} >= {"Deployment", "NetworkPolicy", "Service",
                                         "PersistentVolumeClaim"}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    expected = cuda_deployment() if folder.name == "cuda" else resource("Deployment", "aiworker")
    assert container(deployment)["image"] == container(expected)["image"]
    assert container(deployment)["resources"] == container(expected)["resources"]


@needs_kubectl
def test_an_edited_config_gets_a_new_configmap_name_so_the_pod_rolls(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    before = rendered_config_name(kubectl_kustomize(tmp_path / "k8s"))
    config = tmp_path / "k8s" / "base" / "aiworker.yaml"
    config.write_text(config.read_text().replace("series_stable_seconds: 10",
                                                 "series_stable_seconds: 20"))
    after = rendered_config_name(kubectl_kustomize(tmp_path / "k8s"))
    assert after != before and after.startswith("aiworker-config-")
