"""The objects of one job's results, written together by :mod:`.objects`: DICOM SEG and SR
TID 1500 (highdicom), the text report, the HL7 ORU^R01 message, the preview PNG and its
Secondary Capture; deterministic UIDs, and the patient/study taken from the source header."""
