"""knee-demo's training script writes a manifest that keeps the quality gate (no training)."""

from __future__ import annotations

import yaml

from aiworker.infer.manifest import load_manifest
from aiworker.models.knee_demo import train


def _bundled():
    return load_manifest(train.HERE / "model.yaml")


def test_a_retrained_manifest_keeps_the_bundled_gate(tmp_path):
    bundled = _bundled()
    path = train.write_manifest(tmp_path, bundled.outputs.classification[0].region)
    written = load_manifest(path)
    assert bundled.gate is not None and written.gate == bundled.gate
    assert written == bundled  # the script writes the bundled manifest back unchanged


def test_the_gate_of_the_manifest_replaced_wins_over_the_bundled_one(tmp_path):
    bundled = _bundled()
    raw = yaml.safe_load((train.HERE / "model.yaml").read_text(encoding="utf-8"))
    raw["gate"] = {"input": {"slices": [10, 60]}, "derived_from": "an earlier retraining"}
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    written = load_manifest(train.write_manifest(tmp_path,
                                                 bundled.outputs.classification[0].region))
    assert written.gate.input.slices == [10, 60]
    assert written.gate.derived_from == "an earlier retraining"
    assert written.gate.output.required == []
