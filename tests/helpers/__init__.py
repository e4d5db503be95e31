"""Helpers the test modules share (the fixtures in ``conftest.py`` hand several out).

- ``tools``: paths, skip markers, ``wait_until``, config merging, dcmtk, dciodvfy.
- ``dicom``: Part 10 bytes, C-STORE/C-ECHO that send a file exactly as on disk.
- ``node``: ``aiworker serve`` as a subprocess (:class:`NodeProcess`), phantom studies.
- ``orthanc``, ``mllp``, ``pg_cluster``: the PACS, the RIS and the PostgreSQL the tests use.
- ``infer``, ``nnunet``, ``results``, ``selection``, ``export``, ``web``, ``k8s``,
  ``dirty_headers``: what one stage's tests build (fake models, truths, series, headers).
"""
