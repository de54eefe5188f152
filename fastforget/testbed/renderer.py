"""Procedural face renderer: unlimited identities, each a fixed vector of continuous factors.

Identity k is fully determined by k (its factors come from a generator seeded with k);
every image adds nuisance (pose, expression, lighting, background, noise) drawn from the
caller's seed. Everything is vectorised over the batch with numpy: a layer is a soft mask
(anti-aliased by one pixel) blended with a per-image colour.
"""
from __future__ import annotations

import numpy as np

# Identity factor names, in the order they are drawn; each is uniform in [0, 1).
IDENTITY_FACTORS = (
    "face_width", "face_height", "jaw_taper", "skin_lightness", "skin_warmth",
    "eye_size", "eye_spacing", "eye_height", "iris_hue", "brow_thickness", "brow_tilt",
    "nose_length", "nose_width", "mouth_width", "lip_colour", "hair_darkness", "hair_hue",
    "hair_length", "hairline", "hair_part", "ear_size", "glasses", "glasses_colour",
    "beard", "mouth_height",
)
N_FACTORS = len(IDENTITY_FACTORS)
_IDENTITY_SALT = 0xFACE5EED

_SKIN = np.array([[0.36, 0.22, 0.14], [0.58, 0.40, 0.28], [0.78, 0.60, 0.46], [0.95, 0.82, 0.70]], np.float32)
_HAIR = np.array([[0.06, 0.05, 0.05], [0.30, 0.18, 0.10], [0.55, 0.30, 0.12], [0.85, 0.70, 0.40],
                  [0.70, 0.70, 0.72]], np.float32)
_IRIS = np.array([[0.25, 0.15, 0.08], [0.20, 0.45, 0.75], [0.25, 0.55, 0.30], [0.45, 0.45, 0.50]], np.float32)


def identity_factors(identity_ids) -> np.ndarray:
    """(N, N_FACTORS) float32 in [0, 1): the identity vector of each id (pure function of the id)."""
    ids = np.asarray(identity_ids, dtype=np.int64).reshape(-1)
    if ids.size and ids.min() < 0:
        raise ValueError(f"identity ids must be >= 0, got {int(ids.min())}")
    out = np.empty((ids.size, N_FACTORS), np.float32)
    for i, k in enumerate(ids):
        out[i] = np.random.default_rng([_IDENTITY_SALT, int(k)]).random(N_FACTORS)
    return out


def _palette(table: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Piecewise-linear colour ramp through the rows of `table`, u in [0, 1]."""
    pos = np.clip(u, 0, 1) * (len(table) - 1)
    lo = np.minimum(pos.astype(np.int64), len(table) - 2)
    t = (pos - lo)[:, None]
    return table[lo] * (1 - t) + table[lo + 1] * t


def _blend(img, mask, colour):
    """img <- img + mask * (colour - img), in place; img is channel-first (3, N, H, W) so the
    inner loops run over pixels, not over 3 channels."""
    m = np.asarray(mask, np.float32)
    colour = np.asarray(colour, np.float32)
    for ch in range(3):
        delta = colour[:, ch, None, None] - img[ch]
        delta *= m
        img[ch] += delta
    return img


def _soft(d, aa):
    """Coverage from a signed distance (negative inside), one-pixel anti-aliasing."""
    return np.clip(0.5 - d / aa, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b):
    """Approximate signed distance to an axis-aligned ellipse, per image (params shaped (N,1,1))."""
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return (r - 1.0) * np.minimum(a, b)


def render(identity_ids, per_identity: int = 4, seed: int = 0, size: int = 32, *, nuisance: float = 1.0):
    """Draw `per_identity` images of each identity.

    Returns (images uint8 (N, size, size, 3), ids int64 (N,)) with N = len(ids) * per_identity,
    grouped by identity in the order given. Deterministic in (ids, per_identity, seed, size).
    `nuisance` scales pose/expression/lighting variation (0 = canonical frontal image).
    """
    ids = np.asarray(identity_ids, dtype=np.int64).reshape(-1)
    if per_identity < 1:
        raise ValueError(f"per_identity must be >= 1, got {per_identity}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    ids = np.repeat(ids, per_identity)
    n = ids.size
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8), ids
    f = identity_factors(ids)
    rng = np.random.default_rng([0x5EED, int(seed), int(size)])
    z = rng.random((n, 16)).astype(np.float32)
    s = float(nuisance)

    def col(v):  # (N,) -> (N,1,1) for broadcasting against the pixel grid
        return v.astype(np.float32)[:, None, None]

    # pixel-centre grid in [-1, 1], then the inverse pose transform per image
    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    gy, gx = np.meshgrid(g, g, indexing="ij")
    theta = col((z[:, 0] - 0.5) * 2 * np.deg2rad(10) * s)
    scale = col(1 + (z[:, 1] - 0.5) * 0.12 * s)
    tx, ty = col((z[:, 2] - 0.5) * 0.14 * s), col((z[:, 3] - 0.5) * 0.14 * s)
    xs, ys = (gx[None] - tx) / scale, (gy[None] - ty) / scale
    c, sn = np.cos(theta), np.sin(theta)
    x = c * xs + sn * ys
    y = -sn * xs + c * ys
    aa = 2.0 / size / scale

    # background: a random muted colour with a vertical gradient
    bg = (0.25 + 0.6 * rng.random((n, 3)).astype(np.float32)) * 0.7 + 0.15
    img = np.empty((3, n, size, size), np.float32)
    img[:] = bg.T[:, :, None, None] * (1 - 0.15 * (gy + 1) / 2)

    fw = col(0.44 + 0.16 * f[:, 0])
    fh = col(0.56 + 0.16 * f[:, 1])
    jaw = col(0.45 * f[:, 2])
    skin = _palette(_SKIN, f[:, 3]) * (0.92 + 0.16 * f[:, 4:5] * np.array([1.0, 0.85, 0.7], np.float32))
    skin = np.clip(skin, 0, 1)
    hair = _palette(_HAIR, f[:, 15] * 0.999)
    hair = np.clip(hair * (0.85 + 0.3 * f[:, 16:17] * np.array([1.15, 0.95, 0.8], np.float32)), 0, 1)
    hair_len = col(f[:, 17])
    cy_face = 0.06

    # long hair behind the head
    d_back = _ellipse(x, y, 0, cy_face - 0.02, fw + 0.12, fh * (0.9 + 0.9 * hair_len))
    back = _soft(d_back, aa) * (hair_len > 0.35)
    img = _blend(img, back * (y > cy_face - 0.3), hair)
    # neck and shoulders
    neck = _soft(np.maximum(np.abs(x) - fw * 0.45, -(y - cy_face - fh * 0.5)), aa)
    img = _blend(img, neck, skin * 0.85)
    shirt_col = _palette(_IRIS[::-1], z[:, 4]) * 0.8 + 0.1
    shoulders = _soft(_ellipse(x, y, 0, col(np.full(n, 1.25)), fw * 2.0, col(np.full(n, 0.45))), aa)
    img = _blend(img, shoulders, shirt_col)
    # ears
    ear_r = col(0.06 + 0.07 * f[:, 20])
    for side in (-1, 1):
        img = _blend(img, _soft(_ellipse(x, y, side * fw * 0.98, cy_face, ear_r * 0.8, ear_r * 1.3), aa), skin * 0.9)
    # face with a tapering jaw: the lower half narrows with jaw_taper
    taper = 1 - jaw * np.clip((y - cy_face) / fh, 0, 1)
    d_face = _ellipse(x / np.maximum(taper, 0.3), y, 0, cy_face, fw, fh)
    face = _soft(d_face, aa)
    img = _blend(img, face, skin)
    # beard: darkened lower face in hair colour
    beard = (f[:, 23] > 0.7).astype(np.float32)
    beard_m = face * _soft(-(y - cy_face - fh * 0.35), aa) * col(beard * (0.5 + 0.5 * f[:, 23]))
    img = _blend(img, beard_m, hair * 0.9)
    # hair on top: inside a slightly larger head ellipse, above a tilted hairline
    hairline = cy_face - fh * (0.25 + 0.45 * col(f[:, 18]))
    part = col((f[:, 19] - 0.5) * 0.5)
    d_cap = np.maximum(_ellipse(x, y, 0, cy_face - 0.02, fw + 0.05, fh + 0.06), y - (hairline + part * x))
    img = _blend(img, _soft(d_cap, aa), hair)
    # eyes: white, iris, pupil; openness is expression nuisance
    eye_y = cy_face - fh * (0.05 + 0.2 * col(f[:, 7]))
    eye_dx = fw * (0.32 + 0.22 * col(f[:, 6]))
    eye_r = 0.055 + 0.05 * col(f[:, 5])
    open_ = 0.55 + 0.45 * (1 - s * col(z[:, 5]) * 0.8)
    iris = _palette(_IRIS, f[:, 8])
    brow_t = 0.02 + 0.05 * col(f[:, 9])
    tilt = (col(f[:, 10]) - 0.5) * 0.6
    for side in (-1, 1):
        ex = side * eye_dx
        img = _blend(img, _soft(_ellipse(x, y, ex, eye_y, eye_r * 1.3, eye_r * open_), aa), np.full((n, 3), 0.95, np.float32))
        img = _blend(img, _soft(_ellipse(x, y, ex, eye_y, eye_r * 0.7, eye_r * 0.7 * open_), aa), iris)
        img = _blend(img, _soft(_ellipse(x, y, ex, eye_y, eye_r * 0.3, eye_r * 0.3 * open_), aa), np.zeros((n, 3), np.float32))
        # brow: a thick tilted bar above the eye
        bx = x - ex
        by = y - (eye_y - eye_r * 1.6 - side * tilt * bx)
        d_brow = np.maximum(np.abs(bx) - eye_r * 1.5, np.abs(by) - brow_t / 2)
        img = _blend(img, _soft(d_brow, aa), hair * 0.8)
    # nose: a vertical ellipse slightly darker than the skin
    nose_len = 0.08 + 0.12 * col(f[:, 11])
    nose_w = 0.035 + 0.05 * col(f[:, 12])
    img = _blend(img, _soft(_ellipse(x, y, 0, cy_face + nose_len * 0.5, nose_w, nose_len), aa) * 0.8, skin * 0.72)
    # mouth: an arc whose curvature is the smile (expression nuisance)
    mouth_y = cy_face + fh * (0.42 + 0.18 * col(f[:, 24]))
    mouth_w = fw * (0.3 + 0.35 * col(f[:, 13]))
    smile = (col(z[:, 6]) - 0.3) * 0.5 * s
    lip = np.clip(_palette(_SKIN, f[:, 3]) * np.array([1.0, 0.55, 0.55], np.float32) + 0.25 * f[:, 14:15] * np.array([0.6, 0.0, 0.05], np.float32), 0, 1)
    my = y - mouth_y + smile * (x / mouth_w) ** 2 * 0.08
    d_mouth = np.maximum(np.abs(x) - mouth_w, np.abs(my) - 0.028)
    img = _blend(img, _soft(d_mouth, aa), lip)
    # glasses: two rings and a bridge
    has_glasses = col((f[:, 21] > 0.7).astype(np.float32))
    frame = _palette(_HAIR[[0, 4, 2]], f[:, 22])
    ring = np.zeros_like(x)
    for side in (-1, 1):
        d = _ellipse(x, y, side * eye_dx, eye_y, eye_r * 2.0 + 0.02, eye_r * 1.7 + 0.02)
        ring = np.maximum(ring, _soft(np.abs(d) - 0.018, aa))
    bridge = _soft(np.maximum(np.abs(x) - (eye_dx - eye_r * 2.0), np.abs(y - eye_y) - 0.015), aa)
    img = _blend(img, np.maximum(ring, bridge) * has_glasses, frame)

    # lighting: directional gradient and global brightness, then sensor noise
    phi = z[:, 7] * 2 * np.pi
    strength = col(0.25 * z[:, 8] * s)
    light = 1 + strength * (gx[None] * col(np.cos(phi)) + gy[None] * col(np.sin(phi)))
    bright = col(1 + (z[:, 9] - 0.5) * 0.25 * s)
    img *= (light * bright)[None]
    img += rng.normal(0, 0.02 * max(s, 0.25), img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) * 255 + 0.5
    return np.ascontiguousarray(img.transpose(1, 2, 3, 0)).astype(np.uint8), ids
