"""The TLS context for DICOM TLS on the receiving port."""

from __future__ import annotations

import ssl

from aiworker.config import TLS


def server_context(tls: TLS) -> ssl.SSLContext | None:
    """An SSL context from ``node.tls``, or None when TLS is off.

    TLS 1.2 or newer; with ``require_client_cert`` a caller must present a certificate
    signed by ``ca`` (mutual TLS, as PS3.15's secure transport profiles expect).
    """
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca is None:
        context.verify_mode = ssl.CERT_NONE
    return context
