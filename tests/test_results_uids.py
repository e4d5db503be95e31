"""Deterministic result UIDs and HL7 message control ids."""

from __future__ import annotations

import re

import pytest
from pydicom.uid import UID

from aiworker.results.uids import KINDS, message_control_id, result_uid

SERIES = "1.2.826.0.1.3680043.8.498.1234567890"
OTHER_SERIES = "1.2.826.0.1.3680043.8.498.1234567891"
MODEL = "knee-demo@1.0.0"


def test_the_same_inputs_give_the_same_uids():
    assert result_uid(SERIES, MODEL, "seg") == result_uid(SERIES, MODEL, "seg", "sop")
    assert result_uid(SERIES, MODEL, "sr", "series") == result_uid(SERIES, MODEL, "sr",
                                                                   "series")
    assert message_control_id(SERIES, MODEL) == message_control_id(SERIES, MODEL)


def test_each_input_changes_the_uid():
    uids = {result_uid(series, model, kind, part)
            for series in (SERIES, OTHER_SERIES)
            for model in (MODEL, "knee-demo@1.0.1", "other@1.0.0")
            for kind in KINDS
            for part in ("sop", "series")}
    assert len(uids) == 2 * 3 * len(KINDS) * 2
    assert message_control_id(SERIES, MODEL) != message_control_id(OTHER_SERIES, MODEL)
    assert message_control_id(SERIES, MODEL) != message_control_id(SERIES, "knee-demo@1.0.1")


def test_the_uids_are_valid_dicom_uids():
    for kind in KINDS:
        uid = result_uid(SERIES, MODEL, kind)
        assert UID(uid).is_valid and len(uid) <= 64
        assert re.fullmatch(r"[0-9]+(\.(0|[1-9][0-9]*))*", uid)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        result_uid(SERIES, MODEL, "pdf")


def test_the_control_id_is_20_characters():
    control = message_control_id(SERIES, MODEL)
    assert len(control) == 20 and re.fullmatch(r"[0-9A-F]{20}", control)
