"""Synthetic contrast-enhanced abdominal CT phantom, written in BTCV's official layout.

Each volume is an elliptical abdomen (air, subcutaneous fat, muscle wall, ribs, a vertebra with
discs, spinal canal, paraspinal and psoas muscles, a fat/bowel background) holding the 13 BTCV
organs at anatomical places, in portal-venous-phase HU. Organs are unions of rotated ellipsoids
(liver, spleen, kidneys, stomach, gallbladder, adrenals) or tubes along smooth curves (aorta, IVC,
esophagus, pancreas, portal/splenic veins); their boundaries are perturbed by low-frequency cosine
noise, and sizes, positions, rotations and mean HU vary with the seed. Labels are painted in a fixed
priority order (later organs carve earlier ones), then the image is smoothed and Gaussian noise is
added. The first and last few slices hold no organ. Everything is deterministic per seed.

Geometry is laid out in millimetres around the volume centre with x -> patient Left, y -> Posterior,
z -> Superior, which is also the voxel order of the arrays (LPS); the NIfTI affine is the usual RAS+
nibabel affine for that order, ``diag(-sx, -sy, sz)`` plus an offset putting the centre at 0.
"""
from __future__ import annotations

import gzip
import io
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

from sambtcv.core.files import check_replaceable, write_bytes, write_json

# ----------------------------------------------------------------------------------------------
# Volume and layout
DEFAULT_SHAPE = (256, 256, 64)
DEFAULT_SPACING = (1.5, 1.5, 2.5)  # mm, (i, j, k)
END_EMPTY_SLICES = 3  # slices at each z end that never hold an organ (fewer for tiny volumes)
NIFTI_GZIP_LEVEL = 6
MARKER = "phantom.json"  # written beside RawData/: this folder holds a phantom and may be written again

# Painting order: a later organ overwrites (carves) earlier ones where they meet.
PAINT_ORDER = (6, 1, 7, 3, 2, 4, 11, 5, 9, 8, 10, 12, 13)

# ----------------------------------------------------------------------------------------------
# Intensities (HU)
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 50.0
BG_FAT_HU = -70.0  # intra-abdominal background: a smooth mix of fat and bowel
BG_BOWEL_HU = 30.0
BG_MIX_SHARPNESS = 3.0
BONE_CORTEX_HU = 700.0
BONE_CANCELLOUS_HU = 400.0
POSTERIOR_ELEMENTS_HU = 600.0
RIB_HU = 550.0
DISC_HU = 90.0
CSF_HU = 15.0
ORGAN_HU = {  # mean HU per organ (stomach: wall; kidneys: mean of cortex and medulla)
    1: 125.0, 2: 175.0, 3: 175.0, 4: 10.0, 5: 50.0, 6: 115.0, 7: 75.0, 8: 200.0, 9: 125.0,
    10: 160.0, 11: 95.0, 12: 45.0, 13: 45.0,
}
ORGAN_HU_JITTER_FRAC = 0.07  # per-seed mean shift, uniform +-7% of the mean ...
ORGAN_HU_JITTER_MIN = 3.0  # ... but at least +-3 HU
KIDNEY_CORTEX_OFFSET_HU = 20.0
KIDNEY_MEDULLA_OFFSET_HU = -25.0
KIDNEY_MEDULLA_LEVEL = 0.7  # normalised radius inside which the kidney is medulla
STOMACH_LUMEN_HU = 15.0
STOMACH_AIR_HU = -900.0
STOMACH_LUMEN_LEVEL = 0.75  # normalised radius inside which the stomach is lumen
STOMACH_AIR_DEPTH = 0.55  # lumen anterior of (centre - this * AP half-extent) holds air
ORGAN_TEXTURE_HU = 6.0  # amplitude of smooth intra-organ texture
# Liver lesions (a diseased phantom, `lesions` > 0): hypodense metastasis-like balls with an enhancing rim,
# labelled liver (as BTCV labels tumours), the first one large.
LESION_HU = (35.0, 65.0)  # core HU range (liver: ~115)
LESION_RIM_HU = 20.0  # rim brighter than the core
LESION_RIM_FRAC = 0.8  # normalised radius where the rim starts
LESION_RADIUS_MM = ((28.0, 40.0), (8.0, 18.0))  # the first lesion's radius range, then the others
NOISE_SIGMA_HU = (10.0, 20.0)  # per-seed range of the Gaussian noise sigma
SMOOTH_SIGMA_VOX = (0.6, 0.6, 0.3)  # Gaussian blur before noise
SMOOTH_FIELD_FACTOR = (6, 6, 3)  # downsampling of the smooth random fields
HU_CLIP = (-1024, 3071)

# ----------------------------------------------------------------------------------------------
# Body (mm; x left+, y posterior+, origin at the volume centre)
BODY_SEMI_MM = (165.0, 125.0)
BODY_CENTER_Y_MM = 8.0
BODY_EXPONENT = (2.0, 2.4)  # superellipse exponent range (flatter back and flanks when > 2)
FAT_THICKNESS_MM = (12.0, 22.0)
MUSCLE_THICKNESS_MM = 10.0
VERTEBRA_CENTER_MM = (0.0, 55.0)
VERTEBRA_RADIUS_MM = 19.0
VERTEBRA_CORTEX_MM = 2.5
DISC_PERIOD_MM = 32.0
DISC_THICKNESS_MM = 7.0
CANAL_CENTER_MM = (0.0, 86.0)
CANAL_RADIUS_MM = 8.0
LAMINA_RADIUS_MM = 14.0
SPINOUS_CENTER_MM = (0.0, 108.0)
SPINOUS_SEMI_MM = (5.0, 14.0)
PARASPINAL_CENTER_MM = (38.0, 102.0)  # mirrored to both sides
PARASPINAL_SEMI_MM = (28.0, 20.0)
PSOAS_CENTER_MM = (33.0, 55.0)
PSOAS_TOP_Z_MM = 20.0  # psoas appears below this and widens caudally
PSOAS_RADIUS_MM = (5.0, 16.0)
RIB_ANGLES_DEG = (-55.0, -30.0, -5.0, 20.0, 45.0, 135.0, 160.0, 185.0, 210.0, 235.0)
RIB_RADIUS_MM = 5.0
RIB_MIN_Z_MM = -30.0
RIB_PERIOD_MM = 28.0
RIB_DUTY = 0.5  # cos threshold: larger -> thinner bands of slices per rib

# ----------------------------------------------------------------------------------------------
# Per-seed variation
ANATOMY_SCALE = (0.93, 1.07)  # whole-body scale
GLOBAL_SHIFT_MM = (5.0, 4.0, 5.0)  # whole-anatomy shift, uniform +-
ORGAN_SHIFT_MM = 3.0  # per-organ shift, uniform +-
CONTROL_POINT_JITTER_MM = 2.0  # tube control points
SIZE_JITTER = 0.15  # organ size factor 1 +- this
YAW_JITTER_DEG = 12.0
TILT_JITTER_DEG = 6.0
BOUNDARY_NOISE = 0.12  # amplitude of boundary perturbation (normalised radius units)
BOUNDARY_FREQ = (1.5, 3.5)  # cycles across a normalised ellipsoid
BOUNDARY_TERMS = 4
TUBE_NOISE_SCALE_MM = 12.0
TUBE_RADIUS_WOBBLE = 0.08
TUBE_STEP_FRAC = 0.35  # sample spacing along a tube, fraction of its smallest semi-axis
BOX_MARGIN = 1.3

# ----------------------------------------------------------------------------------------------
# Organ shapes, nominal (scale 1), mm. Ellipsoid components: (center, semi-axes, (yaw, pitch, roll)
# degrees, is_hole). Yaw turns the local x axis toward +y within the axial plane.
ELLIPSOID_ORGANS = {
    6: [  # liver: right lobe, left lobe across the midline anteriorly, inferior right tip
        ((-62.0, 0.0, 28.0), (68.0, 72.0, 48.0), (0.0, 0.0, 0.0), False),
        ((-5.0, -42.0, 40.0), (42.0, 26.0, 26.0), (-10.0, 0.0, 0.0), False),
        ((-85.0, 5.0, -5.0), (35.0, 45.0, 35.0), (10.0, 0.0, 0.0), False),
    ],
    1: [  # spleen along the left posterolateral wall, hilum facing anteromedially
        ((92.0, 32.0, 40.0), (44.0, 20.0, 32.0), (-50.0, 0.0, 0.0), False),
        ((74.0, 17.0, 40.0), (18.0, 8.0, 16.0), (-50.0, 0.0, 0.0), True),
    ],
    7: [  # stomach: fundus/body left upper anterior, antrum toward the pylorus
        ((52.0, -30.0, 35.0), (34.0, 28.0, 34.0), (30.0, 0.0, 0.0), False),
        ((15.0, -50.0, 10.0), (30.0, 16.0, 14.0), (-20.0, 0.0, 0.0), False),
    ],
    3: [  # left kidney, hilum anteromedial, upper pole tilted medially
        ((62.0, 50.0, -2.0), (24.0, 20.0, 46.0), (30.0, -10.0, 0.0), False),
        ((47.0, 38.0, -2.0), (9.0, 9.0, 15.0), (0.0, 0.0, 0.0), True),
    ],
    2: [  # right kidney, mirrored and lower
        ((-62.0, 50.0, -17.0), (24.0, 20.0, 46.0), (-30.0, 10.0, 0.0), False),
        ((-47.0, 38.0, -17.0), (9.0, 9.0, 15.0), (0.0, 0.0, 0.0), True),
    ],
    4: [  # gallbladder under the liver, fundus anterior-inferior
        ((-45.0, -52.0, 2.0), (14.0, 15.0, 26.0), (0.0, 0.0, 20.0), False),
    ],
    12: [  # right adrenal: two thin limbs, superomedial to the right kidney, behind the IVC
        ((-36.0, 36.0, 32.0), (3.0, 10.0, 7.0), (25.0, 0.0, 0.0), False),
        ((-41.0, 41.0, 28.0), (3.0, 9.0, 6.0), (-35.0, 0.0, 0.0), False),
    ],
    13: [  # left adrenal, anteromedial to the upper pole of the left kidney
        ((40.0, 34.0, 44.0), (3.0, 10.0, 7.0), (-25.0, 0.0, 0.0), False),
        ((45.0, 40.0, 40.0), (3.0, 9.0, 6.0), (35.0, 0.0, 0.0), False),
    ],
}
# Tubes: control points (x, y, z, semi_x, semi_y, semi_z); a smooth curve runs through them.
TUBE_ORGANS = {
    8: [  # aorta, left-anterior of the spine, through every slice
        (12.0, 20.0, 95.0, 11.0, 11.0, 11.0), (15.0, 22.0, 0.0, 11.0, 11.0, 11.0),
        (14.0, 19.0, -95.0, 10.0, 10.0, 10.0),
    ],
    9: [  # IVC, right-anterior of the spine, flatter, moving anteriorly into the liver above
        (-20.0, 24.0, -95.0, 13.0, 8.0, 9.0), (-22.0, 22.0, 0.0, 13.0, 8.0, 9.0),
        (-27.0, 14.0, 40.0, 12.0, 9.0, 9.0), (-31.0, 2.0, 95.0, 12.0, 10.0, 10.0),
    ],
    5: [  # esophagus, anterior-left of the aorta, top slices only, ending in the stomach
        (12.0, -2.0, 95.0, 8.0, 8.0, 8.0), (16.0, -5.0, 66.0, 8.0, 8.0, 8.0),
        (30.0, -14.0, 50.0, 8.0, 8.0, 8.0),
    ],
    11: [  # pancreas: head right of midline, body anterior to the aorta, tail to the splenic hilum
        (-30.0, -10.0, -2.0, 13.0, 10.0, 12.0), (-8.0, -14.0, 4.0, 9.0, 7.0, 8.0),
        (22.0, -10.0, 10.0, 10.0, 7.5, 9.0), (52.0, 6.0, 16.0, 8.0, 6.0, 7.0),
        (70.0, 18.0, 20.0, 7.0, 5.5, 6.0),
    ],
    10: [  # splenic vein behind the pancreas, confluence, portal vein up into the liver hilum
        (72.0, 24.0, 22.0, 5.0, 5.0, 5.0), (50.0, 14.0, 17.0, 5.0, 5.0, 5.0),
        (22.0, 3.0, 11.0, 5.0, 5.0, 5.0), (0.0, -2.0, 8.0, 6.0, 6.0, 6.0),
        (-18.0, -6.0, 14.0, 7.0, 7.0, 7.0), (-35.0, -8.0, 24.0, 7.0, 7.0, 7.0),
        (-50.0, -8.0, 32.0, 6.0, 6.0, 6.0),
    ],
}


# ----------------------------------------------------------------------------------------------
# Geometry helpers
class _Grid:
    """Voxel-centre coordinates in mm (x left+, y posterior+, z superior+), origin at the centre."""

    def __init__(self, shape, spacing):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing)]

    def box(self, lo, hi):
        """Index slices of the voxels with centres in [lo, hi] (mm), or None when empty."""
        out = []
        for a, n, s, low, h in zip(self.axes, self.shape, self.spacing, lo, hi):
            i0 = max(0, int(np.ceil((low - a[0]) / s)))
            i1 = min(n, int(np.floor((h - a[0]) / s)) + 1)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, sl):
        """Broadcastable (X, Y, Z) coordinate arrays of a box."""
        x, y, z = (a[s] for a, s in zip(self.axes, sl))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _rotation(yaw, pitch, roll):
    """Rz(yaw) @ Ry(pitch) @ Rx(roll), degrees; columns are the local axes in world space."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def _cosine_noise(rng, amp):
    """Parameters of a sum of BOUNDARY_TERMS random low-frequency plane waves with total amplitude amp."""
    dirs = rng.normal(size=(BOUNDARY_TERMS, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = dirs * rng.uniform(*BOUNDARY_FREQ, size=(BOUNDARY_TERMS, 1))
    phases = rng.uniform(0.0, 2.0 * np.pi, BOUNDARY_TERMS)
    amps = rng.uniform(0.5, 1.0, BOUNDARY_TERMS)
    return freqs, phases, amps * (amp / amps.sum())


def _eval_noise(params, u0, u1, u2):
    freqs, phases, amps = params
    total = 0.0
    for f, ph, a in zip(freqs, phases, amps):
        total = total + a * np.cos(f[0] * u0 + f[1] * u1 + f[2] * u2 + ph)
    return total


def _smooth_field(rng, shape):
    """Zero-mean, roughly unit-variance random field, smooth on the scale of SMOOTH_FIELD_FACTOR voxels."""
    low_shape = tuple(max(2, -(-n // f)) for n, f in zip(shape, SMOOTH_FIELD_FACTOR))
    low = ndimage.gaussian_filter(rng.standard_normal(low_shape), 0.7, mode="wrap")
    low = ((low - low.mean()) / (low.std() + 1e-9)).astype(np.float32)
    field = ndimage.zoom(low, [n / m for n, m in zip(shape, low_shape)], order=1, mode="nearest")
    return field[: shape[0], : shape[1], : shape[2]]


class _Organ:
    """Randomised placement of one organ: p -> center + R_jitter @ ((p - ref) * scale) + shift."""

    def __init__(self, rng, ref, anatomy_scale, global_shift):
        self.ref = np.asarray(ref, float)
        self.size = anatomy_scale * rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)
        self.rot = _rotation(rng.uniform(-YAW_JITTER_DEG, YAW_JITTER_DEG),
                             rng.uniform(-TILT_JITTER_DEG, TILT_JITTER_DEG),
                             rng.uniform(-TILT_JITTER_DEG, TILT_JITTER_DEG))
        self.center = anatomy_scale * self.ref + global_shift + rng.uniform(-ORGAN_SHIFT_MM, ORGAN_SHIFT_MM, 3)

    def point(self, p):
        return self.center + self.rot @ ((np.asarray(p, float) - self.ref) * self.size)


def _ellipsoid_organ(rng, grid, comps, anatomy_scale, global_shift):
    """Union of (perturbed) ellipsoids minus holes. Returns (box slices, field F, info) or None;
    the organ is F < 1, F being a normalised radius."""
    organ = _Organ(rng, comps[0][0], anatomy_scale, global_shift)
    placed = []
    for center, semi, angles, hole in comps:
        c = organ.point(center)
        s = np.asarray(semi, float) * organ.size
        r = organ.rot @ _rotation(*angles)
        placed.append((c, s, r, hole, _cosine_noise(rng, BOUNDARY_NOISE)))
    solid = [p for p in placed if not p[3]]
    lo = np.min([c - BOX_MARGIN * s.max() for c, s, *_ in solid], axis=0)
    hi = np.max([c + BOX_MARGIN * s.max() for c, s, *_ in solid], axis=0)
    sl = grid.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = grid.coords(sl)
    field = None
    for c, s, r, hole, noise in placed:
        dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
        u = [(r[0, a] * dx + r[1, a] * dy + r[2, a] * dz) / s[a] for a in range(3)]
        f = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) - _eval_noise(noise, *u)
        if field is None:
            field = f
        elif hole:
            field = np.maximum(field, 2.0 - f)
        else:
            field = np.minimum(field, f)
    main_c, main_s, main_r = placed[0][:3]
    half_extent_y = float(np.sqrt(np.sum((main_r[1, :] * main_s) ** 2)))  # of the first ellipsoid
    return sl, field.astype(np.float32), {"Y": Y, "center": main_c, "semi_y": half_extent_y}


def _tube_organ(rng, grid, ctrl, anatomy_scale, global_shift):
    """Chain of axis-aligned ellipsoids along a smooth curve; returns (box slices, F, info) or None."""
    ctrl = np.asarray(ctrl, float)
    organ = _Organ(rng, ctrl[len(ctrl) // 2, :3], anatomy_scale, global_shift)
    pts = np.array([organ.point(p) for p in ctrl[:, :3]])
    pts += rng.uniform(-CONTROL_POINT_JITTER_MM, CONTROL_POINT_JITTER_MM, pts.shape)
    semis_ctrl = ctrl[:, 3:] * organ.size
    t = np.arange(len(pts), dtype=float)
    spline = CubicSpline(t, pts, bc_type="natural")
    dense_t = np.linspace(0.0, t[-1], 64 * len(pts))
    dense = spline(dense_t)
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(dense, axis=0), axis=1))])
    step = TUBE_STEP_FRAC * semis_ctrl.min()
    n = max(2, int(np.ceil(cum[-1] / step)) + 1)
    arc = np.linspace(0.0, cum[-1], n)
    ts = np.interp(arc, cum, dense_t)
    centers = spline(ts)
    semis = np.stack([np.interp(ts, t, semis_ctrl[:, a]) for a in range(3)], axis=1)
    wobble = 1.0 + TUBE_RADIUS_WOBBLE * np.sin(2 * np.pi * arc / rng.uniform(30.0, 60.0) + rng.uniform(0, 2 * np.pi))
    semis *= wobble[:, None]
    lo = (centers - BOX_MARGIN * semis).min(axis=0)
    hi = (centers + BOX_MARGIN * semis).max(axis=0)
    sl = grid.box(lo, hi)
    if sl is None:
        return None
    X, Y, Z = grid.coords(sl)
    field = np.full(tuple(s.stop - s.start for s in sl), np.inf, dtype=np.float32)
    starts = [s.start for s in sl]
    for c, s in zip(centers, semis):
        sub = grid.box(c - BOX_MARGIN * s, c + BOX_MARGIN * s)
        if sub is None:
            continue
        rel = tuple(slice(b.start - o, b.stop - o) for b, o in zip(sub, starts))
        x, y, z = grid.coords(sub)
        d = np.sqrt(((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2)
        np.minimum(field[rel], d, out=field[rel])
    noise = _cosine_noise(rng, BOUNDARY_NOISE)
    field -= _eval_noise(noise, X / TUBE_NOISE_SCALE_MM, Y / TUBE_NOISE_SCALE_MM, Z / TUBE_NOISE_SCALE_MM)
    return sl, field, {"Y": Y, "center": centers[len(centers) // 2], "semi_y": semis[:, 1].mean()}


def _ellipse2d(X, Y, cx, cy, ax, ay, p=2.0):
    return np.abs((X - cx) / ax) ** p + np.abs((Y - cy) / ay) ** p <= 1.0


def _body(rng, grid, scale):
    """Background image (float32) and the 2D mask where organs may lie."""
    x, y, z = grid.axes
    X, Y = x[:, None], y[None, :]
    A, B = BODY_SEMI_MM[0] * scale, BODY_SEMI_MM[1] * scale
    cy = BODY_CENTER_Y_MM * scale
    p = rng.uniform(*BODY_EXPONENT)
    fat = rng.uniform(*FAT_THICKNESS_MM)
    wall = fat + MUSCLE_THICKNESS_MM
    body = _ellipse2d(X, Y, 0.0, cy, A, B, p)
    under_fat = _ellipse2d(X, Y, 0.0, cy, A - fat, B - fat, p)
    cavity = _ellipse2d(X, Y, 0.0, cy, A - wall, B - wall, p)

    img2d = np.full(grid.shape[:2], AIR_HU, np.float32)
    img2d[body] = FAT_HU
    img2d[under_fat] = MUSCLE_HU
    for side in (-1.0, 1.0):
        img2d[_ellipse2d(X, Y, side * PARASPINAL_CENTER_MM[0] * scale, PARASPINAL_CENTER_MM[1] * scale,
                         PARASPINAL_SEMI_MM[0] * scale, PARASPINAL_SEMI_MM[1] * scale)] = MUSCLE_HU

    # Intra-abdominal fat/bowel mix.
    mix = _smooth_field(rng, grid.shape)
    bg = BG_FAT_HU + (BG_BOWEL_HU - BG_FAT_HU) / (1.0 + np.exp(-BG_MIX_SHARPNESS * mix))
    img = np.where(cavity[:, :, None], bg, img2d[:, :, None]).astype(np.float32)

    # Psoas muscles, widening caudally.
    frac = np.clip((PSOAS_TOP_Z_MM * scale - z) / (PSOAS_TOP_Z_MM * scale + abs(z[0]) + 1e-9), 0.0, 1.0)
    psoas_r = np.where(z < PSOAS_TOP_Z_MM * scale, PSOAS_RADIUS_MM[0] + frac * np.diff(PSOAS_RADIUS_MM)[0], 0.0)
    for side in (-1.0, 1.0):
        d = np.hypot(X - side * PSOAS_CENTER_MM[0] * scale, Y - PSOAS_CENTER_MM[1] * scale)
        img[d[:, :, None] <= psoas_r[None, None, :] * scale] = MUSCLE_HU

    # Ribs in the muscle layer of the upper slices.
    mid_a, mid_b = A - fat - MUSCLE_THICKNESS_MM / 2, B - fat - MUSCLE_THICKNESS_MM / 2
    for ang in RIB_ANGLES_DEG:
        th = np.deg2rad(ang + rng.uniform(-5.0, 5.0))
        rib2d = np.hypot(X - mid_a * np.cos(th), Y - (cy + mid_b * np.sin(th))) <= RIB_RADIUS_MM
        phase = rng.uniform(0.0, RIB_PERIOD_MM)
        ribz = (z > RIB_MIN_Z_MM) & (np.cos(2 * np.pi * (z - phase) / RIB_PERIOD_MM) > RIB_DUTY)
        img[rib2d[:, :, None] & ribz[None, None, :]] = RIB_HU

    # Spine: vertebral body with discs, posterior elements, canal.
    vx, vy = VERTEBRA_CENTER_MM[0] * scale, VERTEBRA_CENTER_MM[1] * scale
    dv = np.hypot(X - vx, Y - vy)
    vr = VERTEBRA_RADIUS_MM * scale
    disc_phase = rng.uniform(0.0, DISC_PERIOD_MM)
    disc = np.mod(z - disc_phase, DISC_PERIOD_MM) < DISC_THICKNESS_MM
    vert_hu = np.where(disc, DISC_HU, BONE_CANCELLOUS_HU).astype(np.float32)
    cortex_hu = np.where(disc, DISC_HU, BONE_CORTEX_HU).astype(np.float32)
    img = np.where((dv <= vr - VERTEBRA_CORTEX_MM)[:, :, None], vert_hu[None, None, :], img)
    img = np.where(((dv <= vr) & (dv > vr - VERTEBRA_CORTEX_MM))[:, :, None], cortex_hu[None, None, :], img)
    ccx, ccy = CANAL_CENTER_MM[0] * scale, CANAL_CENTER_MM[1] * scale
    dc = np.hypot(X - ccx, Y - ccy)
    spinous = _ellipse2d(X, Y, SPINOUS_CENTER_MM[0] * scale, SPINOUS_CENTER_MM[1] * scale,
                         SPINOUS_SEMI_MM[0] * scale, SPINOUS_SEMI_MM[1] * scale)
    posterior = (dc <= LAMINA_RADIUS_MM * scale) | spinous
    img[posterior] = POSTERIOR_ELEMENTS_HU
    canal = dc <= CANAL_RADIUS_MM * scale
    img[canal] = CSF_HU

    allowed2d = cavity & ~(dv <= vr) & ~posterior
    return img, allowed2d


def _liver_lesions(img: np.ndarray, label: np.ndarray, grid, n: int, seed: int) -> None:
    """Paint `n` hypodense lesions (balls with a brighter rim) into the liver of `img`, in place; centres
    drawn from the liver's voxels by their own generator (the rest of the phantom does not change)."""
    rng = np.random.default_rng([seed, 7919])
    liver = np.argwhere(label == 6)
    if not len(liver):
        return
    x, y, z = grid.axes
    for index in range(n):
        c = liver[rng.integers(len(liver))]
        radius = rng.uniform(*LESION_RADIUS_MM[0 if index == 0 else 1])
        d = np.sqrt((x[:, None, None] - x[c[0]]) ** 2 + (y[None, :, None] - y[c[1]]) ** 2
                    + (z[None, None, :] - z[c[2]]) ** 2) / radius
        inside = (d < 1.0) & (label == 6)
        core = rng.uniform(*LESION_HU)
        img[inside] = np.where(d[inside] > LESION_RIM_FRAC, core + LESION_RIM_HU, core)


def make_phantom_volume(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, lesions: int = 0):
    """Return ``(image, label, affine)`` for one synthetic abdominal CT.

    image: int16 HU, label: uint8 BTCV ids 0..13, both of ``shape`` with axes (i, j, k) in LPS voxel
    order (i -> patient Left, j -> Posterior, k -> Superior); affine: 4x4 float64 RAS+ (nibabel)
    affine ``diag(-sx, -sy, sz)`` with the volume centre at world 0, so ``aff2axcodes`` is
    ('L', 'P', 'S'). Deterministic per non-negative integer ``seed``. Anatomy is laid out in mm, so
    a coarser spacing with a smaller shape shows the same body. `lesions` > 0 paints that many liver
    lesions (the first large), labelled liver.
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"bad shape/spacing: {shape}, {spacing}")
    rng = np.random.default_rng(seed)
    grid = _Grid(shape, spacing)

    scale = rng.uniform(*ANATOMY_SCALE)
    gshift = rng.uniform(-1.0, 1.0, 3) * np.asarray(GLOBAL_SHIFT_MM)
    img, allowed2d = _body(rng, grid, scale)

    nz = shape[2]
    margin = min(END_EMPTY_SLICES, max(1, nz // 8))
    window = np.zeros(nz, bool)
    window[margin: nz - margin] = True
    allowed = allowed2d[:, :, None] & window[None, None, :]

    texture = _smooth_field(rng, shape)
    label = np.zeros(shape, np.uint8)
    for organ_id in PAINT_ORDER:
        base = ORGAN_HU[organ_id]
        hu = base + rng.uniform(-1.0, 1.0) * max(ORGAN_HU_JITTER_FRAC * abs(base), ORGAN_HU_JITTER_MIN)
        if organ_id in ELLIPSOID_ORGANS:
            built = _ellipsoid_organ(rng, grid, ELLIPSOID_ORGANS[organ_id], scale, gshift)
        else:
            built = _tube_organ(rng, grid, TUBE_ORGANS[organ_id], scale, gshift)
        if built is None:
            continue
        sl, field, info = built
        mask = (field < 1.0) & allowed[sl]
        values = np.full(field.shape, hu, np.float32)
        if organ_id in (2, 3):
            values = np.where(field < KIDNEY_MEDULLA_LEVEL, hu + KIDNEY_MEDULLA_OFFSET_HU,
                              hu + KIDNEY_CORTEX_OFFSET_HU).astype(np.float32)
        elif organ_id == 7:
            lumen = field < STOMACH_LUMEN_LEVEL
            air = lumen & (info["Y"] < info["center"][1] - STOMACH_AIR_DEPTH * info["semi_y"])
            values = np.where(lumen, STOMACH_LUMEN_HU, hu).astype(np.float32)
            values[air] = STOMACH_AIR_HU
        values += ORGAN_TEXTURE_HU * texture[sl]
        label[sl][mask] = organ_id
        img[sl][mask] = values[mask]

    if lesions:
        _liver_lesions(img, label, grid, lesions, seed)
    img = ndimage.gaussian_filter(img, SMOOTH_SIGMA_VOX, mode="nearest")
    img += rng.uniform(*NOISE_SIGMA_HU) * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(img), *HU_CLIP).astype(np.int16)

    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    center = (np.asarray(shape, float) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ center
    return image, label, affine


def _volume_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0])


def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    nii = nib.Nifti1Image(data, affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", mtime=0, compresslevel=NIFTI_GZIP_LEVEL) as gz:
        gz.write(nii.to_bytes())
    return buf.getvalue()


def spacing_for(shape) -> tuple[float, float, float]:
    """Voxel spacing (mm) that keeps the same body in a volume of `shape` voxels (coarser when smaller)."""
    return tuple(sp * d / n for sp, d, n in zip(DEFAULT_SPACING, DEFAULT_SHAPE, shape))


def write_phantom(raw_dir, n: int, seed: int, shape=DEFAULT_SHAPE, spacing=None,
                  lesions: int = 0) -> list[pathlib.Path]:
    """Write ``n`` phantoms as BTCV's ``RawData/Training/img/img{NNNN}.nii.gz`` and
    ``RawData/Training/label/label{NNNN}.nii.gz`` (NNNN = 0001..n) under ``raw_dir``.

    Volume NNNN uses a seed derived from ``(seed, NNNN)``; files are byte-identical for the same
    arguments (gzip mtime 0, no file name in the gzip header) and each is written to a temporary
    name in its folder, then moved into place. `spacing` defaults to `spacing_for(shape)`. Returns the
    image paths in order.
    """
    spacing = spacing_for(shape) if spacing is None else spacing
    check_replaceable(raw_dir, MARKER, "data folder")  # never overwrite a real dataset's imgNNNN files
    root = pathlib.Path(raw_dir) / "RawData" / "Training"
    img_dir, lab_dir = root / "img", root / "label"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(1, int(n) + 1):
        image, label, affine = make_phantom_volume(_volume_seed(seed, index), shape, spacing, lesions)
        img_path = img_dir / f"img{index:04d}.nii.gz"
        write_bytes(img_path, _nifti_gz_bytes(image, affine))
        write_bytes(lab_dir / f"label{index:04d}.nii.gz", _nifti_gz_bytes(label, affine))
        paths.append(img_path)
    write_json(pathlib.Path(raw_dir) / MARKER, {"volumes": int(n), "seed": int(seed), "shape": list(map(int, shape)),
                                                "spacing_mm": list(map(float, spacing)), "lesions": int(lesions)})
    return paths
