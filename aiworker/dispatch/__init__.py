"""Outgoing DICOM and HL7: the SCU used by the CLI now and by the outbox later."""
