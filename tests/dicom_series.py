"""Test data: a CT volume written as a DICOM series with pydicom, in any orientation, with the faults
real series have (a gap, a tilt, two series, another modality, no FrameOfReferenceUID)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # nibabel's RAS world -> DICOM's LPS patient coordinates


def flipped(volume: np.ndarray, affine: np.ndarray, axes=(0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored with the given voxel axes reversed (another orientation)."""
    out, aff = volume, affine.copy()
    for a in axes:
        out = np.flip(out, axis=a)
        aff[:3, 3] = aff[:3, 3] + aff[:3, a] * (volume.shape[a] - 1)
        aff[:3, a] = -aff[:3, a]
    return np.ascontiguousarray(out), aff


def write_series(folder: Path, volume: np.ndarray, affine: np.ndarray, *, modality: str = "CT",
                 frame_of_reference: bool = True, slope: float = 1.0, intercept: float = -1024.0,
                 skip: tuple = (), tilt_mm: float = 0.0, series_uid: str | None = None,
                 iop_jitter: dict | None = None, names: str = "slice{:04d}.dcm") -> list[Path]:
    """`volume` (i, j, k) of HU with nibabel `affine` as one DICOM file per slice k (pixel row j, column
    i), stored values (HU - intercept) / slope as int16. `skip`: slices left out (a gap); `tilt_mm`:
    each slice moved along the rows by this much per slice (a gantry tilt); `iop_jitter`: {k: IOP}."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = LPS @ affine
    col_step, row_step = m[:3, 0], m[:3, 1]  # along i (columns), along j (rows)
    row_dir, col_dir = col_step / np.linalg.norm(col_step), row_step / np.linalg.norm(row_step)
    study, series = generate_uid(), series_uid or generate_uid()
    frame = generate_uid()
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    paths = []
    for k in range(volume.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / names.format(k)
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "P001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyID, ds.AccessionNumber = study, series, "1", ""
        ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20260101", "120000", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 3, k + 1, "sam-btcv tests"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ipp = (m @ [0, 0, k, 1])[:3] + row_dir * tilt_mm * k
        ds.ImagePositionPatient = [float(v) for v in ipp]
        iop = (iop_jitter or {}).get(k, [*row_dir, *col_dir])
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
        ds.SliceThickness = float(np.linalg.norm(m[:3, 2]))
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        stored = np.round((volume[:, :, k].T.astype(float) - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def zipped(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return out
