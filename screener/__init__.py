"""cspine-screener: batch screening of cervical spine radiographs over DICOM."""

__version__ = "0.1.0"
