"""What the node's configuration is: one pydantic model per section of the YAML file.

:class:`Config` is the whole of it, each section with working defaults, every key with its
type, bounds and meaning (the configuration reference in the docs is generated from these
models). Reading the file and the ``AIWORKER_*`` environment overrides into a
:class:`Config`, and reporting what is wrong with one, is :mod:`aiworker.config_loader`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]+$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AllowedCaller(_Section):
    """One caller allowed to associate: its calling AE title and, optionally, its address."""

    ae_title: AETitle
    host: str | None = None


class TLS(_Section):
    """DICOM TLS on the receiving port (PS3.15 Annex B, BCP 195 profile)."""

    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLS:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("tls.enabled needs both cert and key")
        if self.require_client_cert and self.ca is None:
            raise ValueError("tls.require_client_cert needs ca (the CA that signs client certs)")
        return self


class Node(_Section):
    """The DICOM listener: who we are, where we listen, who may call."""

    ae_title: AETitle = "AIWORKER"
    host: str = "0.0.0.0"
    port: Port = 11112
    max_associations: int = Field(16, ge=1, le=1024)
    receive_processes: int = Field(1, ge=1, le=64)
    max_pdu_bytes: int = Field(262144, ge=0, description="0 = unlimited")
    network_timeout_s: float = Field(60.0, gt=0, description="drop an association (or a "
                                     "connection) on which nothing arrives for this long")
    acse_timeout_s: float = Field(30.0, gt=0, description="a connection must send its "
                                  "A-ASSOCIATE-RQ (and finish TLS) within this (ARTIM timer)")
    dimse_timeout_s: float = Field(60.0, gt=0, description="pynetdicom's DIMSE timeout: "
                                   "how long an association waits for a DIMSE message or "
                                   "response it expects; receiving C-STORE and C-ECHO never "
                                   "waits on it (a C-STORE that stops half way is cut by "
                                   "network_timeout_s)")
    allowed_callers: list[AllowedCaller] = []
    tls: TLS = TLS()


class Storage(_Section):
    """Where instances and the state DB live, and how carefully they are written."""

    data_dir: Path = Path("./var")
    min_free_mb: int = Field(1024, ge=0)
    fsync: bool = True
    retention_days: float = Field(30.0, ge=0, description="a study whose results are all "
                                  "delivered is removed (spool, results, state) this many "
                                  "days after its last instance; 0 keeps every study")
    emergency_free_percent: float = Field(10.0, ge=0, lt=100, description="below this much "
                                          "free disk, the oldest delivered studies are removed "
                                          "first, whatever their age; 0 turns it off")
    retention_interval_s: float = Field(300.0, gt=0, description="how often retention runs")


class Completion(_Section):
    """When a series counts as complete."""

    series_stable_seconds: float = Field(10.0, gt=0)


class Selection(_Section):
    """How series features are derived; the rules themselves are each pipeline's rule file."""

    oblique_above_deg: float = Field(30.0, gt=0, le=90,
                                     description="beyond this angle to the nearest axis, "
                                                 "a series' plane is 'oblique'")
    spacing_tolerance: float = Field(0.1, gt=0, lt=1,
                                     description="fraction of the usual slice step a step "
                                                 "may differ by before spacing is non-uniform")


DicomObject = Literal["seg", "sr", "sc"]


class DicomDestination(_Section):
    """A DICOM peer (PACS, viewer) that receives result objects by C-STORE.

    ``accepts`` lists the objects it can take: ``seg`` (Segmentation), ``sr`` (the TID 1500
    report), ``sc`` (the preview as a Secondary Capture). One that takes ``sc`` but not
    ``seg`` gets the Secondary Capture in place of the Segmentation."""

    kind: Literal["dicom"]
    host: str
    port: Port
    ae_title: AETitle
    accepts: list[DicomObject] = Field(["seg", "sr", "sc"], min_length=1)
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect to the PACS")
    acse_timeout_s: float = Field(30.0, gt=0, description="wait for the association's answer")
    dimse_timeout_s: float = Field(60.0, gt=0, description="wait for each C-STORE response "
                                                           "(and the longest silence)")
    retry_horizon_h: float | None = Field(None, gt=0, description="keep retrying a failing "
                                          "object this long (None: dispatch.max_age_h)")


class HL7Destination(_Section):
    """A RIS that receives the ORU^R01 over MLLP."""

    kind: Literal["hl7"]
    host: str
    port: Port
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect to the RIS")
    ack_timeout_s: float = Field(30.0, gt=0, description="wait for the ACK after sending")
    retry_horizon_h: float | None = Field(None, gt=0, description="keep retrying a failing "
                                          "message this long (None: dispatch.max_age_h)")


class DicomWebDestination(_Section):
    """A DICOMweb server (PACS, VNA, cloud DICOM store) that receives result objects by
    STOW-RS: ``POST {url}/studies``, ``multipart/related; type="application/dicom"``.

    ``auth``: ``none``, ``basic`` (``username`` and a password) or ``bearer`` (a token).
    Secrets are never written in this file: ``password_env`` / ``token_env`` name an
    environment variable, ``password_file`` / ``token_file`` a file (read at each send, so
    a token a sidecar refreshes is picked up). ``accepts`` as for a DICOM destination."""

    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://[^\s/@]+(/[^\s]*)?$",
                     description="the DICOMweb base URL (no user:password@ in it): objects "
                                 "are POSTed to {url}/studies")
    accepts: list[DicomObject] = Field(["seg", "sr", "sc"], min_length=1)
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = Field(None, min_length=1, description="auth: basic")
    password_env: str | None = Field(None, min_length=1, description="environment variable "
                                     "holding the password (auth: basic)")
    password_file: Path | None = Field(None, description="file holding the password")
    token_env: str | None = Field(None, min_length=1, description="environment variable "
                                  "holding the bearer token (auth: bearer)")
    token_file: Path | None = Field(None, description="file holding the bearer token")
    ca_file: Path | None = Field(None, description="PEM CA bundle the server's certificate "
                                 "must chain to (else the system's trust store)")
    verify: bool = Field(True, description="check the server's TLS certificate; false only "
                         "for a test server")
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP (and TLS) connect")
    read_timeout_s: float = Field(60.0, gt=0, description="wait for the STOW-RS response "
                                  "(and the longest silence)")
    retry_horizon_h: float | None = Field(None, gt=0, description="keep retrying a failing "
                                          "object this long (None: dispatch.max_age_h)")

    @model_validator(mode="after")
    def _credentials_match_auth(self) -> DicomWebDestination:
        """Exactly the secret that ``auth`` needs, from one place."""
        password = [s for s in (self.password_env, self.password_file) if s is not None]
        token = [s for s in (self.token_env, self.token_file) if s is not None]
        if self.auth == "basic" and (self.username is None or len(password) != 1):
            raise ValueError("auth: basic needs username and one of password_env, "
                             "password_file")
        if self.auth == "bearer" and len(token) != 1:
            raise ValueError("auth: bearer needs one of token_env, token_file")
        unused = (self.auth != "basic" and (password or self.username)) or (
            self.auth != "bearer" and token)
        if unused:
            raise ValueError(f"credentials given that auth: {self.auth} does not use")
        if self.ca_file is not None and not self.verify:
            raise ValueError("ca_file is given but verify is false")
        return self


Destination = Annotated[DicomDestination | HL7Destination | DicomWebDestination,
                        Field(discriminator="kind")]


class PipelineSpec(_Section):
    """A series selection rule file, the model it feeds, and where results go."""

    name: str
    rules: Path
    model: str
    outputs: list[Literal["seg", "sr", "report", "hl7", "preview"]] = ["seg", "sr", "report", "hl7"]
    send_to: list[str] = []


class HL7(_Section):
    """The ORU^R01 messages' header (MSH) and order (OBR universal service ID)."""

    sending_application: str = Field("AIWORKER", min_length=1)
    sending_facility: str = Field("AIWORKER", min_length=1)
    receiving_application: str = Field("RIS", min_length=1)
    receiving_facility: str = Field("HOSPITAL", min_length=1)
    service_code: str = Field("AIKNEE", min_length=1)
    service_text: str = "AI knee MRI analysis"
    service_coding_system: str = Field("99AIW", min_length=1)
    processing_id: Literal["P", "D", "T"] = Field("P", description="P production, D debug, "
                                                                   "T training")


class Dispatch(_Section):
    """How the outbox sends results: retry backoff, when to give up, batch and timeouts."""

    retry_base_s: float = Field(5.0, gt=0, description="first retry after about this long")
    retry_cap_s: float = Field(900.0, gt=0, description="longest wait between attempts")
    max_age_h: float = Field(24.0, gt=0, description="a row failing this long is dead")
    batch_size: int = Field(64, ge=1, le=64, description="objects per association")
    timeout_s: float = Field(30.0, gt=0, description="how long stopping waits for a send"
                                                      " (destinations set their own)")
    interval_s: float = Field(1.0, gt=0, description="how often due rows are sent")


class Web(_Section):
    """The dashboard, REST API, health and metrics endpoints (HTTP, served by the node).

    ``token``: the bearer token that resend and retry (the API's POSTs and the dashboard's
    buttons) must carry; None refuses them all (403). ``show_phi``: patient name, ID,
    accession number and study date on the pages and in the API; off, studies are shown by
    UID, description and sender only.

    ``auth``: who may read the pages and the API: ``none`` (anyone who reaches the port),
    ``token`` (``Authorization: Bearer <token>`` or the cookie the login form sets) or
    ``header`` (a reverse proxy such as oauth2-proxy puts the user in ``auth_header``; it
    is believed only from ``trusted_proxies``, addresses or networks). ``/healthz`` and
    ``/readyz`` stay open; ``/metrics`` too while ``metrics_public``. ``viewer_url``: a
    link to the study in the PACS viewer, ``{study_uid}`` replaced. ``refresh_s``: the
    studies list and a study page reload themselves this often (0: never)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 8080
    token: str | None = Field(None, min_length=16, description="None = no resend/retry "
                                                               "over HTTP")
    show_phi: bool = False
    auth: Literal["none", "token", "header"] = "none"
    auth_header: str = Field("X-Forwarded-User", min_length=1)
    trusted_proxies: list[str] = ["127.0.0.1", "::1"]
    metrics_public: bool = True
    viewer_url: str | None = Field(None, pattern=r"\{study_uid\}")
    refresh_s: int = Field(5, ge=0, le=3600)
    stow_enabled: bool = Field(False, description="receive instances over DICOMweb STOW-RS "
                               "(POST /dicomweb/studies, bearer web.token) beside C-STORE")

    @model_validator(mode="after")
    def _token_for_token_auth(self) -> Web:
        """``auth: token`` and ``stow_enabled`` need the token they check."""
        if self.auth == "token" and self.token is None:
            raise ValueError("web.auth: token needs web.token (or AIWORKER_WEB__TOKEN)")
        if self.stow_enabled and self.token is None:
            raise ValueError("web.stow_enabled needs web.token (or AIWORKER_WEB__TOKEN): "
                             "STOW-RS senders sign in with it")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        """Each entry an IP address or network (``10.0.0.0/8``)."""
        import ipaddress

        for entry in value:
            ipaddress.ip_network(entry, strict=False)
        return value


class Inference(_Section):
    """Where and how models run: the device, the site's models, the time limit of a job and
    the share of the CPU the inference process may take from receiving."""

    device: str = "auto"
    models_dir: Path | None = Field(None, description="folder of site models, beside the "
                                                      "bundled ones")
    time_limit_s: float | None = Field(None, gt=0, description="None = each model's own "
                                                               "inference.time_limit_s")
    threads: int | None = Field(None, ge=1, description="torch threads; None = every CPU "
                                                  "(niceness keeps receiving first)")
    nice: int = Field(10, ge=0, le=19, description="niceness of the inference process")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or value.startswith("cuda:"):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")


class State(_Section):
    """Where the state (studies, jobs, outbox) lives: the embedded SQLite file under
    ``storage.data_dir``, or a PostgreSQL database that several receivers and workers
    share (docs/scale-out.md)."""

    url: str | None = Field(None, description="postgresql://USER[:PASS]@HOST:PORT/DB; "
                            "unset: the SQLite file under storage.data_dir")
    busy_timeout_s: float = Field(10.0, gt=0, description="SQLite: how long a write waits "
                                  "while another process (aiworker retry, purge, a script) "
                                  "holds the state DB's write lock; then it fails, e.g. a "
                                  "C-STORE answers 0xC214")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from aiworker.store.backend import check_url

        return check_url(value.strip())


class Logging(_Section):
    """How the node logs (to stderr; no patient data either way)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["plain", "json"] = Field("plain", description="plain lines, or one JSON "
                                             "object per line (stage, ids, duration)")
    verbose: bool = Field(False, description="other libraries log at `level` too (else only "
                                             "their warnings); the --verbose option")


class Config(_Section):
    """The whole configuration; every section has working defaults."""

    node: Node = Node()
    storage: Storage = Storage()
    state: State = State()
    completion: Completion = Completion()
    selection: Selection = Selection()
    destinations: dict[str, Destination] = {}
    pipelines: list[PipelineSpec] = []
    hl7: HL7 = HL7()
    dispatch: Dispatch = Dispatch()
    web: Web = Web()
    inference: Inference = Inference()
    logging: Logging = Logging()
