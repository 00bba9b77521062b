"""Read any chest film (JPEG, PNG 8/16-bit, DICOM) into one canonical form.

The canonical form is an 8-bit single-channel ``PIL.Image`` (mode ``"L"``):
chest films are grayscale, and every backbone-specific step (resize, 3-channel
expansion, normalisation) happens later in the transforms. Decoding DICOM is
`cxrkit.data.dicom`'s; this module finds films, tells DICOM from other files by their first
bytes and stretches deep films (16-bit PNG and DICOM alike) to 8 bits.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrkit.config import NO_SPACE_ERRNOS, no_space

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


def film_name(film: Film, index: int) -> str:
    """How a film is named in predictions and errors: its path (a str, as JSON and CSV take
    it), or `<image i>`."""
    return f"<image {index}>" if isinstance(film, IN_MEMORY) else str(film)


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
    writing fails: a reader (a server, a resumed run) never sees `path` half written, and a
    full disk leaves the file there before whole. That one is a NoSpaceError naming `path`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        written = partial.stat().st_size if partial.exists() else 0
        raise no_space(e, path, path.name, written, "free space (the file there before, if "
                       "any, is whole)", at_least=True) from e
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
            return f.read(136)  # the preamble, "DICM" and the first element's tag
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


def _zeros_for_a_first_element(head: bytes) -> bool:
    """Whether a file begins with zeros where a DICOM's first element's tag is (after "DICM",
    or at the start of a bare data set): an empty or damaged file (a failed copy, a sparse
    file), which pydicom's forced read walks as millions of empty elements (0.8 s a MB)."""
    start = 132 if head[128:132] == b"DICM" else 0
    return head[start:start + 4] == b"\0\0\0\0"


def _is_dicom_head(head: bytes) -> bool:
    """"DICM" after the preamble, or a bare data set's first element (BARE_DICOM_GROUPS)."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or struct.unpack_from("<H", head)[0] not in BARE_DICOM_GROUPS:
        return False
    return head[4:6] in DICOM_VRS or struct.unpack_from("<I", head, 4)[0] < 1024


class NotAFilm(ValueError):
    """Why decoded pixels are no film: `read_image` gives it as the file's reason."""


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Stretch any numeric range to 0..255 (16-bit PNGs and DICOMs use 10-16 bits) between
    `_stretch_range`; values beyond it clip to black or white."""
    pixels = pixels.astype(np.float32)
    if not np.isfinite(pixels).all():  # a float TIFF or DICOM with holes
        raise NotAFilm("its pixels hold NaN or infinite values, which no film has: export it "
                       "again as a 16-bit PNG or a DICOM")
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
            gray = _pil_to_gray(img)
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format in ("GIF", "PNG", "TIFF", "WEBP"):  # a stack (not a
                # camera JPEG's preview picture, which PIL opens as a second MPO frame)
                gray.info["doubt"] = f"{frames} frames: only the first was read and scored"
            return gray


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
    from cxrkit.data.dicom import read_dicom  # not at the top: it imports this module

    path = Path(path)
    try:
        if not path.is_file():
            raise UnreadableImageError(path, _not_a_file(path))
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        if _is_dicom_head(_file_head(path)):
            return read_dicom(path)
        if path.suffix.lower() in DICOM_SUFFIXES:  # no DICOM start: misnamed, or damaged
            try:
                return read_dicom(path)
            except Exception as dicom_error:
                try:
                    return _read_with_pil(path)
                except Exception:  # neither: the DICOM reader's reason is the one to give
                    raise dicom_error from None
        return _read_with_pil(path)
    except UnreadableImageError:
        raise
    except NotAFilm as e:
        raise UnreadableImageError(path, str(e)) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        size = re.search(r"\((\d+) pixels\)", str(e))  # PIL's own limit is twice ours
        pixels = f"{int(size[1]):,} > " if size else "over "
        raise UnreadableImageError(path, f"{TOO_MANY_PIXELS} ({pixels}{MAX_PIXELS:,}); a chest "
                                         "film is at most ~4k x 4k") from e
    except UnidentifiedImageError as e:
        raise UnreadableImageError(path, "not an image PIL or pydicom can read") from e
    except Exception as e:  # truncated JPEG, broken DICOM, ...: report, never crash a run
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def _not_a_file(path: Path) -> str:
    """Why a path given as a film is none: each was "file not found", which they exist."""
    if any(c in path.name for c in "*?"):  # a pattern left as it was: nothing matched it
        return "no file matches this pattern"
    if path.is_dir():
        return "a folder, not a file: give the folder to search it, or the files in it"
    if path.exists():
        return "not a regular file (a named pipe or a device)"
    if os.path.lexists(path):
        return "a broken symbolic link (what it points to is missing, or it points to itself)"
    return FILE_NOT_FOUND


def film_doubt(img: Image.Image) -> str | None:
    """Why a decoded image is unlikely to be a chest film a model can read, or None: what
    its DICOM header says (`cxrkit.data.dicom`'s `_header_doubts`), then what its pixels
    show."""
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

