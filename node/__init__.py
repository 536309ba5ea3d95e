"""dicom-node: a small, fast, trustworthy DICOM archive node."""

__version__ = "0.1.0"
