"""The docs site: it builds strictly, the configuration reference covers every key of the
configuration models, and the README stays a one-screen entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.tools import REPO

from aiworker.config import Config

sys.path.insert(0, str(REPO / "docs"))
import gen_config  # noqa: E402  (the docs' generator, beside its pages)


def _keys(model, prefix: str) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        nested = gen_config._model_of(field.annotation)
        if nested is not None and not str(field.annotation).startswith("list"):
            keys |= _keys(nested, f"{prefix}.{name}")
        else:
            keys.add(f"{prefix}.{name}")
    return keys


def test_the_configuration_reference_lists_every_key() -> None:
    reference = gen_config.config_reference()
    for section in ("node", "storage", "completion", "selection", "dispatch", "web",
                    "inference", "logging", "hl7"):
        model = gen_config._model_of(Config.model_fields[section].annotation)
        for key in _keys(model, section):
            assert f"| `{key}` |" in reference, key
    for key in ("pipelines[].name", "pipelines[].send_to", "destinations.NAME (dicom).host",
                "destinations.NAME (hl7).port"):
        assert f"| `{key}` |" in reference, key
    assert "| `storage.retention_days` | `float` | `30.0` |" in reference


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    built = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr
    page = (tmp_path / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "<code>node.acse_timeout_s</code>" in page and "generated:" not in page


def test_the_readme_is_an_entry_point() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= 150
    assert "make run" in readme[10] and "make test" in readme[11]
    assert any("aiworker demo" in line for line in readme[12:20])
