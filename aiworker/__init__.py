"""aiworker: a DICOM network AI node for knee MRI."""

__version__ = "0.1.0"
