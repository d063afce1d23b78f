"""A session's label maps (`LabelMaps`, a mixin of `sambtcv.servers.sessions.VolumeSession`): the merged map of its
organs, slices of it while a walk runs, Dice against a reference, and the downloads (NIfTI in the upload's own
geometry, a DICOM SEG of the series it came as, the CT reoriented for the page)."""
from __future__ import annotations

import gzip

import numpy as np

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import organ_name
from sambtcv.core.prompts import present_organs
from sambtcv.data.btcv import orientation_change
from sambtcv.engine.propagation import merge
from sambtcv.engine.volume import label_map_bytes

IMAGE_GZIP_LEVEL = 1  # the CT served to the page: fast to compress, the page inflates it


class LabelMaps:
    """What a session's organs give as label maps (uses the session's case, organs, job, lock and version cache)."""

    def dice(self) -> dict | None:
        """Per organ (in the reference or segmented), 3D Dice of the label map against the reference."""
        if self.case.label is None:
            return None
        key = ("dice", self.version)
        if key not in self._cache:
            labels, ref = self.labels(), self.case.label
            organs = sorted(set(self.organs) | set(present_organs(ref)))
            self._cache[key] = {organ_name(o): round(float(dice_score(labels == o, ref == o)), 4) for o in organs}
        return self._cache[key]

    def _organ_masks(self, live: bool) -> list:
        job = self.job if live and self.busy() else None
        out = []
        for organ, state in self.organs.items():
            out.append(state.masks({**job.base, **job.live}) if job is not None and organ == job.organ
                       else state.masks())
        return out

    def labels(self) -> np.ndarray:
        """The (K, H, W) label map (BTCV ids) of the committed masks, in the slice frame."""
        key = ("labels", self.version)
        if key not in self._cache:
            with self.lock:
                self._cache[key] = merge([s.masks() for s in self.organs.values()], self.case.stack.shape)
        return self._cache[key]

    def label_slices(self, first: int, last: int, live: bool = False) -> np.ndarray:
        """Slices first..last of the label map ((n, H, W) uint8, slice frame); with `live`, the walk in
        progress shows the slices it has decoded so far."""
        from sambtcv.engine.propagation import OrganMasks

        if not (0 <= first <= last < self.n_slices):
            raise PipelineError(f"slices {first}..{last} are not inside 0..{self.n_slices - 1}")
        with self.lock:
            organs = [OrganMasks(om.organ, {k - first: v for k, v in om.slices.items() if first <= k <= last})
                      for om in self._organ_masks(live)]
        return merge(organs, (last - first + 1, *self.case.stack.shape[1:]))

    def label_map_nifti(self) -> bytes:
        """The label map as .nii.gz bytes with the uploaded file's exact shape, affine and orientation."""
        key = ("nifti", self.version)
        if key not in self._cache:
            self._cache[key] = label_map_bytes(self.labels(), self.case)
        return self._cache[key]

    def seg_dicom(self) -> bytes:
        """The label map as a DICOM SEG of the series the CT came as (`sambtcv.data.dicom.write_seg`)."""
        import nibabel as nib

        from sambtcv.data import dicom

        if self.series is None:
            raise PipelineError("this CT was not opened as a DICOM series; save the label map as NIfTI "
                                "(labels.nii.gz) instead")
        key = ("seg", self.version)
        if key not in self._cache:
            volume = np.asarray(nib.Nifti1Image.from_bytes(label_map_bytes(self.labels(), self.case, gz=False)).dataobj)
            out = self.folder / "labels-seg.dcm"
            dicom.write_seg(volume, self.series, out, self.engine.model)
            self._cache[key] = out.read_bytes()
            out.unlink()
        return self._cache[key]

    def image_nifti(self) -> bytes:
        """The CT as .nii.gz reoriented to the slice frame's canonical axes (config.ORIENTATION): voxel
        (i, j, k) is pixel (x = i, y = j) of slice k. HU as stored, for the page's own windowing."""
        if self._image is None:
            import nibabel as nib

            img = nib.load(str(self.case.image_path))
            canon = img.as_reoriented(orientation_change(self.case.image_path, config.ORIENTATION, to_stored=False))
            self._image = gzip.compress(canon.to_bytes(), compresslevel=IMAGE_GZIP_LEVEL, mtime=0)
        return self._image
