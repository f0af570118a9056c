"""A pydicom decoder plugin for 12-bit JPEG Extended (1.2.840.10008.1.2.4.51) through GDCM.

The node offers JPEG Extended at association negotiation. pydicom's own GDCM plugin refuses
12-bit samples for this transfer syntax and Pillow cannot read them, so without this plugin no
installed decoder reads a 12-bit .4.51 image. GDCM itself (python-gdcm, BSD licence, already a
dependency) carries IJG's 12-bit JPEG codec; this plugin hands it the frame the same way pydicom's
GDCM plugin does, for 12-bit (9..12 bits stored) data only. 8-bit .4.51 stays with pydicom's
plugins. Registered once on import (`register`), under the label ``gdcm-12bit``.

Like every decoder it runs where the node decodes pixel data (the decoding worker processes);
malformed codestreams are rejected before it runs by the header checks of `screener.dicom.image`.
"""

from __future__ import annotations

from typing import Any

from pydicom.pixels.decoders import JPEGExtended12BitDecoder
from pydicom.uid import JPEGExtended12Bit

LABEL = "gdcm-12bit"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("gdcm",)}


def is_available(uid: str) -> bool:
    if uid != JPEGExtended12Bit:
        return False
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_frame(src: bytes, runner: Any) -> bytes:
    import gdcm

    bits_stored = int(runner.bits_stored)
    if not 8 < bits_stored <= 12:
        raise NotImplementedError("the gdcm-12bit plugin decodes 9 to 12-bit JPEG Extended only")
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the gdcm-12bit plugin decodes monochrome images only")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(JPEGExtended12Bit))))
    img.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, runner.pixel_representation))
    runner.set_option("bits_allocated", 16)
    frame = img.GetBuffer().encode("utf-8", "surrogateescape")
    expected = runner.rows * runner.columns * 2
    if len(frame) != expected:
        raise ValueError("GDCM returned a frame of unexpected size")
    return frame


def register() -> None:
    """Add the plugin to pydicom's JPEG Extended decoder (idempotent)."""
    if LABEL not in JPEGExtended12BitDecoder.available_plugins and LABEL not in getattr(
        JPEGExtended12BitDecoder, "_unavailable", {}
    ):
        JPEGExtended12BitDecoder.add_plugin(LABEL, (__name__, "_decode_frame"))


register()
