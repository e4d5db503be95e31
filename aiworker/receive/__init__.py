"""The DICOM listener: C-ECHO and C-STORE SCP over pynetdicom, allow-list and TLS."""
