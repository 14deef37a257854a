"""Fixed 2D sine-cosine position embedding (DETR style), shared by the pixel decoder and the
transformer decoder of Mask2Former. It has no parameters, so official checkpoints hold no key
for it."""

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine embedding of the (y, x) position of every pixel of a feature map.

    Channel ``c`` of each half is ``sin`` (even ``c``) or ``cos`` (odd ``c``) of
    ``pos / temperature ** (2 * (c // 2) / num_pos_feats)``; the first half encodes y, the
    second x. Positions count valid (unpadded) pixels from 1, so padding does not shift
    them; with ``normalize`` they are divided by the valid extent and scaled to ``(0, scale]``.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        """
        Args:
            num_pos_feats: channels per axis; the output has ``2 * num_pos_feats`` channels.
            temperature: base of the geometric progression of wavelengths.
            normalize: divide positions by the valid height/width before embedding.
            scale: range of normalized positions (default ``2 * pi``); needs ``normalize``.
        """
        super().__init__()
        if num_pos_feats <= 0:
            raise ValueError(f"num_pos_feats must be positive, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W); only its batch size, spatial size, device and dtype are used.
            mask: optional (B, H, W) bool, True on padded pixels.

        Returns:
            (B, 2 * num_pos_feats, H, W) embedding: float64 for float64 ``x``, else float32
            (as official, also under AMP: half precision would blur the fine wavelengths).
        """
        if x.dim() != 4:
            raise ValueError(
                f"PositionEmbeddingSine expects x of shape (B, C, H, W), got {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        if mask is None:
            mask = torch.zeros((b, h, w), dtype=torch.bool, device=x.device)
        elif mask.shape != (b, h, w):
            raise ValueError(
                f"PositionEmbeddingSine: mask shape {tuple(mask.shape)} does not match "
                f"(B, H, W) = {(b, h, w)} of x"
            )
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        valid = (~mask.bool()).to(dtype)
        y_pos = valid.cumsum(1)
        x_pos = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale

        channel = torch.arange(self.num_pos_feats, device=x.device)
        wavelengths = self.temperature ** (2 * (channel // 2).to(dtype) / self.num_pos_feats)
        is_sin = channel % 2 == 0
        pos_y = self._sin_cos(y_pos[..., None] / wavelengths, is_sin)
        pos_x = self._sin_cos(x_pos[..., None] / wavelengths, is_sin)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        return pos

    @staticmethod
    def _sin_cos(angles: torch.Tensor, is_sin: torch.Tensor) -> torch.Tensor:
        """(..., F) angles -> (..., F): sin where ``is_sin`` (even channels), cos elsewhere."""
        return torch.where(is_sin, angles.sin(), angles.cos())

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
