"""One geometric transform T of the equivariance pair (x, x' = T(x)), paper Eq. 8.

Every member of the transform family (flip, crop, rotation, scaling and their
compositions) is an affine map of the plane, so a single record -- a 2x3 matrix plus the
sizes of both views -- warps images, masks, boxes, polygons and feature maps of any stride
consistently.

Coordinate convention (used by every method here):
    Continuous coordinates (x, y) with x along columns. Pixel (row i, col j) covers
    [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5) and an image of size (h, w)
    covers [0, w) x [0, h). A feature map of stride s has cell (i, j) centred at
    ((j + 0.5) * s, (i + 0.5) * s): feature coordinates are image coordinates / s exactly.
    This is detectron2's convention for boxes and polygons, so those need no shift.

A pixel of x' is *valid* when its centre maps (under T^-1) inside x; everything else of x'
has no counterpart in x and must carry no loss.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AffineWarp", "warp_feature_batch"]

# dtypes cv2.warpAffine interpolates natively; others are converted or refused.
_CV2_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _check_size(size, name: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (h, w) of ints, got {size!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(size):
        raise ValueError(f"{name} must be a pair of positive ints (h, w), got {tuple(size)!r}")
    return h, w


def _to3x3(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


class AffineWarp:
    """An affine map from the continuous pixel coordinates of view x to those of view x'.

    Attributes:
        matrix (np.ndarray): (2, 3) float64, ``x' = matrix @ [x, y, 1]``.
        src_size (tuple[int, int]): (h, w) of view x.
        dst_size (tuple[int, int]): (h', w') of view x'.

    The object is immutable and picklable, so data-loader workers can ship it with the
    pair of views.
    """

    __slots__ = ("_matrix", "_src_size", "_dst_size")

    def __init__(self, matrix, src_size: Sequence[int], dst_size: Sequence[int]):
        m = np.asarray(matrix, dtype=np.float64)
        if m.shape != (2, 3):
            raise ValueError(f"AffineWarp matrix must have shape (2, 3), got {m.shape}")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"AffineWarp matrix must be finite, got {m.tolist()}")
        if abs(np.linalg.det(m[:, :2])) < 1e-12:
            raise ValueError(f"AffineWarp matrix is singular: {m.tolist()}")
        m = m.copy()
        m.setflags(write=False)
        self._matrix = m
        self._src_size = _check_size(src_size, "src_size")
        self._dst_size = _check_size(dst_size, "dst_size")

    @property
    def matrix(self) -> np.ndarray:
        return self._matrix

    @property
    def src_size(self) -> Tuple[int, int]:
        return self._src_size

    @property
    def dst_size(self) -> Tuple[int, int]:
        return self._dst_size

    def __repr__(self) -> str:
        rows = ", ".join("[" + ", ".join(f"{v:.4g}" for v in r) + "]" for r in self._matrix)
        return f"AffineWarp(matrix=[{rows}], src_size={self._src_size}, dst_size={self._dst_size})"

    def __getstate__(self):
        return (self._matrix, self._src_size, self._dst_size)

    def __setstate__(self, state):
        matrix, src, dst = state
        m = np.array(matrix, dtype=np.float64)
        m.setflags(write=False)
        self._matrix, self._src_size, self._dst_size = m, tuple(src), tuple(dst)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, h: int, w: int) -> AffineWarp:
        return cls(np.eye(2, 3), (h, w), (h, w))

    @classmethod
    def hflip(cls, h: int, w: int) -> AffineWarp:
        """Horizontal flip: x' = w - x (pixel column j goes to w - 1 - j)."""
        h, w = _check_size((h, w), "image size")
        return cls([[-1.0, 0.0, w], [0.0, 1.0, 0.0]], (h, w), (h, w))

    @classmethod
    def crop(cls, h: int, w: int, y0: int, x0: int, ch: int, cw: int) -> AffineWarp:
        """Keep the pixel-aligned window rows [y0, y0+ch), cols [x0, x0+cw) of an (h, w) image."""
        h, w = _check_size((h, w), "image size")
        ch, cw = _check_size((ch, cw), "crop size (ch, cw)")
        if int(y0) != y0 or int(x0) != x0 or y0 < 0 or x0 < 0:
            raise ValueError(f"crop offset (y0, x0) must be non-negative ints, got {(y0, x0)}")
        if y0 + ch > h or x0 + cw > w:
            raise ValueError(
                f"crop window rows [{y0}, {y0 + ch}) x cols [{x0}, {x0 + cw}) leaves the "
                f"image of size (h, w)={(h, w)}"
            )
        return cls([[1.0, 0.0, -float(x0)], [0.0, 1.0, -float(y0)]], (h, w), (ch, cw))

    @classmethod
    def rotation(cls, h: int, w: int, degrees: float) -> AffineWarp:
        """Rotate the content about the image centre (w/2, h/2), keeping the (h, w) frame.

        Positive angles turn the content counter-clockwise as displayed (y points down), as
        in ``cv2.getRotationMatrix2D``. Corners of x' that come from outside x are invalid.
        """
        h, w = _check_size((h, w), "image size")
        if not math.isfinite(degrees):
            raise ValueError(f"rotation degrees must be finite, got {degrees}")
        t = math.radians(degrees)
        c, s = math.cos(t), math.sin(t)
        cx, cy = w / 2.0, h / 2.0
        m = [[c, s, cx - c * cx - s * cy], [-s, c, cy + s * cx - c * cy]]
        return cls(m, (h, w), (h, w))

    @classmethod
    def scale(cls, h: int, w: int, factor: float) -> AffineWarp:
        """Resize to (round(h * factor), round(w * factor)).

        The matrix uses the exact ratios new/old per axis (not ``factor``), so the pixel
        grid of x' tiles the frame of x exactly, like a resize with align_corners=False.
        """
        h, w = _check_size((h, w), "image size")
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"scale factor must be a positive finite number, got {factor}")
        nh, nw = int(round(h * factor)), int(round(w * factor))
        if nh < 1 or nw < 1:
            raise ValueError(f"scale factor {factor} shrinks the (h, w)={(h, w)} image to nothing")
        return cls([[nw / w, 0.0, 0.0], [0.0, nh / h, 0.0]], (h, w), (nh, nw))

    # ------------------------------------------------------------------ algebra
    def inverse(self) -> AffineWarp:
        """The map x' -> x (sizes swapped)."""
        inv = np.linalg.inv(_to3x3(self._matrix))[:2]
        return AffineWarp(inv, self._dst_size, self._src_size)

    def compose(self, other: AffineWarp) -> AffineWarp:
        """Apply ``self`` then ``other``: x -> x' -> x''."""
        if not isinstance(other, AffineWarp):
            raise ValueError(f"compose expects an AffineWarp, got {type(other).__name__}")
        if other.src_size != self._dst_size:
            raise ValueError(
                f"cannot compose: this warp outputs size {self._dst_size} but the next warp "
                f"expects src_size {other.src_size}"
            )
        m = (_to3x3(other.matrix) @ _to3x3(self._matrix))[:2]
        return AffineWarp(m, self._src_size, other.dst_size)

    # ------------------------------------------------------------------ geometry
    def apply_coords(self, coords) -> np.ndarray:
        """(N, 2) continuous (x, y) of view x -> (N, 2) float64 of view x'."""
        xy = np.asarray(coords, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"apply_coords expects an (N, 2) array, got shape {xy.shape}")
        return xy @ self._matrix[:, :2].T + self._matrix[:, 2]

    def apply_box(self, boxes) -> np.ndarray:
        """(N, 4) XYXY boxes -> (N, 4) boxes enclosing the 4 warped corners, clipped to x'.

        Under rotation the result encloses the rotated box, so it is looser than the box
        of the rotated object.
        """
        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"apply_box expects an (N, 4) XYXY array, got shape {b.shape}")
        corners = b[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)
        warped = self.apply_coords(corners).reshape(-1, 4, 2)
        out = np.concatenate([warped.min(axis=1), warped.max(axis=1)], axis=1)
        h, w = self._dst_size
        out[:, 0::2] = out[:, 0::2].clip(0, w)
        out[:, 1::2] = out[:, 1::2].clip(0, h)
        return out

    def apply_polygons(self, polygons) -> List[np.ndarray]:
        """List of flat [x0, y0, x1, y1, ...] arrays -> warped list (float64, not clipped)."""
        out = []
        for k, poly in enumerate(polygons):
            p = np.asarray(poly, dtype=np.float64)
            if p.ndim != 1 or p.size % 2:
                raise ValueError(
                    f"polygon {k} must be a flat array of even length, got shape {p.shape}"
                )
            out.append(self.apply_coords(p.reshape(-1, 2)).reshape(-1))
        return out

    def _source_of_dst_centres(self) -> np.ndarray:
        """(h', w', 2) continuous coordinates in x of every pixel centre of x'."""
        h, w = self._dst_size
        ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        inv = self.inverse().matrix
        sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
        sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        return np.stack([sx, sy], axis=-1)

    def valid_mask(self) -> np.ndarray:
        """(h', w') bool: pixels of x' whose centre maps inside x."""
        src = self._source_of_dst_centres()
        h, w = self._src_size
        return (src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)

    # ------------------------------------------------------------------ rasters
    def _check_raster(self, arr: np.ndarray, what: str) -> None:
        if arr.ndim not in (2, 3) or tuple(arr.shape[:2]) != self._src_size:
            raise ValueError(
                f"{what} must have shape (h, w) or (h, w, C) with (h, w)={self._src_size} "
                f"(the warp's src_size), got {arr.shape}"
            )

    def apply_image(self, img: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Bilinear warp of an (h, w) or (h, w, C) image into x': (h', w'[, C]), same dtype.

        Pixels of x' whose source lies outside x take ``fill``; pixels within half a pixel
        of the border of x blend with it.
        """
        img = np.asarray(img)
        self._check_raster(img, "apply_image input")
        dtype = img.dtype
        if dtype == np.float16:
            work = img.astype(np.float32)
        elif dtype.type in _CV2_DTYPES:
            work = img
        else:
            raise ValueError(
                f"apply_image supports uint8/uint16/int16/float16/32/64 images, got {dtype}; "
                "use apply_segmentation for label maps and boolean masks"
            )
        # cv2 indexes pixels by their centres: index = continuous coordinate - 0.5.
        shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
        m_idx = (np.linalg.inv(shift) @ _to3x3(self._matrix) @ shift)[:2]
        h, w = self._dst_size
        channels = 1 if work.ndim == 2 else work.shape[2]
        out = cv2.warpAffine(
            work,
            m_idx,
            (w, h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=(float(fill),) * 4,
        )
        if img.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing singleton channel
            out = out[:, :, None]
        assert out.shape[:2] == (h, w) and (img.ndim == 2 or out.shape[2] == channels)
        return out.astype(dtype, copy=False)

    def apply_segmentation(self, mask: np.ndarray, fill=0) -> np.ndarray:
        """Nearest-neighbour warp of an (h, w) or (h, w, C) mask/label map of any dtype.

        A pixel of x' copies the pixel of x that contains its centre's pre-image; pixels
        outside ``valid_mask()`` take ``fill`` (e.g. 255 for an ignore label).
        """
        mask = np.asarray(mask)
        self._check_raster(mask, "apply_segmentation input")
        src = self._source_of_dst_centres()
        valid = self.valid_mask()
        h, w = self._src_size
        cols = np.clip(np.floor(src[..., 0]).astype(np.int64), 0, w - 1)
        rows = np.clip(np.floor(src[..., 1]).astype(np.int64), 0, h - 1)
        out = mask[rows, cols]
        out[~valid] = fill
        return out

    # ------------------------------------------------------------------ features
    def warp_features(
        self,
        feat: torch.Tensor,
        stride: float,
        src_valid_hw: Sequence[int] | None = None,
        dst_hw_padded: Sequence[int] | None = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Warp a stride-``stride`` feature map of view x onto the feature grid of view x'.

        Args:
            feat: (C, H, W) or (N, C, H, W) features of x (the same warp for all N). The
                tensor may be padded beyond the image: only the area of ``src_valid_hw``
                is read.
            stride: image pixels per feature cell.
            src_valid_hw: (h, w) of image x before padding; defaults to ``src_size`` and
                must equal it.
            dst_hw_padded: (Hf', Wf') of the output grid, e.g. the padded feature grid of
                the x' batch; defaults to ceil(dst_size / stride).

        Returns:
            warped: (C, Hf', Wf') or (N, C, Hf', Wf'), differentiable w.r.t. ``feat``;
                zero on invalid cells.
            valid: (Hf', Wf') bool: cells whose centre lies inside x' and maps inside x.
        """
        if not isinstance(feat, torch.Tensor) or feat.dim() not in (3, 4):
            shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
            raise ValueError(
                f"warp_features expects a (C, H, W) or (N, C, H, W) tensor, got {shape}"
            )
        batch = feat if feat.dim() == 4 else feat[None]
        n = batch.shape[0]
        out, valid = warp_feature_batch(
            batch,
            [self] * n,
            stride,
            None if src_valid_hw is None else [src_valid_hw] * n,
            dst_hw_padded,
        )
        return (out if feat.dim() == 4 else out[0]), valid[0]


def warp_feature_batch(
    feats: torch.Tensor,
    warps: Sequence[AffineWarp],
    stride: float,
    src_sizes: Sequence[Sequence[int]] | None = None,
    dst_grid_hw: Sequence[int] | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Warp each image's feature map by its own transform with one ``grid_sample`` call.

    Args:
        feats: (B, C, H, W) features of the x views at stride ``stride``, padded batch.
        warps: B AffineWarp records, warps[b] maps view x_b to view x'_b.
        stride: image pixels per feature cell (e.g. 4 for Mask2Former's mask features).
        src_sizes: B (h, w) unpadded image sizes of the x views; default/checked against
            ``warps[b].src_size``.
        dst_grid_hw: (Hf', Wf') output grid (the padded feature grid of the x' batch);
            defaults to the smallest grid covering every x'.

    Returns:
        warped: (B, C, Hf', Wf') in feats.dtype on feats.device; zero on invalid cells.
        valid: (B, Hf', Wf') bool: cell centre inside x'_b and its pre-image inside x_b.

    Sampling is bilinear (grid_sample, align_corners=False). Sample points are clamped to
    the span of the source's valid cell centres, so the padded part of ``feats`` is never
    read (the result does not depend on padding contents, and padding gets no gradient).
    """
    if not isinstance(feats, torch.Tensor) or feats.dim() != 4:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"warp_feature_batch expects feats of shape (B, C, H, W), got {shape}")
    b, _, hf, wf = feats.shape
    warps = list(warps)
    if len(warps) != b:
        raise ValueError(f"warp_feature_batch got {len(warps)} warps for a batch of {b}")
    if not all(isinstance(t, AffineWarp) for t in warps):
        raise ValueError("warp_feature_batch: every entry of warps must be an AffineWarp")
    s = float(stride)
    if not (s > 0 and math.isfinite(s)):
        raise ValueError(f"stride must be a positive number, got {stride}")
    if src_sizes is None:
        src_sizes = [t.src_size for t in warps]
    if len(src_sizes) != b:
        raise ValueError(f"warp_feature_batch got {len(src_sizes)} src_sizes for a batch of {b}")
    for k, (t, size) in enumerate(zip(warps, src_sizes)):
        size = _check_size(size, f"src_sizes[{k}]")
        if size != t.src_size:
            raise ValueError(
                f"src_sizes[{k}]={size} differs from warps[{k}].src_size={t.src_size}: the "
                "warp was sampled for another image"
            )
        if math.ceil(size[0] / s) > hf or math.ceil(size[1] / s) > wf:
            raise ValueError(
                f"image {k} of size {size} at stride {s} needs a feature map of at least "
                f"{(math.ceil(size[0] / s), math.ceil(size[1] / s))}, got {(hf, wf)}"
            )
    if dst_grid_hw is None:
        dst_grid_hw = (
            max(math.ceil(t.dst_size[0] / s) for t in warps),
            max(math.ceil(t.dst_size[1] / s) for t in warps),
        )
    ho, wo = _check_size(dst_grid_hw, "dst_grid_hw")

    # Per image, in float64 on the host: feature cell of x' -> continuous pixel coords in
    # x, and the valid-area limits. Only these tiny tables travel to the device.
    to_img = np.array([[s, 0.0, 0.0], [0.0, s, 0.0], [0.0, 0.0, 1.0]])
    mats = np.stack([(np.linalg.inv(_to3x3(t.matrix)) @ to_img)[:2] for t in warps])
    limits = np.array(
        [
            [
                *t.src_size[::-1],  # w, h of x: valid pre-images lie in [0, w) x [0, h)
                *t.dst_size[::-1],  # w', h' of x': valid cell centres lie in [0, w') x [0, h')
                math.ceil(t.src_size[1] / s) - 0.5,  # last valid source cell centre, x
                math.ceil(t.src_size[0] / s) - 0.5,  # and y, in feature coords
            ]
            for t in warps
        ]
    )

    # Coordinates in half precision would misplace samples by a good part of a cell.
    cdtype = feats.dtype if feats.dtype in (torch.float32, torch.float64) else torch.float32
    dev = feats.device
    mats_t = torch.as_tensor(mats, dtype=cdtype, device=dev)  # (B, 2, 3)
    lim = torch.as_tensor(limits, dtype=cdtype, device=dev)[:, :, None, None]  # (B, 6, 1, 1)

    ys = torch.arange(ho, dtype=cdtype, device=dev) + 0.5
    xs = torch.arange(wo, dtype=cdtype, device=dev) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # feature coords of x' cell centres
    # Elementwise rather than a batched matmul: an image's sample points must not depend on
    # which other images share its batch (matmul kernels round differently by batch size).
    m = mats_t[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    sx = m[:, 0, 0] * gx + m[:, 0, 1] * gy + m[:, 0, 2]  # (B, Ho, Wo) image coords of x
    sy = m[:, 1, 0] * gx + m[:, 1, 1] * gy + m[:, 1, 2]

    valid = (sx >= 0) & (sx < lim[:, 0]) & (sy >= 0) & (sy < lim[:, 1])
    valid &= (gx * s < lim[:, 2]) & (gy * s < lim[:, 3])

    fx = torch.minimum((sx / s).clamp(min=0.5), lim[:, 4])
    fy = torch.minimum((sy / s).clamp(min=0.5), lim[:, 5])
    grid = torch.stack([2.0 * fx / wf - 1.0, 2.0 * fy / hf - 1.0], dim=-1).to(feats.dtype)

    out = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * valid[:, None].to(out.dtype)
    return out, valid
