"""De-identified research export: a study's source series and the node's SEG/SR/SC,
de-identified per DICOM PS3.15's Basic Application Level Confidentiality Profile with the
options chosen (:mod:`.deid`), written to a folder with a separate mapping file
(:mod:`.export`). Reads the spool and the result folders; changes nothing in them."""
