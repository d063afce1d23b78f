"""DICOM in (a CT series: a folder of its files, or a .zip of one) and DICOM SEG out.

Reading (`read_series`): pydicom reads every file's header (files that are not DICOM are passed over) and
groups them by SeriesInstanceUID; SimpleITK's series reader (GDCM) orders the chosen series' slices
along the normal of ImageOrientationPatient by ImagePositionPatient, builds the geometry from IOP, IPP
and PixelSpacing and applies RescaleSlope / RescaleIntercept. The rest of the pipeline reads NIfTI, so the
series is written as a NIfTI with that geometry (`to_nifti`): label maps made on it lie on the series'
grid and open over the series in ITK-SNAP or 3D Slicer.

Strict where geometry is at stake, each one line naming what is wrong and how to choose: several series
in one folder (unless `series` picks one), a non-CT modality, slices of more than one orientation, a
missing slice (uneven spacing beyond SPACING_TOLERANCE), a gantry tilt (slice positions not along the
normal), no DICOM at all. Forgiving where it is not: localizer images inside the series are left out
(said in a note), and a missing FrameOfReferenceUID is no error for reading.

Writing (`write_seg`): highdicom's `Segmentation`, one segment per organ (its BTCV name, SNOMED-CT codes:
category Anatomical Structure, the organ's type and, for paired organs, its laterality), frames on the
source images' grid referencing the series, and the algorithm named (the model). A source without a
FrameOfReferenceUID gets a new one in the SEG only (`seg_note` says so); the files are never changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sambtcv.core.errors import PipelineError

SPACING_TOLERANCE = 0.1  # slice gaps may differ from the median gap by this fraction (else: a missing slice)
ORIENTATION_TOLERANCE = 1e-3  # IOP components of one series may differ by this much
TILT_TOLERANCE = 1e-2  # sine of the angle between the slice positions' line and the slice normal
MAX_ZIP_BYTES = 4 * 2 ** 30  # a zip may unpack to at most this much
MAX_ZIP_FILES = 20000
ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")
RIGHT, LEFT = ("24028007", "SCT", "Right"), ("7771000", "SCT", "Left")
ORGAN_CODES = {  # BTCV name -> (SNOMED-CT code, meaning, laterality)
    "spleen": ("78961009", "Spleen", None), "right_kidney": ("64033007", "Kidney", RIGHT),
    "left_kidney": ("64033007", "Kidney", LEFT), "gallbladder": ("28231008", "Gallbladder", None),
    "esophagus": ("32849002", "Esophagus", None), "liver": ("10200004", "Liver", None),
    "stomach": ("69695003", "Stomach", None), "aorta": ("15825003", "Aorta", None),
    "inferior_vena_cava": ("64131007", "Inferior vena cava", None),
    "portal_and_splenic_veins": ("32764006", "Portal vein", None), "pancreas": ("15776009", "Pancreas", None),
    "right_adrenal_gland": ("23451007", "Adrenal gland", RIGHT),
    "left_adrenal_gland": ("23451007", "Adrenal gland", LEFT),
}
LOCALIZER = "LOCALIZER"


def is_dicom_source(path) -> bool:
    """A folder, or a .zip file: what the pipeline reads as a DICOM series (a file is read as NIfTI)."""
    path = Path(path)
    return path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip")


@dataclass
class Series:
    """One CT series: its files in the order SimpleITK reads them, their headers, and what the SEG needs."""

    uid: str
    files: list  # [Path], slice order
    headers: list  # pydicom datasets without pixel data, same order
    frame_of_reference: str | None
    notes: list = field(default_factory=list)
    folder: Path | None = None  # where the files are (a zip's temporary folder)


def _headers(folder: Path) -> dict:
    """SeriesInstanceUID -> [(path, header)] of every DICOM file below `folder`."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, TypeError, KeyError):
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:  # images, not reports
            out.setdefault(uid, []).append((path, ds))
    return out


def _choose(series: dict, uid: str | None, where: str) -> str:
    if not series:
        raise PipelineError(f"{where} holds no DICOM image files; give a folder (or .zip) of one CT series, or a "
                            f"NIfTI file")
    if uid:
        if uid not in series:
            raise PipelineError(f"{where} has no series {uid}; it holds {', '.join(sorted(series))}")
        return uid
    if len(series) > 1:
        listed = "; ".join(f"{u} ({len(v)} files, {v[0][1].get('Modality', '?')}, "
                           f"'{v[0][1].get('SeriesDescription', '')}')" for u, v in sorted(series.items()))
        raise PipelineError(f"{where} holds {len(series)} series ({listed}); pick one with --series UID")
    return next(iter(series))


def _check_geometry(items: list, where: str) -> list[str]:
    """The series' slices checked (one orientation, even spacing, no tilt); the notes of what was forgiven."""
    notes = []
    modality = {str(ds.get("Modality", "")) for _, ds in items}
    if modality != {"CT"}:
        raise PipelineError(f"{where} is a {'/'.join(sorted(modality)) or 'modality-less'} series, not CT; the "
                            f"models here were made for CT (give a CT series)")
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        raise PipelineError(f"{where} mixes slice orientations ({len(np.unique(iops.round(3), axis=0))} different "
                            f"ImageOrientationPatient); give one orientation's files, or pick its series")
    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    order = np.argsort(ipps @ normal)
    ipps = ipps[order]
    steps = np.diff(ipps, axis=0)
    if len(steps):
        gaps = steps @ normal
        if (np.abs(gaps) < 1e-6).any():
            raise PipelineError(f"{where} has two slices at the same position; it holds more than one volume "
                                f"(a time series or a repeat?): give one volume's files")
        sines = np.linalg.norm(np.cross(steps / np.linalg.norm(steps, axis=1, keepdims=True), normal), axis=1)
        if sines.max() > TILT_TOLERANCE:
            raise PipelineError(f"{where} has a gantry tilt (slice positions leave the slice normal by "
                                f"{np.degrees(np.arcsin(min(1.0, sines.max()))):.1f} degrees), which this reader "
                                f"does not resample; resample the series first (e.g. dcm2niix, or 3D Slicer)")
        median = float(np.median(gaps))
        bad = np.flatnonzero(np.abs(gaps - median) > SPACING_TOLERANCE * abs(median))
        if len(bad):
            i = int(bad[0])
            raise PipelineError(f"{where} has uneven slice spacing: {gaps[i]:.2f} mm between the slices at "
                                f"{ipps[i] @ normal:.2f} and {ipps[i + 1] @ normal:.2f} mm against {median:.2f} mm "
                                f"elsewhere (a missing slice?); give the complete series")
    if not all(ds.get("FrameOfReferenceUID") for _, ds in items):
        notes.append("the series has no FrameOfReferenceUID (read as it is)")
    return notes


@contextlib.contextmanager
def opened(source, workdir: Path | None = None):
    """A folder of DICOM files for `source` (a folder as it is, or a .zip unpacked into a temporary folder,
    removed afterwards unless `workdir` holds it)."""
    source = Path(source)
    if source.is_dir():
        yield source
        return
    own = workdir is None
    target = Path(tempfile.mkdtemp(prefix="sam-btcv-dicom-")) if own else Path(workdir)
    try:
        unzip(source, target)
        yield target
    finally:
        if own:
            shutil.rmtree(target, ignore_errors=True)


def unzip(path: Path, target: Path) -> None:
    """A zip's files into `target` (no names outside it, no links, bounded sizes)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_ZIP_FILES or sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
                raise PipelineError(f"{path.name} unpacks to more than {MAX_ZIP_FILES} files or "
                                    f"{MAX_ZIP_BYTES / 2**30:.0f} GB; give one CT series")
            target.mkdir(parents=True, exist_ok=True)
            root = target.resolve()
            for n, info in enumerate(infos):
                dest = (target / f"f{n:06d}").resolve()  # the zip's own names are never used as paths
                if root not in dest.parents:
                    raise PipelineError(f"{path.name} holds a file outside its folder")
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PipelineError(f"{path.name} is not a readable .zip ({type(exc).__name__}: {str(exc)[:120]})") from None


def read_series(folder: Path, uid: str | None = None, where: str | None = None) -> Series:
    """The one CT series of `folder` (or the series `uid`), checked; its files in SimpleITK's slice order."""
    import SimpleITK as sitk

    folder = Path(folder)
    where = where or str(folder)
    groups = _headers(folder)
    uid = _choose(groups, uid, where)
    items = groups[uid]
    notes = []
    localizers = [p for p, ds in items if LOCALIZER in [str(v).upper() for v in ds.get("ImageType", [])]]
    if localizers:
        items = [(p, ds) for p, ds in items if p not in localizers]
        notes.append(f"{len(localizers)} localizer image(s) of the series left out")
    if len(items) < 2:
        raise PipelineError(f"{where}: the series {uid} has {len(items)} image; a CT volume needs at least 2 slices")
    notes += _check_geometry(items, where)
    # GDCM's own order of the series' files (along the normal, by position)
    ordered = [Path(p) for p in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, False, True)]
    keep = {Path(p) for p, _ in items}
    ordered = [p for p in ordered if p in keep]
    if len(ordered) != len(items):
        raise PipelineError(f"{where}: SimpleITK's series reader finds {len(ordered)} of the series' {len(items)} "
                            f"images; the files may be damaged")
    header = {Path(p): ds for p, ds in items}
    frame = str(items[0][1].get("FrameOfReferenceUID", "") or "") or None
    return Series(uid, ordered, [header[p] for p in ordered], frame, notes, folder)


def to_nifti(series: Series, out: Path) -> Path:
    """The series as a NIfTI volume (HU, int16 where the values allow) with the series' geometry."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise PipelineError(f"SimpleITK could not read the series {series.uid}: {str(exc).splitlines()[-1][:160]}") \
            from None
    values = sitk.GetArrayViewFromImage(image)
    if np.allclose(values, np.round(values)) and values.min() >= -32768 and values.max() <= 32767:
        image = sitk.Cast(image, sitk.sitkInt16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.nii.gz")
    sitk.WriteImage(image, str(tmp))
    tmp.replace(out)
    return out


_CONVERTED: dict = {}
_WORK: list = []


def as_nifti(path, series_uid: str | None = None) -> Path:
    """`path` itself for a NIfTI file; for a DICOM folder or .zip, the series converted to a NIfTI in this
    process's temporary folder (once per path, series and files' sizes and times)."""
    path = Path(path)
    if not is_dicom_source(path):
        return path
    key = (str(path.resolve()), series_uid, _stamp(path))
    if key not in _CONVERTED:
        if not _WORK:
            _WORK.append(Path(tempfile.mkdtemp(prefix="sam-btcv-series-")))
            import atexit

            atexit.register(shutil.rmtree, _WORK[0], True)
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        with opened(path, _WORK[0] / f"{name}-files" if path.is_file() else None) as folder:
            series = read_series(folder, series_uid, str(path))
            for note in series.notes:
                print(f"note: {path}: {note}", flush=True)
            _CONVERTED[key] = (to_nifti(series, _WORK[0] / f"{name}.nii.gz"), series)
    return _CONVERTED[key][0]


def series_of(path, series_uid: str | None = None) -> Series:
    """The `Series` behind `as_nifti(path)` (converted first if need be)."""
    as_nifti(path, series_uid)
    path = Path(path)
    return _CONVERTED[(str(path.resolve()), series_uid, _stamp(path))][1]


def _stamp(path: Path) -> tuple:
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return (len(files), sum(p.stat().st_size for p in files), max((p.stat().st_mtime_ns for p in files), default=0))


# ---------------------------------------------------------------------------------------------- DICOM SEG
def seg_note(series: Series) -> str | None:
    """What the SEG does about a source without a FrameOfReferenceUID (None when it has one)."""
    if series.frame_of_reference:
        return None
    return ("the series has no FrameOfReferenceUID: the SEG gets a new one of its own and places its frames by "
            "referencing each source image (SOP Instance UID) with the images' own positions; the source files "
            "are not changed")


def segment_description(number: int, organ: str, model: str, version: str):
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    code, meaning, side = ORGAN_CODES[organ]
    desc = hd.seg.SegmentDescription(
        segment_number=number, segment_label=organ, segmented_property_category=CodedConcept(*ANATOMICAL_STRUCTURE),
        segmented_property_type=CodedConcept(code, "SCT", meaning), algorithm_type="SEMIAUTOMATIC",
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=f"sam-btcv {model}", family=codes.cid7162.ArtificialIntelligence, version=version))
    if side is not None:
        desc.SegmentedPropertyTypeModifierCodeSequence = [CodedConcept(*side)]
    return desc


def write_seg(labels_ijk: np.ndarray, series: Series, out: Path, model: str, version: str = "1") -> Path:
    """A DICOM Segmentation of the label map `labels_ijk` (BTCV ids, on `to_nifti`'s voxel grid: i = column,
    j = row, k = the series' slice order), one segment per organ present, written atomically to `out`."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    from sambtcv.core.files import write_bytes
    from sambtcv.core.names import ORGANS

    if labels_ijk.shape != (int(series.headers[0].Columns), int(series.headers[0].Rows), len(series.files)):
        raise PipelineError(f"the label map {labels_ijk.shape} is not on the series' grid")
    present = [o for o in range(1, len(ORGANS) + 1) if (labels_ijk == o).any()]
    if not present:
        raise PipelineError("the label map holds no organ; a DICOM SEG needs at least one segment")
    sources = [pydicom.dcmread(p) for p in series.files]
    frame = series.frame_of_reference or generate_uid()
    for ds in sources:  # in-memory copies for highdicom; the files stay as they are
        if not ds.get("FrameOfReferenceUID"):
            ds.FrameOfReferenceUID = frame
    frames = np.stack([np.stack([labels_ijk[:, :, n].T == o for o in present], axis=-1) for n in range(len(sources))])
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=[segment_description(i + 1, ORGANS[o - 1], model, version) for i, o in enumerate(present)],
        series_instance_uid=generate_uid(), series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="sam-btcv",
        manufacturer_model_name=f"sam-btcv {model}", software_versions=version, device_serial_number="0",
        content_description="organs segmented with SAM (sam-btcv)", series_description="sam-btcv segmentation")
    import io

    buf = io.BytesIO()
    seg.save_as(buf)
    return write_bytes(Path(out), buf.getvalue())


def read_seg_masks(path: Path, series: Series) -> dict:
    """{organ name: (i, j, k) bool mask on the series' grid} of a SEG written for `series` (highdicom's reader)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    sops = [str(ds.SOPInstanceUID) for ds in series.headers]
    out = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, segment_numbers=[number],
                                                   assert_missing_frames_are_empty=True)
        out[label] = np.asarray(pixels[..., 0]).transpose(2, 1, 0).astype(bool)
    return out
