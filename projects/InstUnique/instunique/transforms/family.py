"""Random sampling of the transform T that makes the equivariance pair (x, T(x)).

The family is supp. S1 / Table S3: horizontal flip, random crop keeping 0.6-1.0 of each
side, rotation by 0-60 degrees, scaling by 0.5-2.0. The main experiments use flip + crop.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from .affine import AffineWarp

__all__ = ["TransformFamily"]

# Fixed composition order of the members.
ALLOWED_NAMES = ("crop", "scaling", "rotation", "flip")

# No side of x' may be shorter than this (unless x itself is), so the stride-32 features of
# x' keep at least one cell and the equivariance loss has pixels to supervise.
MIN_SIDE = 8


def _pair(value, name: str) -> Tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi) of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {(lo, hi)}")
    if lo > hi:
        raise ValueError(f"{name} must satisfy lo <= hi, got {(lo, hi)}")
    return lo, hi


class TransformFamily:
    """Samples one geometric transform per training pair.

    Unlike Alg. 1 of the paper (``RandomChoice`` over {flip, crop}, i.e. exactly one member
    per pair), every enabled member is sampled independently and the results are composed in
    the fixed order crop -> scaling -> rotation -> flip:

    - crop: keeps a fraction drawn uniformly from ``crop_range`` of EACH side
      (independently for height and width) at a uniformly random pixel-aligned position;
      the kept pixel counts are rounded but kept inside the range whenever an integer
      count fits in it. A fraction of 1.0 on both sides is the identity.
    - scaling: factor drawn log-uniformly from ``scale_range`` (so shrinking by 1/k is as
      likely as enlarging by k), output size round(side * factor).
    - rotation: angle drawn uniformly from ``rotation_range`` (degrees), with a random sign,
      about the image centre; the frame keeps its size and corners become invalid.
    - flip: horizontal flip with probability ``flip_prob``.

    Guard against degenerate views: crop keeps at least ``min(side, 8)`` pixels and the
    scale factor is raised (beyond ``scale_range`` if need be) until both sides of x' are
    at least 8 pixels, or not shrunk at all when x is already smaller.

    Sampling draws only from the given ``np.random.Generator``: the same seed gives the
    same transform.
    """

    def __init__(
        self,
        names: Sequence[str] = ("flip", "crop"),
        crop_range: Sequence[float] = (0.6, 1.0),
        rotation_range: Sequence[float] = (0.0, 60.0),
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
    ):
        if isinstance(names, str):
            names = (names,)
        names = tuple(names)
        for n in names:
            if n not in ALLOWED_NAMES:
                raise ValueError(
                    f"names: unknown transform {n!r}; allowed: {', '.join(sorted(ALLOWED_NAMES))}"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"names: each transform may appear once, got {names}")
        crop_lo, crop_hi = _pair(crop_range, "crop_range")
        if not (0.0 < crop_lo <= crop_hi <= 1.0):
            raise ValueError(f"crop_range fractions must lie in (0, 1], got {(crop_lo, crop_hi)}")
        rot_lo, rot_hi = _pair(rotation_range, "rotation_range")
        if not (0.0 <= rot_lo and rot_hi <= 180.0):
            raise ValueError(
                f"rotation_range must lie in [0, 180] degrees (the sign is random), got "
                f"{(rot_lo, rot_hi)}"
            )
        scale_lo, scale_hi = _pair(scale_range, "scale_range")
        if not scale_lo > 0.0:
            raise ValueError(f"scale_range factors must be > 0, got {(scale_lo, scale_hi)}")
        flip_prob = float(flip_prob)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")

        # Stored in the composition order, whatever order the caller gave.
        self.names = tuple(n for n in ALLOWED_NAMES if n in names)
        self.crop_range = (crop_lo, crop_hi)
        self.rotation_range = (rot_lo, rot_hi)
        self.scale_range = (scale_lo, scale_hi)
        self.flip_prob = flip_prob

    def __repr__(self) -> str:
        return (
            f"TransformFamily(names={self.names}, crop_range={self.crop_range}, "
            f"rotation_range={self.rotation_range}, scale_range={self.scale_range}, "
            f"flip_prob={self.flip_prob})"
        )

    def sample(self, h: int, w: int, rng: np.random.Generator) -> AffineWarp:
        """Draw T for an (h, w) image x; returns the AffineWarp x -> x'."""
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        warp = AffineWarp.identity(h, w)
        for name in self.names:
            step = getattr(self, f"_sample_{name}")(*warp.dst_size, rng)
            warp = warp.compose(step)
        return warp

    def _sample_crop(self, h: int, w: int, rng: np.random.Generator) -> AffineWarp:
        ch = self._crop_side(h, rng.uniform(*self.crop_range))
        cw = self._crop_side(w, rng.uniform(*self.crop_range))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return AffineWarp.crop(h, w, y0, x0, ch, cw)

    def _crop_side(self, side: int, frac: float) -> int:
        lo, hi = self.crop_range
        keep = int(round(side * frac))
        lo_px, hi_px = math.ceil(side * lo - 1e-9), math.floor(side * hi + 1e-9)
        if lo_px <= hi_px:  # an integer count inside the range exists: stay in it
            keep = min(max(keep, lo_px), hi_px)
        return min(max(keep, min(side, MIN_SIDE)), side)

    def _sample_scaling(self, h: int, w: int, rng: np.random.Generator) -> AffineWarp:
        lo, hi = self.scale_range
        factor = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        factor = max(factor, min(1.0, MIN_SIDE / min(h, w)))
        return AffineWarp.scale(h, w, factor)

    def _sample_rotation(self, h: int, w: int, rng: np.random.Generator) -> AffineWarp:
        angle = rng.uniform(*self.rotation_range)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return AffineWarp.rotation(h, w, sign * angle)

    def _sample_flip(self, h: int, w: int, rng: np.random.Generator) -> AffineWarp:
        if rng.random() < self.flip_prob:
            return AffineWarp.hflip(h, w)
        return AffineWarp.identity(h, w)
