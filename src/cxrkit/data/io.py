"""Read any chest film (JPEG, PNG 8/16-bit, DICOM) into one canonical form.

The canonical form is an 8-bit single-channel ``PIL.Image`` (mode ``"L"``):
chest films are grayscale, and every backbone-specific step (resize, 3-channel
expansion, normalisation) happens later in the transforms.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# What PIL may decode: the formats of IMAGE_SUFFIXES, by content. Never all of PIL's: its EPS
# plugin hands a file's bytes to Ghostscript (a film named .png can be PostScript), others
# are rarely audited decoders. JPEG covers MPO (cameras' multi-picture JPEGs).
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES

# A chest film is at most ~4k x 4k; anything far larger is a decompression bomb.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# The largest film file the reader takes whole: MAX_PIXELS stored uncompressed at 16 bits (as
# DR detectors write them; 4280 x 3520 is already 30 MB), with room for the DICOM header.
# `cxr serve` caps uploads at it by default.
LARGEST_FILM_MB = -(-2 * MAX_PIXELS // 2**20) + 5  # 128
# Deep films (16-bit PNG, DICOM) are stretched to 0..255 between these percentiles of their
# pixels within OUTLIER_FENCE interquartile ranges of the quartiles, not their min..max: hot
# pixels, or a burned-in marker at full scale, would otherwise squeeze the film into a few
# gray levels (and a model reads a washed-out NORMAL film as PNEUMONIA).
STRETCH_PERCENTILES = (0.1, 99.9)
OUTLIER_FENCE = 3.0
# Raised whenever read_image gives another image for some file than before: the caches keyed
# by files (decoded films, evaluation logits) then decode and score again.
READER_VERSION = 3  # 3: 8-bit DICOMs as they are, MONOCHROME2 with an INVERSE LUT inverted
TOO_MANY_PIXELS = "refused: too many pixels"  # how an oversized film's reason starts
# Below these a readable image is hardly a chest film; a model still scores it (calling
# nearly anything PNEUMONIA, confidently), so predictions carry a warning.
MIN_FILM_SIDE = 64  # pixels
MAX_ASPECT = 2.5  # longer side over shorter
MIN_CONTRAST = 2.0  # standard deviation of the gray levels
FILM_MEDIAN_RANGE = (16, 239)  # Kermany's 5,840 films: medians 56..227
MIN_GRAY_LEVELS = 32  # Kermany's films use 113..256 of the 256 levels
# A DICOM says what it is: a chest film is a projection radiograph. Other modalities (CT, MR,
# US, ...) still decode, and a model calls them PNEUMONIA as readily as anything else. OT
# ("other", as many secondary captures of digitised films say) tells nothing either way.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "OT"})
# A DICOM file written without its 128-byte preamble and "DICM" (older exports) starts with
# its first data element: a tag of the file meta group (0002) or, with no meta header at all,
# of the identifying group (0008); then a value representation, or an implicit length.
BARE_DICOM_GROUPS = (0x0002, 0x0008)
DICOM_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS "
                      b"ST SV TM UC UI UL UN UR US UT UV".split())


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; carries the path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


Film = str | Path | Image.Image | np.ndarray  # a file, or a film already in memory
IN_MEMORY = (Image.Image, np.ndarray)


def film_list(films: Film | Iterable[Film]) -> list[str | Image.Image | np.ndarray]:
    """One film or many -> a list of str paths and in-memory images. A str is one path
    (iterating it would give its characters, '.' being the whole current folder) and an
    array is one image (give a list of arrays for several)."""
    if isinstance(films, str | Path | Image.Image | np.ndarray):
        films = [films]
    listed = []
    for film in films if isinstance(films, Iterable) else [films]:
        if not isinstance(film, (str, Path, *IN_MEMORY)):  # str() of it would read as a path
            raise TypeError(f"cannot read a film from a {type(film).__name__}: give file paths, "
                            "folders, PIL images or numpy arrays ([H, W] or [H, W, 3]; a torch "
                            "tensor: tensor.numpy())")
        listed.append(film if isinstance(film, IN_MEMORY) else str(film))
    return listed


def film_name(film: str | Image.Image | np.ndarray, index: int) -> str:
    """How a film is named in predictions and errors: its path, or `<image i>`."""
    return f"<image {index}>" if isinstance(film, IN_MEMORY) else film


def file_stamp(path: str | Path) -> tuple[int, int]:
    """(size, modification time) of a file, (-1, -1) if it is gone: enough to notice that it
    was rewritten since."""
    try:
        stat = Path(path).stat()
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A file beside `path` to write instead, renamed over `path` once written and removed if
    writing fails: a reader (a server, a resumed run) never sees `path` half written."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_text(cell: str) -> str:
    """A CSV cell from a file or a manifest (a name such as `=HYPERLINK(...).jpeg`) that a
    spreadsheet would run as a formula, started with ' (OWASP's rule): shown as text. JSON
    outputs keep such names as they are."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


# Files an operating system or a PACS CD writes beside films: never films themselves
# (DICOMDIR is a DICOM file, the CD's index, without pixels).
NOT_FILMS = {"thumbs.db", "desktop.ini", ".ds_store", "dicomdir"}


FILE_NOT_FOUND = "file not found"


def is_not_a_film(path: str | Path) -> bool:
    name = Path(path).name
    return name.lower() in NOT_FILMS or name.startswith("._")  # macOS's AppleDouble shadows


def is_image_file(path: str | Path) -> bool:
    """A supported suffix; or no suffix (or a numeric one, as in UIDs) and the magic bytes
    of DICOM, JPEG or PNG: PACS exports often name files `IM0001` or
    `1.2.840.113619.2.55.3.1`."""
    path = Path(path)
    if is_not_a_film(path):
        return False
    suffix = path.suffix.lower()
    if suffix in SUPPORTED_SUFFIXES:
        return True
    return (suffix == "" or suffix[1:].isdigit()) and _has_image_magic(path)


def _file_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except OSError:
        return b""


JPEG_PNG_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n")


def _has_image_magic(path: Path) -> bool:
    head = _file_head(path)
    return _is_dicom_head(head) or head.startswith(JPEG_PNG_MAGIC)


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM start (`_is_dicom_head`), or a DICOM suffix on a file that is no JPEG or PNG
    (as `read_image` reads it: a DICOM written without preamble and meta header may start
    with anything)."""
    head = _file_head(Path(path))
    if _is_dicom_head(head):
        return True
    return Path(path).suffix.lower() in DICOM_SUFFIXES and not head.startswith(JPEG_PNG_MAGIC)


def _is_dicom_head(head: bytes) -> bool:
    """"DICM" after the preamble, or a bare data set's first element (BARE_DICOM_GROUPS)."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or struct.unpack_from("<H", head)[0] not in BARE_DICOM_GROUPS:
        return False
    return head[4:6] in DICOM_VRS or struct.unpack_from("<I", head, 4)[0] < 1024


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch any numeric range to 0..255 (16-bit PNGs and DICOMs use 10-16 bits) between
    `_stretch_range`; values beyond it clip to black or white."""
    pixels = pixels.astype(np.float32)
    lo, hi = _stretch_range(pixels)
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    scaled = (pixels - lo) * (255.0 / (hi - lo))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def _stretch_range(pixels: np.ndarray) -> tuple[float, float]:
    """The STRETCH_PERCENTILES of the film's pixels inside Tukey's far-out fences (three
    interquartile ranges beyond the quartiles): a burned-in marker or label far brighter
    than the film, of any size or number of values, then clips instead of setting the range.
    A film too flat for fences: the percentiles of all its pixels; then its min..max."""
    q1, q3 = np.percentile(pixels, (25, 75))
    fence = OUTLIER_FENCE * (q3 - q1)
    body = pixels[(pixels >= q1 - fence) & (pixels <= q3 + fence)]
    for values in (body, pixels):
        lo, hi = np.percentile(values, STRETCH_PERCENTILES)
        if hi > lo:
            return float(lo), float(hi)
    return float(pixels.min()), float(pixels.max())


def _uncompressed_syntax(implicit_vr: bool, little_endian: bool) -> str:
    """The transfer syntax of a data set read without a file-meta header: uncompressed, in
    the encoding pydicom found it in (a header-less file cannot hold compressed pixels)."""
    from pydicom import uid

    if implicit_vr:
        return uid.ImplicitVRLittleEndian
    return uid.ExplicitVRLittleEndian if little_endian else uid.ExplicitVRBigEndian


# JPEG's start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC), and JPEG-LS's SOF55
JPEG_FRAME_MARKERS = frozenset([*range(0xC0, 0xD0)]) - {0xC4, 0xC8, 0xCC} | {0xF7}


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
    thread's log records are dropped, and GDCM's switches are set back after."""
    import pydicom  # noqa: F401  (its loggers exist once it is imported)

    _quiet_pydicom_loggers()
    trace = _gdcm_trace()
    flags = (trace.GetWarningFlag(), trace.GetErrorFlag()) if trace else None
    was_reading, _READING.active = getattr(_READING, "active", False), True
    try:
        if trace:
            trace.WarningOff()
            trace.ErrorOff()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            yield warned
    finally:
        _READING.active = was_reading
        if trace and flags:
            trace.SetWarning(flags[0])
            trace.SetError(flags[1])


# --- DICOM ------------------------------------------------------------------------------------


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


def _read_dicom(path: Path) -> Image.Image:
    with quiet_pydicom() as warned:
        return _decode_dicom(path, warned)


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
    img = Image.fromarray(_dicom_to_uint8(pixels, ds), mode="L")
    if doubts := _header_doubts(header):
        img.info["doubt"] = "; ".join(doubts)  # for `film_doubt`
    return img


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


def _pil_to_gray(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if img.mode == "L":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black: transparent margins of exported films are background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB").convert("L")


def _read_with_pil(path: Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path, formats=PIL_FORMATS) as img:
            img.load()  # decode now, so truncated files fail here
            return _pil_to_gray(img)


def read_image(path: Film) -> Image.Image:
    """Decode one file (or convert an image already in memory, by the same rules) into an
    8-bit grayscale image, or raise UnreadableImageError."""
    if isinstance(path, IN_MEMORY):
        try:
            return _in_memory_to_gray(path)
        except UnreadableImageError:
            raise
        except Exception as e:  # an odd PIL mode or array: an entry with a reason, no crash
            raise UnreadableImageError("<image>", f"{type(e).__name__}: {e}") from e
    path = Path(path)
    try:
        if not path.is_file():  # a pattern left as it was: nothing matched it
            raise UnreadableImageError(path, "no file matches this pattern"
                                       if any(c in path.name for c in "*?") else FILE_NOT_FOUND)
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        if _is_dicom_head(_file_head(path)):
            return _read_dicom(path)
        if path.suffix.lower() in DICOM_SUFFIXES:  # no DICOM start: misnamed, or damaged
            try:
                return _read_dicom(path)
            except Exception as dicom_error:
                try:
                    return _read_with_pil(path)
                except Exception:  # neither: the DICOM reader's reason is the one to give
                    raise dicom_error from None
        return _read_with_pil(path)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UnreadableImageError(path, f"{TOO_MANY_PIXELS} ({e})") from e
    except UnidentifiedImageError as e:
        raise UnreadableImageError(path, "not an image PIL or pydicom can read") from e
    except Exception as e:  # truncated JPEG, broken DICOM, ...: report, never crash a run
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def film_doubt(img: Image.Image) -> str | None:
    """Why a decoded image is unlikely to be a chest film a model can read, or None: what
    its DICOM header says (`_header_doubts`), then what its pixels show."""
    doubts = [img.info.get("doubt"), _pixel_doubt(img)]
    return "; ".join(d for d in doubts if d) or None


def _pixel_doubt(img: Image.Image) -> str | None:
    width, height = img.size
    if min(width, height) < MIN_FILM_SIDE:
        return f"only {width} x {height} px: a thumbnail, not a film"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width} x {height} px: not a chest film's shape (squashed to a square)"
    pixels = np.asarray(img)
    if float(pixels.std()) < MIN_CONTRAST:
        return "almost uniform gray levels: no film content"
    counts = np.bincount(pixels.ravel(), minlength=256)  # 4x np.median's speed
    median = int(np.searchsorted(counts.cumsum(), pixels.size / 2))
    if not FILM_MEDIAN_RANGE[0] <= median <= FILM_MEDIAN_RANGE[1]:
        return (f"nearly all {'black' if median < FILM_MEDIAN_RANGE[0] else 'white'} (median "
                f"gray level {median:.0f} of 255): too dark or bright to read as a film (a "
                "wrong window or inversion?)")
    used = int(np.count_nonzero(counts))
    if used < MIN_GRAY_LEVELS:  # e.g. a nearly flat 16-bit film, its noise stretched to 0..255
        return (f"only {used} distinct gray levels (a film has over 100): a nearly flat "
                "image stretched to full contrast, or posterised")
    return None


def at_input_size(img: Image.Image, size: int, equalize: bool = False,
                  crop: float = 1.0) -> np.ndarray:
    """Grayscale PIL image -> uint8 array [1, size, size]: the film as every model reads it
    (`cxrkit.data.transforms.prepare` for PyTorch, `cxrkit.onnx_backend` for an export).

    `crop` < 1 keeps only the central fraction of each side, resized in the same single
    step: the film as it would have been prepared had it been framed that much tighter.
    """
    if equalize:
        img = ImageOps.equalize(img)
    w, h = img.size
    cw, ch = w * crop, h * crop
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.array(img, dtype=np.uint8)[None]


@dataclass
class Failure:
    """A film that could not be read, and why."""

    path: str
    reason: str


def read_for_model(film: Film, size: int, equalize: bool = False, crop: float = 1.0,
                   doubts: bool = False) -> tuple[np.ndarray | None, str, str]:
    """(pixels from `at_input_size`, "", doubt) for a readable film; (None, why, "") for one
    that cannot be read. The doubt (`film_doubt`, from the same decode) only if `doubts`."""
    try:
        img = read_image(film)
    except UnreadableImageError as e:
        return None, e.reason, ""
    doubt = (film_doubt(img) or "") if doubts else ""
    return at_input_size(img, size, equalize, crop), "", doubt


def _in_memory_to_gray(image: Image.Image | np.ndarray) -> Image.Image:
    """A PIL image, or an array [H, W] (any numeric type) or [H, W, 3 or 4] (uint8)."""
    if 0 in (image.size if isinstance(image, Image.Image) else image.shape):
        raise UnreadableImageError("<image>", "an empty image (a side of 0 pixels) is not a film")
    if isinstance(image, Image.Image):
        return _pil_to_gray(image)
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise UnreadableImageError("<array>", "the array holds NaN or infinite values: "
                                              "no film has them")
    if image.ndim == 2:
        return Image.fromarray(image if image.dtype == np.uint8 else _to_uint8(image), mode="L")
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.dtype == np.uint8:
        return _pil_to_gray(Image.fromarray(image))
    raise UnreadableImageError("<array>", f"an array of shape {image.shape} and type "
                                          f"{image.dtype} is not a film: give [H, W] (any "
                                          "numbers) or [H, W, 3 or 4] (uint8)")

