"""Results of a job: DICOM SEG and SR, the text report, the HL7 ORU^R01 message."""
