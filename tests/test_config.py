"""Configuration: shipped defaults, environment overrides, and what a bad config reports."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers.tools import AIWORKER, DEFAULT_CONFIG

from aiworker.config import Config
from aiworker.config_loader import ConfigError, load_config

GOOD_DESTINATIONS = """\
destinations:
  pacs: {kind: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC}
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={} if environ is None else environ)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


# --- defaults and overrides ----------------------------------------------------------------


def test_defaults_load_from_shipped_yaml() -> None:
    config = load_config(DEFAULT_CONFIG, environ={})
    assert isinstance(config, Config)
    assert config.node.ae_title == "AIWORKER"
    assert config.node.host == "0.0.0.0"
    assert config.node.port == 11112
    assert config.node.max_associations == 16
    assert config.node.allowed_callers == []
    assert config.node.tls.enabled is False
    assert config.storage.data_dir == Path("./var")
    assert config.storage.min_free_mb == 1024
    assert config.storage.fsync is True
    assert config.completion.series_stable_seconds == 10
    assert config.destinations == {}  # a fresh node sends to no server that is not there
    [knee] = config.pipelines
    assert knee.name == "knee"
    assert knee.model == "knee-demo"
    assert knee.send_to == []
    assert knee.outputs == ["seg", "sr", "report", "hl7"]
    assert (config.web.host, config.web.port) == ("127.0.0.1", 8080)
    assert config.inference.device == "auto"


def test_the_shipped_example_destinations_load_once_uncommented(tmp_path) -> None:
    """The commented PACS and RIS under destinations:, uncommented and named in send_to,
    are a valid config, so the example an operator copies works as written."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    text = re.sub(r"^destinations: \{\}.*\n(?:\s+#.*\n)*", "", text, flags=re.M)
    text = re.sub(r"^# (destinations:|  \w+:\s+\{)", r"\1", text, flags=re.M)
    text = text.replace("send_to: []", "send_to: [pacs, ris]")
    config = load_config(write(tmp_path, text, "example.yaml"), environ={})
    pacs, ris = config.destinations["pacs"], config.destinations["ris"]
    assert (pacs.kind, pacs.host, pacs.port, pacs.ae_title) == \
        ("dicom", "pacs.example.org", 104, "PACS")
    assert (ris.kind, ris.host, ris.port) == ("hl7", "ris.example.org", 2575)
    assert config.pipelines[0].send_to == ["pacs", "ris"]


def test_env_overrides_port_and_allowed_callers(tmp_path) -> None:
    config = load_config(write(tmp_path, DEFAULT_CONFIG.read_text(encoding="utf-8")
                               .replace("destinations: {}", GOOD_DESTINATIONS.rstrip()),
                               "with-pacs.yaml"), environ={
        "AIWORKER_NODE__PORT": "11113",
        "AIWORKER_NODE__ALLOWED_CALLERS": "[{ae_title: MRI1, host: 127.0.0.1}]",
        "AIWORKER_DESTINATIONS__PACS__PORT": "4343",
        "UNRELATED": "x",
    })
    assert config.node.port == 11113
    assert len(config.node.allowed_callers) == 1
    assert config.node.allowed_callers[0].ae_title == "MRI1"
    assert config.node.allowed_callers[0].host == "127.0.0.1"
    assert config.destinations["pacs"].port == 4343
    # untouched keys keep the file's values
    assert config.node.ae_title == "AIWORKER"
    assert config.destinations["pacs"].host == "127.0.0.1"


def test_explicit_environ_replaces_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIWORKER_NODE__PORT", "11114")
    assert load_config(DEFAULT_CONFIG, environ={}).node.port == 11112
    assert load_config(DEFAULT_CONFIG).node.port == 11114


# --- bad configurations --------------------------------------------------------------------

BAD_PORT = "node:\n  port: abc\n"
UNKNOWN_KEY = "node:\n  colour: blue\n"
TLS_WITHOUT_CERT = "node:\n  tls: {enabled: true}\n"
UNKNOWN_DESTINATION = GOOD_DESTINATIONS + """\
pipelines:
  - name: knee
    rules: config/rules/knee.yaml
    model: knee-demo
    send_to: [pacs, nowhere]
"""


def test_bad_port_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_PORT)
    [line] = problems(path)
    assert line.startswith(f"{path}: node.port: ")
    assert "'abc'" in line
    assert "integer" in line


def test_unknown_key_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, UNKNOWN_KEY)
    [line] = problems(path)
    assert line.startswith(f"{path}: node.colour: ")
    assert "unknown key" in line
    assert "'blue'" in line


def test_tls_enabled_without_cert_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, TLS_WITHOUT_CERT)
    [line] = problems(path)
    assert line.startswith(f"{path}: node.tls")
    assert "cert" in line and "key" in line


def test_unknown_destination_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, UNKNOWN_DESTINATION)
    [line] = problems(path)
    assert line.startswith(f"{path}: ")
    assert "'nowhere'" in line
    assert "pacs" in line  # what is allowed
    # the dotted key of the bad value, e.g. pipelines.0.send_to, not "(top level)"
    key = line[len(f"{path}: "):].split(": ")[0]
    assert key.startswith("pipelines") and "send_to" in key, line


def test_every_problem_of_a_bad_file_is_reported_at_once(tmp_path: Path) -> None:
    """Port 'abc', an unknown key, TLS without a cert and an unknown destination: 4 lines."""
    path = write(tmp_path, """\
node:
  port: abc
  colour: blue
  tls: {enabled: true}
""" + UNKNOWN_DESTINATION)
    lines = problems(path)
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert any("node.port" in line and "'abc'" in line for line in lines), lines
    assert any("node.colour" in line and "'blue'" in line for line in lines), lines
    assert any("node.tls" in line for line in lines), lines
    assert any("'nowhere'" in line for line in lines), lines
    assert len(lines) == 4, lines


def test_env_var_problem_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "node:\n  port: 104\n", name="ok.yaml")
    [line] = problems(path, {"AIWORKER_NODE__PORT": "abc"})
    assert line.startswith("AIWORKER_NODE__PORT (environment): node.port: ")
    assert "'abc'" in line
    assert str(path) not in line

    [line] = problems(path, {"AIWORKER_NODE__ALLOWED_CALLERS": "[{ae_title: MRI1, port: 1}]"})
    assert line.startswith("AIWORKER_NODE__ALLOWED_CALLERS (environment): "
                           "node.allowed_callers.0.port: unknown key")


def test_env_var_that_breaks_a_section_rule_names_the_variable(tmp_path: Path) -> None:
    """TLS switched on from the environment, no cert in the file: blame the variable."""
    path = write(tmp_path, "node:\n  port: 104\n", name="ok.yaml")
    [line] = problems(path, {"AIWORKER_NODE__TLS__ENABLED": "true"})
    assert "node.tls" in line
    assert line.startswith("AIWORKER_NODE__TLS__ENABLED (environment): "), line


@pytest.mark.parametrize("text, fragment", [
    ("node:\n  port: 70000\n", "node.port"),
    ("node:\n  ae_title: THIS_TITLE_IS_TOO_LONG\n", "node.ae_title"),
    ("inference:\n  device: tpu\n", "inference.device"),
    ("node: [1, 2]\n", "node"),
    ("destinations:\n  pacs: {kind: ftp, host: h, port: 1}\n", "destinations.pacs"),
])
def test_other_bad_values_name_their_key(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    [line] = problems(path)
    assert line.startswith(f"{path}: {fragment}"), line


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    [line] = problems(missing)
    assert line.startswith(f"{missing}: cannot read")
    broken = write(tmp_path, "node: {port: [1,\n", name="broken.yaml")
    [line] = problems(broken)
    assert line.startswith(f"{broken}: not valid YAML")


# --- the CLI -------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
    base["COLUMNS"] = "80"  # an ordinary terminal or container log width
    return subprocess.run([AIWORKER, *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def test_cli_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_PORT + "  colour: blue\n")
    expected = problems(path)
    assert len(expected) == 2
    proc = run_cli("status", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # each problem is exactly one line of output, however long it is
    assert lines == [f"config error: {problem}" for problem in expected], proc.stderr


def test_cli_bad_env_value_exits_2_and_names_variable(tmp_path: Path) -> None:
    proc = run_cli("status", "--config", str(DEFAULT_CONFIG),
                   env={"AIWORKER_STORAGE__MIN_FREE_MB": "lots"})
    assert proc.returncode == 2
    text = " ".join(proc.stderr.split())  # tolerate wrapping here; the test above checks it
    assert re.search(r"AIWORKER_STORAGE__MIN_FREE_MB \(environment\): storage\.min_free_mb: ",
                     text), proc.stderr
    assert "'lots'" in text


def test_cli_serve_refuses_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, UNKNOWN_KEY)
    proc = run_cli("serve", "--config", str(path))
    assert proc.returncode == 2
    assert "node.colour" in proc.stderr
    assert "listening" not in proc.stdout + proc.stderr


def test_version_prints_the_installed_package_version() -> None:
    from importlib.metadata import version

    proc = subprocess.run([AIWORKER, "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"aiworker {version('aiworker')}")


def test_every_command_reads_the_config_that_aiworker_config_names(tmp_path: Path) -> None:
    data_dir = tmp_path / "server-data"
    path = tmp_path / "server.yaml"
    path.write_text(f"storage: {{data_dir: {data_dir}}}\n", encoding="utf-8")
    proc = run_cli("status", env={"AIWORKER_CONFIG": str(path)})
    assert proc.returncode == 0, proc.stderr
    unwrapped = "".join(proc.stdout.split())
    assert f"(stateDB:{data_dir / 'state.db'})" in unwrapped  # the server's folder
    broken = run_cli("retry", "feedbeef", env={"AIWORKER_CONFIG": str(tmp_path / "none.yaml")})
    assert broken.returncode == 2 and "none.yaml" in broken.stderr
