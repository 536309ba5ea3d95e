"""DICOM encoding helpers that know nothing of networks, stores or databases."""
