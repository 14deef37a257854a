"""Which pixels of a batch serve as external features and enter the memory."""
from typing import List, Sequence, Tuple

import torch


def semantic_label_maps(targets: List[dict], stride: int, grid_hw: Tuple[int, int]) -> torch.Tensor:
    """Ground-truth class at the centre of every cell of a stride-``stride`` grid.

    Args:
        targets: per image {"labels": (N,), "masks": (N, H_pad, W_pad)}.
        grid_hw: (H_f, W_f), the pixel-embedding grid; H_pad >= H_f * stride.
    Returns:
        (B, H_f, W_f) long: the class of the segment covering the cell centre, -1 if none.
    """
    h, w = grid_hw
    maps = []
    for t in targets:
        masks = t["masks"][:, stride // 2 :: stride, stride // 2 :: stride][:, :h, :w].bool()
        label = torch.full((h, w), -1, dtype=torch.long, device=masks.device)
        if masks.shape[0] > 0:
            covered, owner = masks.max(0)
            label[covered] = t["labels"][owner[covered]]
        maps.append(label)
    return torch.stack(maps)


def sample_pixels(
    pixel_embeds: torch.Tensor, label_maps: torch.Tensor, valid_hw: Sequence[Tuple[int, int]],
    num: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num`` cells per image, uniformly with replacement, from its unpadded area.

    Args:
        pixel_embeds: (B, C, H_f, W_f).
        label_maps: (B, H_f, W_f).
        valid_hw: per image, the unpadded grid size (h_f, w_f).
    Returns:
        feats (B, num, C) (not detached) and labels (B, num).
    """
    b, c, _, w_full = pixel_embeds.shape
    device = pixel_embeds.device
    hw = torch.tensor(valid_hw, device=device, dtype=torch.long).clamp(min=1)  # (B, 2)
    u = torch.rand(b, num, 2, device=device)
    rows = (u[..., 0] * hw[:, :1]).long()
    cols = (u[..., 1] * hw[:, 1:]).long()
    flat = rows * w_full + cols  # (B, num)
    feats = pixel_embeds.flatten(2).gather(2, flat[:, None, :].expand(b, c, num))
    labels = label_maps.flatten(1).gather(1, flat)
    return feats.transpose(1, 2), labels
