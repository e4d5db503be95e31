"""Inference: models found by the :mod:`.registry` from their manifests (:mod:`.manifest`;
formats state_dict, TorchScript, MONAI bundle, nnU-Net v2), a series loaded as a volume
(:mod:`.volume`), run by the :mod:`.engine`, checked by the quality :mod:`.gate`; one job's
:mod:`.run`, the resident-model child :mod:`.process` and the node's infer :mod:`.stage`."""
