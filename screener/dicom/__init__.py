"""DICOM I/O: the Storage SCP (``listener``), the SR sender (``sender``), pixel decoding (``image``)
and the Structured Report (``sr``)."""
