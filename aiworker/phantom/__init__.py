"""Synthetic knee MR studies for tests, demos and benchmarks: a drawn anatomy (:mod:`.anatomy`)
rendered per series (:mod:`.render`) after a protocol and vendor conventions
(:mod:`.protocol`, :mod:`.vendors`), written as DICOM with its ground truth (:mod:`.study`,
:mod:`.truth`)."""
