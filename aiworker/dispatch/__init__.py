"""Sending results: the node's outbox stage (:mod:`.stage`) queues each done job's objects
and the dispatcher (:mod:`.outbox`) sends them with retries, over DICOM C-STORE (:mod:`.scu`,
also the CLI's ``echo`` and ``send``), STOW-RS (:mod:`.dicomweb`) or HL7 over MLLP
(:mod:`.mllp`, which also holds a small receiver for the demo, benchmarks and tests). Every
C-STORE and C-ECHO association goes through :func:`.requestor.associate`, which keeps each
DIMSE response for the call that waits for it."""
