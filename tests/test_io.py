"""read_image: every way a chest film can be stored, and every way a file can be broken."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrkit.data.io import UnreadableImageError, read_image
from cxrkit.data.layout import images_under
from tests.conftest import run_with_files_under, synthetic_film


def gradient(w: int = 64, h: int = 48) -> np.ndarray:
    """uint8 left-to-right ramp 0..255."""
    return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode, suffix", [
    ("L", ".png"), ("RGB", ".jpeg"), ("RGBA", ".png"), ("CMYK", ".jpeg"), ("LA", ".png"),
    ("1", ".png"), ("P", ".png"), ("I;16", ".png"), ("L", ".bmp"), ("RGB", ".tiff"),
])
def test_every_mode_reads_as_8bit_gray_with_its_size(tmp_path, mode, suffix):
    path = save(Image.fromarray(gradient(), "L").convert(mode), tmp_path / f"film{suffix}")
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really holds this mode
    img = read_image(path)
    assert img.mode == "L"
    assert img.size == (64, 48)
    row = np.asarray(img, dtype=float)[24]
    if mode != "1":  # a 1-bit film is dithered: only its range is comparable
        assert np.all(np.diff(row) >= -6), "the ramp stays a ramp"
    assert row[:4].mean() < 40 and row[-4:].mean() > 215


@pytest.mark.parametrize("size", [(1, 1), (3, 517), (1001, 7)])
def test_odd_sizes(tmp_path, size):
    img = read_image(save(Image.new("L", size, 99), tmp_path / "odd.png"))
    assert img.size == size
    assert np.asarray(img).max() == 99


def test_transparency_becomes_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 4:, 3] = 255  # left half fully transparent white, right half opaque white
    pixels = np.asarray(read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")))
    assert pixels[:, :4].max() == 0 and pixels[:, 4:].min() == 255

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 255, 255, 200, 200, 200])
    palette.paste(0, (0, 0, 4, 8))  # left half: index 0, declared transparent
    pixels = np.asarray(read_image(save(palette, tmp_path / "p.png", transparency=0)))
    assert pixels[:, :4].max() == 0 and pixels[:, 4:].min() == 200


def test_exif_orientation_is_applied(tmp_path):
    stored = np.full((40, 60), 30, np.uint8)  # 60 wide, 40 high as stored
    stored[:10, :10] = 250  # a bright block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(stored, "L"), tmp_path / "rotated.jpeg", exif=exif, quality=95)
    pixels = np.asarray(read_image(path))
    assert pixels.shape == (60, 40)  # upright: 40 wide, 60 high
    assert pixels[:10, -10:].mean() > 200, "the stored top-left ends up top-right"


def test_16bit_png_uses_the_full_range(tmp_path):
    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    pixels = np.asarray(read_image(path))[0].astype(int)
    assert pixels[0] == 0 and pixels[-1] == 255
    assert np.abs(pixels - np.arange(256)).max() <= 1  # v / 65535 * 255, rounded


def test_12bit_values_in_a_16bit_png_are_stretched(tmp_path):
    values = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 0..4080 of 65535
    pixels = np.asarray(read_image(save(Image.fromarray(values), tmp_path / "ct.png")))[0]
    assert pixels.min() == 0 and pixels.max() == 255  # not a nearly black film


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                **elements) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]  # [frames, rows, columns] for several
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_ramp() -> np.ndarray:
    return np.tile(np.linspace(0, 4095, 128).round().astype(np.uint16), (16, 1))


def test_dicom_monochrome2_and_its_monochrome1_inverse(tmp_path):
    mono2 = np.asarray(read_image(write_dicom(tmp_path / "a.dcm", dicom_ramp())))
    mono1 = np.asarray(read_image(write_dicom(tmp_path / "b.dcm", dicom_ramp(), "MONOCHROME1")))
    assert mono2.shape == (16, 128)
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255 and np.all(np.diff(mono2[0].astype(int)) >= 0)
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_dicom_without_the_dicm_suffix_is_recognised(tmp_path):
    path = write_dicom(tmp_path / "film.dcm", dicom_ramp())
    renamed = path.rename(tmp_path / "film.img")
    assert np.asarray(read_image(renamed))[0, -1] == 255


def test_dicom_files_without_a_suffix_are_found_in_folders(tmp_path):
    """PACS exports: `IM0001`, or a UID whose last part looks like a numeric suffix."""
    folder = tmp_path / "films" / "NORMAL"
    folder.mkdir(parents=True)
    for name in ("IM0001", "1.2.840.113619.2.55"):
        write_dicom(folder / "x.dcm", dicom_ramp()).rename(folder / name)
    (folder / "README").write_text("not a film")
    found = [p.name for p in images_under(tmp_path / "films")]
    assert found == ["1.2.840.113619.2.55", "IM0001"]
    assert all(np.asarray(read_image(folder / n))[0, -1] == 255 for n in found)


def test_webp_gif_and_suffixless_jpeg_and_png_are_found_in_folders(tmp_path):
    film = synthetic_film("NORMAL", 4)
    for name, kind in (("a.webp", "WEBP"), ("b.gif", "GIF"), ("c", "JPEG"), ("d.0001", "PNG")):
        film.save(tmp_path / name, format=kind)
    (tmp_path / "notes").write_text("not a film")
    found = [p.name for p in images_under(tmp_path)]
    assert found == ["a.webp", "b.gif", "c", "d.0001"]
    assert all(read_image(tmp_path / name).size == film.size for name in found)


def test_folders_are_searched_through_links_once_but_not_hidden_ones(tmp_path):
    films = tmp_path / "films"
    for folder in ("a", "elsewhere", ".thumbnails"):
        (films / folder).mkdir(parents=True)
        synthetic_film("NORMAL", 1).save(films / folder / f"{folder.strip('.')}.png")
    (films / "a" / "linked").symlink_to(films / "elsewhere")
    (films / "a" / "loop").symlink_to(films)  # a link back up the tree: no endless walk
    found = [p.relative_to(films).as_posix() for p in images_under(films)]
    assert found == ["a/a.png", "a/linked/elsewhere.png"]  # "elsewhere" once, first by name


def with_markers(pixels: np.ndarray, kind: str) -> np.ndarray:
    """Burned-in marks at or near full scale: hot pixels, a marker on 1.6% of the film, two
    markers of different values, a marker with a graded rim (anti-aliasing, JPEG ringing)."""
    marked = pixels.copy()
    if kind == "hot":
        marked[:2, :2] = 65535
    elif kind == "block":
        marked[:16, :16] = 65535
    elif kind == "two":
        marked[:12, :12], marked[-12:, -12:] = 65535, 60000
    elif kind == "rim":
        marked[:18, :18] = 30000
        marked[:16, :16] = 65535
    return marked


@pytest.mark.parametrize("kind", ["hot", "block", "two", "rim"])
def test_burned_in_marks_do_not_wash_out_a_deep_film(tmp_path, kind):
    """Stretched between percentiles of the pixels inside Tukey's far-out fences, not
    min..max: marks far above a 12-bit film leave it as it was instead of squeezing it into
    the darkest 16 gray levels (which a model read as PNEUMONIA, at 0.999999); also in a
    16-bit DICOM, and one whose window spans its whole stored range (a common default)."""
    film = np.tile(np.linspace(0, 4095, 256).round().astype(np.uint16), (64, 1))
    marked_film = with_markers(film, kind)
    deep = dict(BitsStored=16, HighBit=15)
    writers = {"png": lambda p, x: save(Image.fromarray(x), p),
               "dcm": lambda p, x: write_dicom(p, x, **deep),
               "windowed.dcm": lambda p, x: write_dicom(p, x, WindowCenter=32768,
                                                       WindowWidth=65536, **deep)}
    for name, write in writers.items():
        clean = np.asarray(read_image(write(tmp_path / f"clean.{name}", film)), int)
        marked = np.asarray(read_image(write(tmp_path / f"marked.{name}", marked_film)), int)
        untouched = marked_film == film
        assert clean.max() == 255 and clean.min() == 0, name
        assert np.abs(clean - marked)[untouched].max() <= 2, name
        assert (marked[marked_film >= 60000] == 255).all(), name  # marks clip to white


def test_a_dicom_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "bomb.dcm", dicom_ramp(), Rows=12000, Columns=12000)
    with pytest.raises(UnreadableImageError, match=r"too many pixels \(12000 x 12000"):
        read_image(path)


def test_a_multiframe_dicom_reads_its_first_frame_alone(tmp_path):
    import tracemalloc

    frames = np.stack([dicom_ramp(), dicom_ramp()[:, ::-1]])
    path = write_dicom(tmp_path / "two.dcm", frames, NumberOfFrames=2)
    first = write_dicom(tmp_path / "one.dcm", dicom_ramp())
    np.testing.assert_array_equal(np.asarray(read_image(path)), np.asarray(read_image(first)))
    film = np.tile(np.linspace(0, 4095, 512).round().astype(np.uint16), (512, 1))
    many = write_dicom(tmp_path / "many.dcm", np.repeat(film[None], 80, axis=0),
                       NumberOfFrames=80)  # 40 MB: 80 films of 512 KB
    tracemalloc.start()
    try:
        read_image(many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < many.stat().st_size / 4, peak  # not the whole file in memory


def gdcm_compressed(source: Path, out: Path, syntax: str) -> Path:
    """`source` re-encoded by GDCM (an independent DICOM toolkit) in another transfer syntax."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return out


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless",
                                    "JPEG2000Lossless"])
def test_losslessly_compressed_dicoms_read_as_their_original(tmp_path, syntax):
    """PACS archives store films compressed (JPEG Lossless above all): the same pixels."""
    import pydicom

    film = np.random.default_rng(0).integers(0, 4096, (64, 80)).astype(np.uint16)
    original = write_dicom(tmp_path / "film.dcm", film)
    compressed = gdcm_compressed(original, tmp_path / "compressed.dcm", syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(np.asarray(read_image(compressed)),
                                  np.asarray(read_image(original)))


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless",
                                    "JPEG2000Lossless"])
def test_a_compressed_film_larger_than_its_header_says_is_not_decoded(tmp_path, syntax):
    """Decoders allocate the size the codestream declares (a 285 KB file declaring 30000 x
    30000 took 3.6 GB): a codestream of another size than the header's is refused first."""
    import pydicom

    film = np.random.default_rng(0).integers(0, 4096, (64, 80)).astype(np.uint16)
    compressed = gdcm_compressed(write_dicom(tmp_path / "film.dcm", film),
                                 tmp_path / "compressed.dcm", syntax)
    ds = pydicom.dcmread(compressed)
    ds.Rows, ds.Columns = 32, 40  # the header says less than the codestream holds
    ds.save_as(compressed)
    with pytest.raises(UnreadableImageError, match=r"compressed\.dcm: its compressed image is "
                       r"80 x 64 pixels but its header says 40 x 32: a damaged or forged file"):
        read_image(compressed)


def encapsulated_dicom(path: Path, frame: bytes, rows: int, columns: int, syntax) -> Path:
    """An 8-bit DICOM holding one compressed `frame`, its header saying rows x columns."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(write_dicom(path, np.zeros((rows, columns))))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def padded_jpeg(film: Image.Image) -> bytes:
    """A JPEG with 5 KB of ICC-profile segment before its frame header, as cameras write."""
    buffer = io.BytesIO()
    film.save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    return data[:2] + b"\xff\xe2" + struct.pack(">H", 5002) + bytes(5000) + data[2:]


def jp2_file(film: Image.Image) -> bytes:
    """A JPEG 2000 codestream inside a JP2 file's boxes, as some writers store it."""
    buffer = io.BytesIO()
    film.save(buffer, "JPEG2000", irreversible=False)  # PIL writes the JP2 boxes by default
    assert buffer.getvalue()[4:8] == b"jP  "
    return buffer.getvalue()


@pytest.mark.parametrize("make, syntax", [(padded_jpeg, "JPEGBaseline8Bit"),
                                          (jp2_file, "JPEG2000Lossless")])
def test_the_size_check_reads_past_long_headers_and_inside_jp2_boxes(tmp_path, make, syntax):
    from pydicom import uid

    film = Image.fromarray(gradient(80, 64), "L")  # 80 wide, 64 high
    frame = make(film)
    syntax = getattr(uid, syntax)
    ok = encapsulated_dicom(tmp_path / "ok.dcm", frame, 64, 80, syntax)
    assert read_image(ok).size == (80, 64)
    forged = encapsulated_dicom(tmp_path / "forged.dcm", frame, 32, 40, syntax)
    with pytest.raises(UnreadableImageError, match=r"its compressed image is 80 x 64 pixels "
                                                   r"but its header says 40 x 32"):
        read_image(forged)
    sizeless = encapsulated_dicom(tmp_path / "sizeless.dcm", b"\xff\xd8\xff\xd9", 64, 80,
                                  uid.JPEGBaseline8Bit)  # no frame header at all
    with pytest.raises(UnreadableImageError, match="states no size that can be read"):
        read_image(sizeless)


def test_a_compressed_frame_unlike_its_header_in_samples_or_tiles_is_not_decoded(tmp_path):
    """GDCM aborts the whole process (a C++ exception nothing catches) on a JPEG 2000 frame
    of other components than the header says: a 17 KB upload killed `cxr serve`. Read in a
    child process, so that a regression fails this test, not the test run."""
    from pydicom import uid

    buffer = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(buffer, "JPEG2000", no_jp2=True, irreversible=False)
    colour = encapsulated_dicom(tmp_path / "rgb-as-gray.dcm", buffer.getvalue(), 64, 80,
                                uid.JPEG2000Lossless)  # the header: one sample per pixel
    code = ("from cxrkit.data.io import read_image, UnreadableImageError\n"
            f"try: read_image({str(colour)!r})\n"
            "except UnreadableImageError as e: print(e.reason)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr[-2000:]
    assert "has 3 samples per pixel but its header says 1" in child.stdout
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, "JPEG", quality=95)  # JPEG's decoders convert:
    jpeg = encapsulated_dicom(tmp_path / "rgb-jpeg.dcm", buffer.getvalue(), 64, 80,
                              uid.JPEGBaseline8Bit)  # read, as before the check
    assert read_image(jpeg).size == (80, 64)

    buffer = io.BytesIO()
    Image.fromarray(gradient(160, 128), "L").save(buffer, "JPEG2000", no_jp2=True,
                                                  irreversible=False)
    frame = bytearray(buffer.getvalue())
    struct.pack_into(">II", frame, 8 + 16, 1, 1)  # SIZ's tile size: 1 x 1, 20,480 tiles
    tiled = encapsulated_dicom(tmp_path / "tiled.dcm", bytes(frame), 128, 160,
                               uid.JPEG2000Lossless)
    with pytest.raises(UnreadableImageError, match="cut into 20,480 tiles"):
        read_image(tiled)


def test_the_frame_checked_is_the_one_the_extended_offset_table_points_to(tmp_path):
    """pydicom's decoders follow a DICOM's Extended Offset Table: so does the size check."""
    import pydicom
    from pydicom.encaps import encapsulate_extended, generate_frames

    def jpeg_ls(name: str, pixels: np.ndarray) -> bytes:
        file = gdcm_compressed(write_dicom(tmp_path / f"{name}.dcm", pixels),
                               tmp_path / f"{name}-ls.dcm", "JPEGLSLossless")
        return next(generate_frames(pydicom.dcmread(file).PixelData, number_of_frames=1))

    small, large = jpeg_ls("small", np.full((64, 80), 1000)), jpeg_ls("large",
                                                                      np.full((640, 800), 3000))
    ds = pydicom.dcmread(tmp_path / "small-ls.dcm")
    ds.NumberOfFrames = 2
    pixels, offsets, lengths = encapsulate_extended([small, large])
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB"
    ds.ExtendedOffsetTable = struct.pack("<2Q", *struct.unpack("<2Q", offsets)[::-1])
    ds.ExtendedOffsetTableLengths = struct.pack("<2Q", *struct.unpack("<2Q", lengths)[::-1])
    ds.save_as(tmp_path / "swapped.dcm")  # the table says frame 0 is the large one
    with pytest.raises(UnreadableImageError, match="is 800 x 640 pixels but its header says "
                                                   "80 x 64"):
        read_image(tmp_path / "swapped.dcm")


def test_a_dicom_compressed_beyond_the_decoders_says_how_to_fix_it(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGExtended12Bit

    ds = pydicom.dcmread(write_dicom(tmp_path / "film.dcm", dicom_ramp()))
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    rows, columns = dicom_ramp().shape  # a 12-bit frame header (SOF1) of the film's size
    frame_header = b"\xff\xc1" + struct.pack(">HBHHB3s", 11, 12, rows, columns, 1, b"\1\x11\0")
    ds.PixelData = encapsulate([b"\xff\xd8" + frame_header + b" twelve-bit JPEG \xff\xd9"])
    ds.save_as(tmp_path / "film.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableImageError, match=r"film\.dcm: its pixels are compressed as "
                       r"JPEG Extended .*which no installed decoder reads .*`pip install pylibjpeg "
                       r"pylibjpeg-libjpeg`.*dcmtk's `dcmdjpeg IN\.dcm OUT\.dcm` or GDCM's "
                       r"`gdcmconv --raw"):
        read_image(tmp_path / "film.dcm")


def test_a_dicom_whose_decoder_is_missing_names_what_to_install_and_a_fitting_tool(tmp_path):
    """HTJ2K needs pylibjpeg-openjpeg; dcmtk has no tool for any JPEG 2000 (dcmdjpeg is
    for JPEG): GDCM's converter is the one named."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    ds = pydicom.dcmread(write_dicom(tmp_path / "film.dcm", dicom_ramp()))
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    rows, columns = dicom_ramp().shape  # SOC, then SIZ of the film's size, one component
    siz = struct.pack(">HH8IH", 41, 0, columns, rows, 0, 0, columns, rows, 0, 0, 1)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + siz + b"\x0b\x11\x01" + b"\0" * 64])
    ds.save_as(tmp_path / "film.dcm", enforce_file_format=True)
    with pytest.raises(UnreadableImageError) as info:
        read_image(tmp_path / "film.dcm")
    assert "which no installed decoder reads" in info.value.reason
    assert "`pip install pylibjpeg pylibjpeg-openjpeg`" in info.value.reason
    assert "`gdcmconv --raw IN.dcm OUT.dcm`" in info.value.reason
    assert "dcmdjpeg" not in info.value.reason


def rle_film(tmp_path: Path) -> Path:
    film = np.random.default_rng(0).integers(0, 4096, (64, 80)).astype(np.uint16)
    return gdcm_compressed(write_dicom(tmp_path / "source.dcm", film), tmp_path / "rle.dcm",
                           "RLELossless")


def test_a_damaged_frame_an_installed_decoder_fails_on_is_called_damaged(tmp_path):
    """pydicom's own RLE decoder is always there: a frame cut in half (its encapsulation
    whole) is a damaged file to export again, not a decoder to install."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(rle_film(tmp_path))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])
    ds.save_as(tmp_path / "damaged.dcm")
    with pytest.raises(UnreadableImageError) as info:
        read_image(tmp_path / "damaged.dcm")
    assert "RLE Lossless, cannot be decoded" in info.value.reason
    assert "damaged or truncated; export it again" in info.value.reason
    assert "no installed decoder" not in info.value.reason


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_dicom_is_called_truncated(tmp_path, compressed):
    """Cut inside its pixel data, compressed (pydicom then drops the element) or not."""
    film = rle_film(tmp_path) if compressed else write_dicom(tmp_path / "film.dcm", dicom_ramp())
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(film.read_bytes()[:-100])
    with pytest.raises(UnreadableImageError, match=r"cut\.dcm: truncated: the file ends "):
        read_image(cut)


def test_a_dicom_without_pixels_says_so_and_what_it_may_be(tmp_path):
    import pydicom
    from pydicom.uid import BasicTextSRStorage

    ds = pydicom.dcmread(write_dicom(tmp_path / "film.dcm", dicom_ramp()))
    del ds.PixelData
    ds.save_as(tmp_path / "image.dcm")  # an image's header, no pixels: maybe cut short
    with pytest.raises(UnreadableImageError, match="no pixel data, though its header describes "
                                                   "an image: if the file was cut short"):
        read_image(tmp_path / "image.dcm")
    for name in ("Rows", "Columns", "PhotometricInterpretation", "SamplesPerPixel",
                 "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, name)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    ds.Modality = "SR"
    ds.save_as(tmp_path / "report.dcm")
    with pytest.raises(UnreadableImageError, match=r"no pixel data \(a report"):
        read_image(tmp_path / "report.dcm")


def test_pydicom_says_nothing_of_the_files_cxrkit_reports_itself(tmp_path, caplog, recwarn):
    """Its decoders' tracebacks (logged as ERROR) and its warnings about a truncated file
    would each repeat, noisily, what the UnreadableImageError says once; pydicom's records
    about anything else still pass."""
    import logging

    test_a_dicom_compressed_beyond_the_decoders_says_how_to_fix_it(tmp_path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(rle_film(tmp_path).read_bytes()[:-100])
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UnreadableImageError):
            read_image(cut)
        with pytest.raises(UnreadableImageError):
            read_image(tmp_path / "film.dcm")  # the 12-bit JPEG no installed decoder takes
        assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text
        assert not [w for w in recwarn if "pydicom" in w.filename], [str(w) for w in recwarn]
        logging.getLogger("pydicom").warning("said outside cxrkit's reading")
    assert "said outside cxrkit's reading" in caplog.text


def test_a_dcm_file_without_the_preamble_is_read(tmp_path):
    """Older exports leave out the 128-byte preamble and 'DICM': the .dcm name is enough."""
    full = write_dicom(tmp_path / "full.dcm", dicom_ramp())
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(full.read_bytes()[132:])
    np.testing.assert_array_equal(np.asarray(read_image(bare)), np.asarray(read_image(full)))


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_a_bare_dicom_data_set_without_its_file_meta_header_is_read(tmp_path, implicit_vr):
    """Some exports write the data set alone: no preamble, no header naming its encoding."""
    import pydicom

    full = write_dicom(tmp_path / "full.dcm", dicom_ramp())
    ds = pydicom.dcmread(full)
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, ds, enforce_file_format=False, implicit_vr=implicit_vr,
                     little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(np.asarray(read_image(bare)), np.asarray(read_image(full)))


def test_dicoms_without_preamble_or_suffix_are_found_and_read(tmp_path):
    """PACS exports named by UID may also lack the preamble: found by their first tag."""
    import pydicom

    full = write_dicom(tmp_path / "full.dcm", dicom_ramp())
    films = tmp_path / "films"
    films.mkdir()
    (films / "IM0001").write_bytes(full.read_bytes()[132:])  # file meta group first
    ds = pydicom.dcmread(full)
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
    for name, implicit_vr in (("IM0002", True), ("1.2.840.3", False)):  # data set alone
        pydicom.dcmwrite(films / name, ds, enforce_file_format=False, implicit_vr=implicit_vr,
                         little_endian=True)
    (films / "IM0004").write_bytes(b"\0" * 64 + b"a number in its name, but no film")
    found = [p.name for p in images_under(films)]
    assert found == ["1.2.840.3", "IM0001", "IM0002"]
    for name in found:
        np.testing.assert_array_equal(np.asarray(read_image(films / name)),
                                      np.asarray(read_image(full)))


def test_a_png_named_dcm_is_read_as_the_png_it_is(tmp_path):
    film = synthetic_film("NORMAL", 3)
    film.save(tmp_path / "film.png")
    (tmp_path / "film.dcm").write_bytes((tmp_path / "film.png").read_bytes())
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "film.dcm")),
                                  np.asarray(film))
    (tmp_path / "junk.dcm").write_bytes(b"neither a DICOM nor an image " * 10)
    with pytest.raises(UnreadableImageError, match="junk.dcm: neither a DICOM file .* nor an "
                                                   "image PIL can read"):
        read_image(tmp_path / "junk.dcm")
    (tmp_path / "note.dcm").write_text("this is not a dicom\n")
    with pytest.raises(UnreadableImageError, match="note.dcm: neither a DICOM file"):
        read_image(tmp_path / "note.dcm")


def test_dicom_rescale_then_window(tmp_path):
    """Raw 0..4095 -> HU = raw - 1024 -> window 40 +- 200 HU.

    Raw 1064 is HU 40, the window's centre: mid gray. Without the rescale, raw 1064
    would lie far above the window (white); without the window, it would be dark gray.
    """
    raw = np.array([[0, 1024 - 200, 1064, 1064 + 190, 1064 + 300, 4095]], np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=40, WindowWidth=400)
    pixels = np.asarray(read_image(path))[0].astype(int)
    assert pixels[0] == 0 and pixels[1] == 0  # below the window
    assert abs(pixels[2] - 128) <= 2  # the centre
    assert pixels[3] > 240 and pixels[4] == 255 and pixels[5] == 255  # at and above the top


def test_dicom_negative_slope_inverts(tmp_path):
    plain = np.asarray(read_image(write_dicom(tmp_path / "a.dcm", dicom_ramp())))
    flipped = np.asarray(read_image(write_dicom(tmp_path / "b.dcm", dicom_ramp(),
                                                RescaleSlope=-1, RescaleIntercept=0)))
    np.testing.assert_array_equal(flipped, 255 - plain)


def tiny_png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge image; a few dozen bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def truncated_jpeg(path: Path) -> bytes:
    save(Image.fromarray(gradient(256, 256), "L"), path, quality=95)
    return path.read_bytes()[: path.stat().st_size // 2]


@pytest.mark.parametrize("name, make, reason", [
    ("zero.png", lambda p: b"", "empty file"),
    ("garbage.jpeg", lambda p: bytes(range(256)) * 8, "not an image"),
    ("notes.png", lambda p: b"patient 12: follow-up in 2 weeks\n" * 20, "not an image"),
    ("cut.jpeg", truncated_jpeg, "truncated"),
    # the cap is ours, not PIL's twice as high (quoted as the limit before)
    ("bomb.png", lambda p: tiny_png_claiming(100_000, 100_000),
     "too many pixels (10,000,000,000 > 64,000,000)"),
    ("bigbomb.png", lambda p: tiny_png_claiming(9_000, 9_000),
     "too many pixels (81,000,000 > 64,000,000)"),
])
def test_broken_files_raise_an_error_naming_the_file(tmp_path, name, make, reason):
    path = tmp_path / name
    path.write_bytes(make(path))
    assert path.stat().st_size < 100_000
    with pytest.raises(UnreadableImageError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert reason in info.value.reason


def test_postscript_posing_as_a_film_never_reaches_ghostscript(tmp_path, monkeypatch):
    """PIL's EPS plugin runs Ghostscript on a file's bytes (a film named .png can be
    PostScript, from an upload or a dataset someone sent): only image formats are decoded."""
    from PIL import EpsImagePlugin

    called = tmp_path / "gs-called"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{gs.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # found again, on this PATH
    film = tmp_path / "IM-0001-0001.png"
    film.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"
                     b"0 0 moveto 100 100 lineto stroke\nshowpage\n")
    with pytest.raises(UnreadableImageError, match="not an image"):
        read_image(film)
    assert not called.exists()


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableImageError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_a_16bit_array_reads_like_its_16bit_png(tmp_path):
    """A notebook's DICOM pixel array is stretched as its file would be, not cut to 8 bits."""
    deep = np.tile(np.linspace(0, 4095, 128).round().astype(np.uint16), (32, 1))
    Image.fromarray(deep).save(tmp_path / "deep.png")
    from_file = np.asarray(read_image(tmp_path / "deep.png"))
    assert np.array_equal(np.asarray(read_image(deep)), from_file)


def test_deep_films_are_stretched_between_the_documented_percentiles(tmp_path):
    """model.json tells other programs: 0.1th..99.9th percentiles (inside the fences), then
    0..255. A few pixels above the film, within the fences, clip; min..max would darken
    the whole film (its top to ~212)."""
    ramp = np.tile(np.arange(4096, dtype=np.uint16), (8, 1))
    ramp.flat[::2000] = 4914  # 0.05% of the pixels at 1.2x the film's top
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    lo, hi = np.percentile(ramp.astype(np.float32), (0.1, 99.9))
    expected = np.clip(np.round((ramp - lo) * 255 / (hi - lo)), 0, 255)
    read = np.asarray(read_image(tmp_path / "deep.png")).astype(int)
    assert np.abs(read - expected).max() <= 1 and read[0, 4095] == 255  # the film's top


def film_12bit() -> np.ndarray:
    """A film (no doubt about its pixels) stored in 12 bits."""
    return np.asarray(synthetic_film("NORMAL", 0), np.uint16) * 16


@pytest.mark.parametrize("elements, doubt", [
    ({"Modality": "CT"}, "modality CT, not a projection radiograph"),
    ({"Modality": "DX", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1.1"}, "'For Processing'"),
    ({"Modality": "DX", "PresentationIntentType": "FOR PROCESSING"}, "'For Processing'"),
])
def test_a_dicom_whose_header_says_it_is_no_chest_film_is_doubted(tmp_path, elements, doubt):
    """A CT slice or raw detector data still decode, and get a confident label: their
    header says what they are, and predict, serve, audit and adapt warn of it."""
    from cxrkit.data.io import film_doubt, read_for_model

    for modality in ("DX", "CR", None):  # no Modality at all tells nothing either
        plain = write_dicom(tmp_path / "dx.dcm", film_12bit(),
                            **({"Modality": modality} if modality else {}))
        if modality is None:
            import pydicom

            ds = pydicom.dcmread(plain)
            del ds.Modality
            ds.save_as(plain)
        assert film_doubt(read_image(plain)) is None
    path = write_dicom(tmp_path / "other.dcm", film_12bit(), **elements)
    assert doubt in film_doubt(read_image(path))
    assert doubt in read_for_model(path, 32, doubts=True)[2]


def test_a_multiframe_dicom_is_doubted_as_only_its_first_frame_is_scored(tmp_path):
    from cxrkit.data.io import film_doubt

    frames = np.stack([film_12bit(), film_12bit()[:, ::-1], film_12bit()])
    path = write_dicom(tmp_path / "three.dcm", frames, NumberOfFrames=3)
    assert "3 frames: only the first was read and scored" in film_doubt(read_image(path))


def test_frames_a_dicom_header_does_not_declare_are_read_as_frames_not_colour(tmp_path):
    """Without NumberOfFrames, pydicom returns [frames, rows, columns]: averaged over its last
    axis as colour, 3 frames of a film became a 16 x 3 image of row means, scored unsaid."""
    from cxrkit.data.io import film_doubt

    frames = np.stack([dicom_ramp(), dicom_ramp()[:, ::-1], dicom_ramp()])
    path = write_dicom(tmp_path / "undeclared.dcm", frames)  # NumberOfFrames absent
    first = write_dicom(tmp_path / "one.dcm", dicom_ramp())
    read = read_image(path)
    np.testing.assert_array_equal(np.asarray(read), np.asarray(read_image(first)))
    assert ("holds 3 frames where its header declares no frame count: only the first was read"
            in film_doubt(read))


def test_a_zero_filled_dicom_is_refused_at_once(tmp_path):
    """pydicom's forced read walked its zeros as empty elements: 0.8 s a MB, a whole server
    held up by one upload."""
    for name, head in (("zeros.dcm", b""), ("preamble.dcm", b"\0" * 128 + b"DICM")):
        path = tmp_path / name
        path.write_bytes(head + b"\0" * (1 << 20))
        with pytest.raises(UnreadableImageError, match="begins with zeros where a DICOM's "
                                                       "first element is"):
            read_image(path)  # refused before any forced read (0.8 s a MB)


def test_an_inverse_presentation_lut_inverts_monochrome2_once_and_monochrome1_once(tmp_path):
    mono2 = np.asarray(read_image(write_dicom(tmp_path / "a.dcm", dicom_ramp())))
    inverse2 = read_image(write_dicom(tmp_path / "b.dcm", dicom_ramp(),
                                      PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(np.asarray(inverse2), 255 - mono2)
    identity2 = read_image(write_dicom(tmp_path / "c.dcm", dicom_ramp(),
                                       PresentationLUTShape="IDENTITY"))
    np.testing.assert_array_equal(np.asarray(identity2), mono2)
    inverse1 = read_image(write_dicom(tmp_path / "d.dcm", dicom_ramp(), "MONOCHROME1",
                                      PresentationLUTShape="INVERSE"))  # DX's own pairing
    np.testing.assert_array_equal(np.asarray(inverse1), 255 - mono2)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_an_8bit_dicom_reads_as_its_8bit_png_does(tmp_path, photometric):
    """The same stored gray levels, unstretched: a model sees a hospital's 8-bit DICOM as it
    sees the same film exported as PNG or JPEG."""
    film = np.asarray(synthetic_film("PNEUMONIA", 4))
    stored = film if photometric == "MONOCHROME2" else 255 - film
    path = write_dicom(tmp_path / "film8.dcm", stored, photometric, BitsAllocated=8,
                       BitsStored=8, HighBit=7)
    png = save(Image.fromarray(film, "L"), tmp_path / "film.png")
    np.testing.assert_array_equal(np.asarray(read_image(path)), np.asarray(read_image(png)))
    windowed = write_dicom(tmp_path / "windowed8.dcm", stored, photometric, BitsAllocated=8,
                           BitsStored=8, HighBit=7, WindowCenter=128, WindowWidth=128)
    assert not np.array_equal(np.asarray(read_image(windowed)), film)  # its window applies


def test_reading_dicoms_in_threads_leaves_the_warning_filters_alone(tmp_path):
    """The ONNX backend reads films in threads: each read's catch_warnings saved and restored
    the process's filters, racing, and left `always` in force for the rest of the process."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    write_dicom(tmp_path / "whole.dcm", dicom_ramp())
    data = (tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:len(data) - 1000])  # warns as pydicom reads it

    def read(path: Path) -> bool:
        try:
            return read_image(path).size[0] > 0
        except UnreadableImageError:
            return False

    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        read_ok = list(pool.map(read, [tmp_path / "whole.dcm", tmp_path / "cut.dcm"] * 100))
    assert warnings.filters == before
    assert read_ok[:2] == [True, False]


def test_a_file_written_whole_on_a_full_disk_leaves_the_one_before(tmp_path):
    """report.html and audit.html were written in place: a full disk left 300 KB of a 1 MB
    report (which opens as a page that simply stops) and the good one before was gone."""
    page = tmp_path / "report.html"
    page.write_text("the report before", encoding="utf-8")
    result = run_with_files_under(100_000, [sys.executable, "-c", f"""
from pathlib import Path
from cxrkit.data.io import written_whole
with written_whole(Path({str(page)!r})) as partial:
    partial.write_text("x" * 300_000, encoding="utf-8")
"""])
    assert result.returncode == 1
    said = result.stderr.strip().splitlines()[-1]
    assert said.startswith("cxrkit.config.NoSpaceError: no room for report.html in "
                           f"{tmp_path} (at least 0.1 MiB needed"), said
    assert page.read_text(encoding="utf-8") == "the report before"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no partial left


def as_the_sidecar_says(path: Path) -> np.ndarray:
    """A DICOM read by the words of an export's model.json (`PREPROCESS`), with pydicom and
    NumPy alone: what a consumer of the ONNX file outside cxrkit does."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    as_stored = (ds.BitsStored <= 8 and ds.PixelRepresentation == 0
                 and not any(k in ds for k in ("RescaleSlope", "WindowCenter",
                                               "ModalityLUTSequence", "VOILUTSequence")))
    if as_stored:
        y = ds.pixel_array.astype(np.uint8)
    else:
        x = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, prefer_lut=True)
        x = np.asarray(x, np.float32)
        q1, q3 = np.percentile(x, (25, 75))
        kept = x[(x >= q1 - 3 * (q3 - q1)) & (x <= q3 + 3 * (q3 - q1))]
        lo, hi = np.percentile(kept, (0.1, 99.9))
        y = np.round(np.clip((x - lo) * (255 / (hi - lo)), 0, 255)).astype(np.uint8)
    inverse = ds.PhotometricInterpretation == "MONOCHROME1" or (
        ds.get("PresentationLUTShape") == "INVERSE")
    return 255 - y if inverse else y


def test_an_exports_dicom_recipe_reads_as_cxrkit_does(tmp_path):
    """model.json said every DICOM is stretched and only MONOCHROME1 inverted: an 8-bit one
    came out up to 43 gray levels off, one marked INVERSE upside down (a review)."""
    from cxrkit.export import PREPROCESS

    rng = np.random.default_rng(0)
    eight = np.clip(rng.normal(120, 30, (20, 30)), 30, 220).astype(np.uint8)
    films = [write_dicom(tmp_path / "8bit.dcm", eight, BitsAllocated=8, BitsStored=8, HighBit=7),
             write_dicom(tmp_path / "inverse.dcm", eight.astype(np.uint16) * 16,
                         PresentationLUTShape="INVERSE"),
             write_dicom(tmp_path / "mono1.dcm", dicom_ramp(), "MONOCHROME1"),
             write_dicom(tmp_path / "windowed.dcm", dicom_ramp(), WindowCenter=1500,
                         WindowWidth=2000)]
    for path in films:
        np.testing.assert_array_equal(np.asarray(read_image(path)), as_the_sidecar_says(path),
                                      err_msg=path.name)
    assert "taken as stored" in PREPROCESS and "PresentationLUTShape INVERSE" in PREPROCESS


def test_what_is_no_film_is_named_for_what_it_is(tmp_path):
    """Each got raw exception text, or "file not found" though it exists."""
    (tmp_path / "folder.jpg").mkdir()
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    for name, reason in (("folder.jpg", "a folder, not a file: give the folder to search it"),
                         ("pipe.jpg", "not a regular file (a named pipe or a device)"),
                         ("dangling.jpg", "a broken symbolic link"),
                         ("loop.jpg", "a broken symbolic link"),
                         ("absent.jpg", "file not found")):
        with pytest.raises(UnreadableImageError, match=re.escape(reason)):
            read_image(tmp_path / name)
    holes = np.full((64, 64), 0.5, np.float32)
    holes[3, 3] = np.nan
    Image.fromarray(holes, mode="F").save(tmp_path / "holes.tiff")
    with pytest.raises(UnreadableImageError, match=r"holes.tiff: its pixels hold NaN or "
                                                   r"infinite values, which no film has"):
        read_image(tmp_path / "holes.tiff")
    path = write_dicom(tmp_path / "rows0.dcm", dicom_ramp(), WindowCenter=100, WindowWidth=0)
    with pytest.raises(UnreadableImageError, match=r"its DICOM header or pixel data cannot be "
                                                   r"interpreted \(ValueError: .*Window Width.*"
                                                   r"export it again from the PACS"):
        read_image(path)


def test_a_multi_frame_gif_or_tiff_says_only_its_first_frame_is_read(tmp_path):
    """A DICOM said so; a GIF, APNG or TIFF stack was scored on its first frame unsaid."""
    from cxrkit.data.io import film_doubt

    frames = [Image.fromarray(gradient(256, 256)), Image.fromarray(gradient(256, 256)[:, ::-1])]
    for name in ("stack.tiff", "stack.gif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        read = read_image(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(read), gradient(256, 256))
        assert "2 frames: only the first was read and scored" in film_doubt(read)
    frames[0].save(tmp_path / "single.tiff")
    assert film_doubt(read_image(tmp_path / "single.tiff")) is None
    # a camera JPEG's preview picture (PIL: a second MPO frame) is no stack of films
    frames[0].convert("RGB").save(tmp_path / "camera.jpg", "MPO", save_all=True,
                                  append_images=[frames[1].convert("RGB")])
    assert film_doubt(read_image(tmp_path / "camera.jpg")) is None
