"""knee-demo: the bundled knee model (11 structures and an ACL-tear head), trained on
synthetic phantoms by :mod:`aiworker.models.knee_demo.train`."""
