"""DICOM films decoded to 8-bit gray, as `cxrkit.data.io.read_image` reads them.

pydicom (with GDCM or pylibjpeg for compressed pixels) decodes a film's first frame, once a
compressed frame is found to be what its header says. Rescale, window and inversion make it
bone bright; a deep film is stretched as a 16-bit PNG is (`io._to_uint8`), an 8-bit one taken
as stored. What the header says against a chest film a model can read (another modality, "For
Processing", several frames) is the image's doubt, for `film_doubt`; a file that cannot be read
is reported with why and what to do (truncated, damaged, a decoder to install). `dicom_patient`
reads a header's patient alone, without pixels; `quiet_pydicom` keeps pydicom's and GDCM's own
messages about these files off the console.

This module imports `cxrkit.data.io`; `read_image` there imports this one when it is called,
so that neither import waits on the other.
"""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cxrkit.data.io import (
    MAX_PIXELS,
    TOO_MANY_PIXELS,
    UnreadableImageError,
    _file_head,
    _is_dicom_head,
    _to_uint8,
    _zeros_for_a_first_element,
    is_dicom_file,
)


def read_dicom(path: Path) -> Image.Image:
    """A DICOM file as an 8-bit gray film (`read_image` reads DICOMs with it and reports
    what it raises)."""
    with quiet_pydicom() as warned:
        try:
            return _decode_dicom(path, warned)
        except (UnreadableImageError, MemoryError):
            raise
        except Exception as e:  # a header pydicom reads but cannot make pixels of (Rows 0,
            # Window Width 0, an unknown transfer syntax, a colour space of no colour)
            raise UnreadableImageError(path, f"its DICOM header or pixel data cannot be "
                                             f"interpreted ({type(e).__name__}: {e}); export "
                                             "it again from the PACS or modality") from e


def dicom_patient(path: str | Path) -> tuple[str, str] | None:
    """(IssuerOfPatientID, PatientID) from a DICOM file's header ("" for an issuer it does
    not name), or None: no DICOM (never read as one: a JPEG or PNG), no PatientID, or a
    header that cannot be read. Only those two elements are parsed, and no pixels."""
    if not is_dicom_file(path):
        return None
    import pydicom

    try:
        with quiet_pydicom():
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                     specific_tags=["PatientID", "IssuerOfPatientID"])
    except Exception:  # unreadable: read_image reports it when the film is read
        return None
    patient = str(header.get("PatientID") or "").strip()
    return (str(header.get("IssuerOfPatientID") or "").strip(), patient) if patient else None


def _decode_dicom(path: Path, warned: list[warnings.WarningMessage]) -> Image.Image:
    import pydicom
    from pydicom.pixels import pixel_array

    if _zeros_for_a_first_element(_file_head(path)):
        raise UnreadableImageError(path, "it begins with zeros where a DICOM's first element "
                                         "is: an empty or damaged file (a failed copy?), not a "
                                         "DICOM; copy it again from its source")
    # `force`: older exports lack the 128-byte preamble and "DICM".
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    if rows * columns > MAX_PIXELS:  # before decoding: a few compressed MB can hold GBs
        raise UnreadableImageError(path, f"{TOO_MANY_PIXELS} ({columns} x {rows} > "
                                         f"{MAX_PIXELS:,}); a chest film is at most ~4k x 4k")
    ds = pydicom.dcmread(path, force=True, defer_size="1 MB")  # pixels read when used
    looks_dicom = _is_dicom_head(_file_head(path)) or any(
        k in ds for k in ("SOPClassUID", "Modality", "Rows"))
    if "PixelData" not in ds and not looks_dicom:
        raise UnreadableImageError(path, "neither a DICOM file (no DICM header, no DICOM "
                                         "image attributes) nor an image PIL can read")
    if "PixelData" not in ds:
        if _cut_short(warned, path):
            raise _truncated(path, "before its pixel data is complete")
        raise _no_pixel_data(path, ds)
    if "TransferSyntaxUID" not in ds.file_meta:  # a bare data set: no header says how it is
        ds.file_meta.TransferSyntaxUID = _uncompressed_syntax(*ds.original_encoding)
    # A multi-frame file: the first frame is the film; decoding only it spares the others.
    frames = int(ds.get("NumberOfFrames") or 1)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        _refuse_another_size(path, ds, frames, columns, rows)
    # From the file, pydicom reads only the first frame's bytes (the data set would hold all).
    source = path if frames > 1 and "TransferSyntaxUID" in header.file_meta else ds
    try:
        pixels = pixel_array(source, index=0) if frames > 1 else ds.pixel_array
    except Exception as e:
        if syntax.is_compressed:
            raise _undecodable(path, syntax, e) from e
        if "less than expected" in str(e):  # uncompressed pixels cut short
            raise _truncated(path, "inside its pixel data") from e
        raise
    doubts = _header_doubts(header)
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel") or 1) == 1:  # frames, not colour
        declared = f"says {frames}" if "NumberOfFrames" in ds else "declares no frame count"
        doubts.append(f"its pixel data holds {pixels.shape[0]} frames where its header "
                      f"{declared}: only the first was read (a damaged export?)")
        pixels = pixels[0]
    img = Image.fromarray(_dicom_to_uint8(pixels, ds), mode="L")
    if doubts:
        img.info["doubt"] = "; ".join(doubts)  # for `film_doubt`
    return img


def _uncompressed_syntax(implicit_vr: bool, little_endian: bool) -> str:
    """The transfer syntax of a data set read without a file-meta header: uncompressed, in
    the encoding pydicom found it in (a header-less file cannot hold compressed pixels)."""
    from pydicom import uid

    if implicit_vr:
        return uid.ImplicitVRLittleEndian
    return uid.ExplicitVRLittleEndian if little_endian else uid.ExplicitVRBigEndian


# --- Pixels to 8-bit gray, bone bright --------------------------------------------------------


def _dicom_to_uint8(pixels: np.ndarray, ds) -> np.ndarray:
    """A decoded frame as 8-bit gray, bone bright: rescale, window, then the stretch of deep
    films (not of 8-bit ones taken as stored)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if _taken_as_stored(ds):
        pixels = np.asarray(pixels, dtype=np.uint8)
        if pixels.ndim == 3:  # RGB: gray as PIL makes it of an RGB PNG or JPEG
            pixels = np.asarray(Image.fromarray(pixels, mode="RGB").convert("L"))
    else:
        pixels = apply_modality_lut(pixels, ds)  # rescale slope / intercept
        if pixels.ndim == 2:
            pixels = apply_voi_lut(pixels, ds, prefer_lut=True)  # window centre / width
        if pixels.ndim == 3:
            pixels = pixels.mean(axis=-1)
        pixels = _to_uint8(np.asarray(pixels))
    return 255 - pixels if _inverted(ds) else pixels


def _taken_as_stored(ds) -> bool:
    """Whether a DICOM's stored values are already the film's 8-bit gray levels: 8 bits,
    unsigned, with no rescale, window or VOI LUT to change them. Those are taken as they are,
    as an 8-bit PNG or JPEG is (stretching them would show the model another contrast than
    the same film's JPEG)."""
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16) <= 8
            and int(ds.get("PixelRepresentation") or 0) == 0
            and float(1 if slope is None else slope) == 1
            and float(0 if intercept is None else intercept) == 0
            and not any(k in ds for k in ("ModalityLUTSequence", "WindowCenter",
                                          "VOILUTSequence")))


def _inverted(ds) -> bool:
    """Whether a film is shown inverted, bone dark: MONOCHROME1, or MONOCHROME2 with an
    INVERSE presentation LUT (some CR and secondary-capture exporters). MONOCHROME1 with
    INVERSE, as DX objects pair them, is inverted once too."""
    photometric = str(ds.get("PhotometricInterpretation") or "").strip()
    shape = str(ds.get("PresentationLUTShape") or "").strip().upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


# --- A compressed frame checked against its header before any decoder reads it ----------------


def _refuse_another_size(path: Path, ds, frames: int, columns: int, rows: int) -> None:
    """A compressed film must be what its header says: decoders allocate what the
    codestream declares, so a few hundred KB declaring 30000 x 30000 took GBs before any
    check (the header's size is the one checked against MAX_PIXELS), and GDCM aborts the
    whole process on a JPEG 2000 frame of other components than the header's (JPEG's
    decoders convert them). JPEG, JPEG-LS
    and JPEG 2000 frames that state no size are refused too; RLE's decoder goes by the
    header. The frame checked is the one the decoder reads (its Extended Offset Table's)."""
    from pydicom.encaps import get_frame
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    syntax = ds.file_meta.TransferSyntaxUID
    if syntax not in (*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes):
        return
    offsets = ((ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
               if "ExtendedOffsetTable" in ds else None)
    try:
        first = get_frame(ds.PixelData, 0, number_of_frames=frames, extended_offsets=offsets)
    except Exception:  # damaged encapsulation: the decoder says so, with its own words
        return
    found = _codestream(first)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if found is None or (found.columns, found.rows) != (columns, rows):
        what = "states no size that can be read" if found is None else \
            f"is {found.columns} x {found.rows} pixels"
        problem = f"its compressed image {what} but its header says {columns} x {rows}"
    elif found.components != samples and syntax in JPEG2000TransferSyntaxes:
        problem = (f"its compressed image has {found.components} samples per pixel but its "
                   f"header says {samples}")
    elif found.tiles > MAX_J2K_TILES:
        problem = f"its compressed image is cut into {found.tiles:,} tiles"
    else:
        return
    raise UnreadableImageError(path, f"{problem}: a damaged or forged file; not decoded")


# JPEG 2000 tiles, at most: each costs the decoder memory, and a 71 KB file of 1 x 1 tiles
# took 700 MB (a 4k x 4k film in 64 x 64 tiles has 4,096)
MAX_J2K_TILES = 16_384


@dataclass(frozen=True)
class Codestream:
    """What a compressed frame says of itself, read before any decoder allocates for it."""

    columns: int
    rows: int
    components: int  # samples per pixel
    tiles: int = 1  # JPEG 2000's


# JPEG's start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC), and JPEG-LS's SOF55
JPEG_FRAME_MARKERS = frozenset([*range(0xC0, 0xD0)]) - {0xC4, 0xC8, 0xCC} | {0xF7}


def _codestream(frame: bytes) -> Codestream | None:
    """What a JPEG, JPEG-LS or JPEG 2000 frame declares; None if it declares nothing that
    can be read (a damaged or forged frame)."""
    try:
        if frame[4:8] == b"jP  ":  # a JP2 file around the codestream
            frame = _jp2_codestream(frame) or b""
        if frame.startswith(b"\xff\x4f\xff\x51"):  # J2K: SOC, then SIZ
            # Lsiz Rsiz | Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
            x, y, x0, y0, xt, yt, xt0, yt0, components = struct.unpack_from(">8IH", frame, 8)
            tiles = -(-(x - xt0) // max(xt, 1)) * -(-(y - yt0) // max(yt, 1))
            return Codestream(x - x0, y - y0, components, tiles)
        if not frame.startswith(b"\xff\xd8"):
            return None
        at = 2  # JPEG: every marker segment up to the frame header, however long the ones before
        while at + 4 <= len(frame):
            if frame[at] != 0xFF:
                return None  # not a marker where one must be
            marker = frame[at + 1]
            if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:
                at += 1 if marker == 0xFF else 2  # a fill byte; markers without a length
                continue
            if marker in (0xD9, 0xDA):
                return None  # the image or a scan ends before any frame header
            if marker in JPEG_FRAME_MARKERS:  # Lf, P, Y (rows), X (columns), Nf
                rows, columns, components = struct.unpack_from(">HHB", frame, at + 5)
                return Codestream(columns, rows, components) if rows else None  # 0: DNL later
            at += 2 + struct.unpack_from(">H", frame, at + 2)[0]
    except struct.error:  # cut short
        return None
    return None


def _jp2_codestream(frame: bytes) -> bytes | None:
    """The codestream in a JP2 file's `jp2c` box (DICOM's JPEG 2000 frames are bare
    codestreams or, from some writers, whole JP2 files)."""
    at = 0
    while at + 8 <= len(frame):
        length, kind = struct.unpack_from(">I4s", frame, at)
        header = 8
        if length == 1:  # a 64-bit length follows
            length, header = struct.unpack_from(">Q", frame, at + 8)[0], 16
        elif length == 0:  # to the end
            length = len(frame) - at
        if kind == b"jp2c":
            return frame[at + header:at + length]
        if length < header:
            return None
        at += length
    return None


# --- What a header says against a chest film --------------------------------------------------


# A DICOM says what it is: a chest film is a projection radiograph. Other modalities (CT, MR,
# US, ...) still decode, and a model calls them PNEUMONIA as readily as anything else. OT
# ("other", as many secondary captures of digitised films say) tells nothing either way.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})


def _header_doubts(header) -> list[str]:
    """What a DICOM's header says against its being a chest film a model can read: another
    modality than a projection radiograph, raw detector data ("For Processing"), several
    frames of which only the first is read."""
    doubts = []
    modality = str(header.get("Modality") or "").strip().upper()
    if modality and modality not in PROJECTION_MODALITIES:
        doubts.append(f"its DICOM header says modality {modality}, not a projection radiograph "
                      "(CR, DX): not a chest film")
    sop_class = header.get("SOPClassUID") or header.file_meta.get("MediaStorageSOPClassUID")
    intent = str(header.get("PresentationIntentType") or "").upper()
    if "for processing" in str(getattr(sop_class, "name", "")).lower() or \
            intent == "FOR PROCESSING":
        doubts.append("its DICOM header says 'For Processing': raw detector data, not the "
                      "processed film a model reads; export the 'For Presentation' image")
    frames = int(header.get("NumberOfFrames") or 1)
    if frames > 1:
        doubts.append(f"{frames} frames: only the first was read and scored")
    return doubts


# --- Why a DICOM cannot be read, and what to do -----------------------------------------------


def _truncated(path: Path, what: str) -> UnreadableImageError:
    return UnreadableImageError(path, f"truncated: the file ends {what} "
                                      f"({path.stat().st_size:,} bytes); copy or export it again")


def _cut_short(warned: list[warnings.WarningMessage], path: Path) -> bool:
    """Whether a DICOM without pixel data was cut short inside them: pydicom reached the end
    of the file inside an element (it then drops the element, with a warning), or the file
    holds the pixel data's tag (little or big endian) but no element came of it."""
    if any("End of file reached" in str(w.message) for w in warned):
        return True
    with open(path, "rb") as f:
        raw = f.read()
    return b"\xe0\x7f\x10\x00" in raw or b"\x7f\xe0\x00\x10" in raw


def _no_pixel_data(path: Path, ds) -> UnreadableImageError:
    """A DICOM that holds no pixels: a report, a presentation state, an index; or an image
    whose header ends before its pixels (cut short between two elements: it reads as whole)."""
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    if "Rows" not in ds and "Image Storage" not in str(getattr(sop_class, "name", "")):
        return UnreadableImageError(path, "DICOM file has no pixel data (a report, a "
                                          "presentation state or an index, not an image)")
    return UnreadableImageError(path, "DICOM file has no pixel data, though its header "
                                      "describes an image: if the file was cut short "
                                      f"({path.stat().st_size:,} bytes), copy or export it "
                                      "again")


def _undecodable(path: Path, syntax, error: Exception) -> UnreadableImageError:
    """Why compressed pixels could not be decoded: no installed decoder takes them (none is
    installed, or those installed refuse this kind, as 12-bit JPEG Extended), and what to
    install or run; or one does and failed on them: the data is damaged."""
    from pydicom.pixels import get_decoder

    text = str(error).strip()
    why = text.splitlines()[-1].strip()  # pydicom's last decoder's reason
    tried = [line for line in text.splitlines()[1:] if line.strip()]  # one line per decoder
    refused = tried and all("does not support" in line for line in tried)
    if get_decoder(syntax).is_available and not refused:
        return UnreadableImageError(path, f"its pixels, compressed as {syntax.name}, cannot be "
                                          f"decoded ({why}): the file is damaged or truncated; "
                                          "export it again")
    return UnreadableImageError(path, f"its pixels are compressed as {syntax.name}, which no "
                                      f"installed decoder reads ({why}); "
                                      f"{_how_to_decode(syntax)}")


# dcmtk's decompressing tool for each family of transfer syntaxes (it has none for JPEG 2000)
DCMTK_DECOMPRESSORS = (("JPEG-LS", "dcmdjpls"), ("JPEG 2000", None), ("JPEG", "dcmdjpeg"),
                       ("RLE", "dcmdrle"))


def _how_to_decode(syntax) -> str:
    """What to install, or run, to read pixels compressed as `syntax`: the packages of the
    first pydicom decoder that is missing them, and a converter that decompresses it."""
    from pydicom.pixels import get_decoder

    install = ""
    for missing in get_decoder(syntax).missing_dependencies:  # "pylibjpeg - requires a and b"
        needs = missing.partition(" - requires ")[2].replace(" and ", ", ").split(", ")
        names = [n.split(">")[0].split("=")[0].strip() for n in needs]
        if all(names) and "numpy" not in names[:-1]:
            install = f"install a decoder (`pip install {' '.join(names)}`), or "
            break
    tool = next((tool for family, tool in DCMTK_DECOMPRESSORS if family in syntax.name), None)
    dcmtk = f"dcmtk's `{tool} IN.dcm OUT.dcm` or " if tool else ""
    return f"{install}decompress the file first, e.g. with {dcmtk}GDCM's `gdcmconv --raw " \
           "IN.dcm OUT.dcm`"


# --- pydicom kept quiet about the files cxrkit reports itself ---------------------------------

_READING = threading.local()  # set while this thread reads a DICOM for cxrkit


class _WhileCxrkitReads(logging.Filter):
    """Drops pydicom's log records (a traceback per decoder that fails, warnings about the
    file) made while cxrkit reads a DICOM: cxrkit reports the same problem itself, once,
    with the file and the fix. pydicom's records about anything else pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_READING, "active", False)


_QUIET = _WhileCxrkitReads()


def _quiet_pydicom_loggers() -> None:
    """The filter on pydicom's loggers (records of a child logger do not pass its parent's
    filters: each one needs it)."""
    for name in ["pydicom", *logging.root.manager.loggerDict]:
        if name == "pydicom" or name.startswith("pydicom."):
            logger = logging.getLogger(name)
            if _QUIET not in logger.filters:
                logger.addFilter(_QUIET)


def _gdcm_trace():
    try:
        import gdcm
    except ImportError:
        return None
    return gdcm.Trace


@contextmanager
def quiet_pydicom() -> Iterator[list[warnings.WarningMessage]]:
    """Around cxrkit's own reading of a DICOM: pydicom's log records and warnings, and GDCM's
    messages to stderr, are kept from the user's console (cxrkit says what went wrong, once);
    the warnings are given to the caller, which reads a truncated file from them. Only this
    thread's log records are dropped, and GDCM's switches are set back after. The warning
    filters and GDCM's switches are the whole process's: only the main thread touches them
    (readers in threads, as the ONNX backend's, left `always` behind, and took each other's
    warnings); other threads' warnings show as Python's defaults show them."""
    import pydicom  # noqa: F401  (its loggers exist once it is imported)

    _quiet_pydicom_loggers()
    was_reading, _READING.active = getattr(_READING, "active", False), True
    try:
        if threading.current_thread() is not threading.main_thread():
            yield []
            return
        with _gdcm_silent(), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield warned
    finally:
        _READING.active = was_reading


@contextmanager
def _gdcm_silent() -> Iterator[None]:
    """GDCM's warnings and errors to stderr off, then as they were."""
    trace = _gdcm_trace()
    if trace is None:
        yield
        return
    flags = trace.GetWarningFlag(), trace.GetErrorFlag()
    trace.WarningOff()
    trace.ErrorOff()
    try:
        yield
    finally:
        trace.SetWarning(flags[0])
        trace.SetError(flags[1])
