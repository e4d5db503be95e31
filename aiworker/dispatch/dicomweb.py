"""DICOMweb sender: result objects to a STOW-RS server, one request per outbox batch.

:func:`send_dicomweb` is the outbox's sender for ``kind: dicomweb`` destinations: the
batch's files go out in one ``POST {url}/studies`` as ``multipart/related;
type="application/dicom"`` through dicomweb-client (its own retries off: the outbox's
backoff and retry horizon decide), with the destination's auth (:func:`session_for`), TLS
verification and timeouts. The answer decides each object's outcome
(:func:`stow_outcomes`):

* an instance in the response's Referenced SOP Sequence (0008,1199) is ``sent``, a Warning
  Reason (0008,1196) and all;
* an instance in the Failed SOP Sequence (0008,1198) gets the outcome its Failure Reason
  (0008,1197) would have as a C-STORE status (:func:`~aiworker.dispatch.outbox.
  dicom_status_outcome`): 0xA7xx (out of resources) ``retry``; 0xA9xx, 0xCxxx, 0x0122
  ``dead``; a warning ``sent``;
* an instance the response does not name is decided by the HTTP status: 200 (or 204)
  ``sent``; 202 ``retry`` (the server stored some and does not say this one);
  408, 429 and 5xx ``retry``; every other 4xx (400, 401, 403, 404, 409, 413, 415, ...)
  ``dead``: the same request would be refused the same way (a wrong password or token is
  dead at once, not retried for a day);
* no answer (connection refused, reset, TLS failure, timeout): ``retry``.

A reason names the HTTP status and, for a failure, a short printable piece of the server's
answer; never the URL's query, a header, the password or the token. A secret that cannot
be read (its variable unset, its file missing) is a ``retry`` naming the variable or file,
so the objects wait until the operator fixes the configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from aiworker.dispatch.outbox import DEAD, RETRY, SENT, Outcome, dicom_status_outcome

# dicomweb-client's retry decorator logs each failed request with its traceback as a
# warning, even with its retries off; the outbox logs the outcome once, in its own words.
logging.getLogger("retrying").setLevel(logging.ERROR)

NO_CHUNKING = 1 << 31  # dicomweb-client switches to chunked transfer past its chunk size
DETAIL_CHARS = 160


class MissingSecret(Exception):
    """A password or token the destination's auth needs cannot be read."""


def read_secret(variable: str | None, file: Path | None,
                environ: Mapping[str, str] | None = None) -> str:
    """The secret in environment variable ``variable`` or in ``file`` (surrounding
    whitespace removed); raises :class:`MissingSecret` naming where it looked."""
    environ = os.environ if environ is None else environ
    if variable is not None:
        value = environ.get(variable, "").strip()
        if not value:
            raise MissingSecret(f"environment variable {variable} is not set")
        return value
    if file is None:
        raise MissingSecret("no secret configured")
    try:
        value = Path(file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise MissingSecret(f"cannot read {file}: {getattr(error, 'strerror', None) or error}"
                            ) from error
    if not value:
        raise MissingSecret(f"{file} is empty")
    return value


def bearer_header(token: str) -> dict[str, str]:
    """The ``Authorization`` header of bearer auth (RFC 6750)."""
    return {"Authorization": f"Bearer {token}"}


def session_for(destination: Any, environ: Mapping[str, str] | None = None
                ) -> requests.Session:
    """A requests session with the destination's auth and TLS verification: ``ca_file``
    when given, else ``verify`` (True: the system's trust store, or REQUESTS_CA_BUNDLE)."""
    session = requests.Session()
    session.verify = str(destination.ca_file) if destination.ca_file else destination.verify
    if destination.auth == "basic":
        session.auth = requests.auth.HTTPBasicAuth(
            destination.username,
            read_secret(destination.password_env, destination.password_file, environ))
    elif destination.auth == "bearer":
        session.headers.update(bearer_header(
            read_secret(destination.token_env, destination.token_file, environ)))
    return session


def send_dicomweb(destination: Any, paths: Sequence[str],
                  timeout_s: float | None = None) -> list[Outcome]:
    """STOW-RS ``paths`` to ``destination`` in one request; an outcome per path."""
    outcomes: dict[int, Outcome] = {}
    datasets: list[tuple[int, Dataset]] = []
    for i, path in enumerate(paths):
        try:
            datasets.append((i, pydicom.dcmread(path)))
        except (InvalidDicomError, OSError, AttributeError, ValueError) as error:
            outcomes[i] = Outcome(DEAD, f"object file unreadable: {error.__class__.__name__}")
    if datasets:
        uids = [str(ds.SOPInstanceUID) for _, ds in datasets]
        stored = _post(destination, [ds for _, ds in datasets], uids, timeout_s)
        outcomes.update({i: o for (i, _), o in zip(datasets, stored, strict=True)})
    return [outcomes[i] for i in range(len(paths))]


def _post(destination: Any, datasets: list[Dataset], uids: list[str],
          timeout_s: float | None) -> list[Outcome]:
    """One STOW-RS request; never raises for what the network or the server does."""
    try:
        session = session_for(destination)
    except MissingSecret as error:
        return [Outcome(RETRY, f"{destination.auth} auth: {error}")] * len(uids)
    answers: list[requests.Response] = []
    timeout = (timeout_s, timeout_s) if timeout_s else (destination.connect_timeout_s,
                                                         destination.read_timeout_s)
    client = DICOMwebClient(destination.url.rstrip("/"), session=session, timeout=timeout,
                            chunk_size=NO_CHUNKING,
                            callback=lambda response, *_, **__: answers.append(response))
    client.set_http_retry_params(retry=False)
    try:
        body = client.store_instances(datasets)
    except requests.HTTPError as error:
        response = error.response
        return stow_outcomes(response.status_code, _response_dataset(response), uids,
                             _detail(response))
    except requests.Timeout:
        return [Outcome(RETRY, f"no STOW-RS answer within {timeout[1]:g} s")] * len(uids)
    except requests.ConnectionError as error:
        return [Outcome(RETRY, f"cannot reach the DICOMweb server: {_connection(error)}")
                ] * len(uids)
    except (ValueError, KeyError) as error:  # a 2xx answer whose body is not DICOM JSON
        status = answers[-1].status_code if answers else 0
        return stow_outcomes(status, None, uids, f"unreadable answer: {type(error).__name__}")
    except requests.RequestException as error:  # redirects, a broken chunked answer, ...
        return [Outcome(RETRY, f"STOW-RS request failed: {type(error).__name__}")] * len(uids)
    finally:
        session.close()
    return stow_outcomes(answers[-1].status_code if answers else 200, body, uids, "")


def stow_outcomes(status: int, response: Dataset | None, uids: Sequence[str],
                  detail: str = "") -> list[Outcome]:
    """Each instance's outcome from the HTTP ``status`` and the STOW-RS response data set
    (see the module's rules)."""
    failed, referenced = _listed(response)
    http = f"HTTP {status} {_phrase(status)}".rstrip() + (f": {detail}" if detail else "")
    outcomes = []
    for uid in uids:
        if uid in failed:
            reason = failed[uid]
            outcome = dicom_status_outcome(reason)
            outcomes.append(Outcome(outcome.state, f"STOW-RS FailureReason 0x{reason:04X} "
                                                   f"({http})"))
        elif uid in referenced or status in (200, 204):
            outcomes.append(Outcome(SENT))
        elif status == 202:
            outcomes.append(Outcome(RETRY, f"not named in the answer ({http})"))
        elif status in (408, 429) or status >= 500 or status < 400:
            outcomes.append(Outcome(RETRY, http))
        else:
            outcomes.append(Outcome(DEAD, http))
    return outcomes


def _listed(response: Dataset | None) -> tuple[dict[str, int], set[str]]:
    """The Failed SOP Sequence (UID -> Failure Reason) and the Referenced SOP Sequence's
    UIDs of a STOW-RS response."""
    failed: dict[str, int] = {}
    referenced: set[str] = set()
    if response is None:
        return failed, referenced
    for item in response.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        failed[uid] = int(item.get("FailureReason", 0x0110))
    for item in response.get("ReferencedSOPSequence", []):
        referenced.add(str(item.get("ReferencedSOPInstanceUID", "")))
    return failed, referenced


def _response_dataset(response: requests.Response) -> Dataset | None:
    """The DICOM JSON data set of an error answer (a 409 lists its failures), or None.
    The body is tried whatever its Content-Type says (Orthanc sends none with a 400)."""
    body = _json(response)
    if not isinstance(body, dict) or not body or not all(
            len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key) for key in body):
        return None
    try:
        return Dataset.from_json(body)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _detail(response: requests.Response) -> str:
    """What the server said about an error, short and printable: the message of a JSON
    answer (``Message``, ``message``, ``detail``, ``error``), nothing for a DICOM JSON one
    (its failures are listed per instance), else the start of the body."""
    body = _json(response)
    if isinstance(body, dict):
        said = next((body[k] for k in ("Message", "message", "detail", "error")
                     if isinstance(body.get(k), str)), None)
        text = said or ""
    else:
        text = response.text if response.content else ""
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())
    return text[:DETAIL_CHARS]


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _connection(error: requests.ConnectionError) -> str:
    """What went wrong connecting, without the URL (``requests`` puts it in the text)."""
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS handshake failed (is ca_file the server's CA?)"
    cause = error.__context__ or error
    while getattr(cause, "reason", None) is not None and cause is not cause.reason:
        cause = cause.reason
    text = str(cause)
    for known in ("Connection refused", "Name or service not known", "Connection reset",
                  "timed out", "No route to host"):
        if known in text:
            return known.lower()
    return type(cause).__name__
