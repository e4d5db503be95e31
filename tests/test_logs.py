"""Logging: aiworker's loggers at logging.level, the libraries only at WARNING unless
verbose, and JSON lines that carry the stage, ids and duration."""

from __future__ import annotations

import json
import logging

import pytest

from aiworker import logs


@pytest.fixture(autouse=True)
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiworker").setLevel(logging.NOTSET)


def test_libraries_keep_quiet_unless_verbose(capsys) -> None:
    logs.setup("INFO")
    logging.getLogger("highdicom.seg").info("copy attributes of module Patient")
    logging.getLogger("highdicom.seg").warning("a library warning")
    logging.getLogger("aiworker.infer").info("job done")
    err = capsys.readouterr().err
    assert "copy attributes" not in err
    assert "a library warning" in err and "aiworker.infer: job done" in err

    logs.setup("INFO", verbose=True)
    logging.getLogger("highdicom.seg").info("copy attributes of module Patient")
    assert "highdicom.seg: copy attributes of module Patient" in capsys.readouterr().err


def test_json_lines_carry_stage_ids_and_duration(capsys) -> None:
    logs.setup("DEBUG", "json")
    logging.getLogger("aiworker.infer").info(
        "job %s done", "j1", extra={"job_id": "j1", "study_uid": "1.2.3", "duration_s": 2.5})
    logging.getLogger("pydicom").debug("not shown: a library below WARNING")
    [line] = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry | {"time": None} == {
        "time": None, "level": "INFO", "area": "aiworker.infer", "stage": "infer",
        "message": "job j1 done", "job_id": "j1", "study_uid": "1.2.3", "duration_s": 2.5}
