"""Where does one query fire? Its mask logits e_q . F on its own image and on others.

A query of image A is its mask embedding e_q (C,). Dotted with the pixel embeddings F_B
(C, H/s, W/s) of any image B it gives a mask logit map; for A itself that map is the
query's predicted mask. Cross-image querying (paper Eq. 5) trains e_q to give low logits
on every other image, so a good model lights up only the query's own instance.

The model is reached through its InstUnique adapter (``instunique.adapter``), so the view
works for every base segmenter that has one.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch import nn

from ..adapter import SegmenterAdapter, build_adapter
from .comparison import check_image, compose_row, scale_image

__all__ = ["QueryResponse", "heat_overlay", "query_response", "render_query_response"]


@dataclass
class QueryResponse:
    """One query of image A and its mask logits on every image.

    query: index of the query in A's decoder output.
    class_id: the query's most likely (non-void) class.
    score: its confidence (the adapter's query_predictions: for Mask2Former the probability
        of that class).
    logits: per image i, (height_i, width_i) float32 mask logits e_q . F_i at the output
        resolution of that image (its dict's "height"/"width"); logits[0] is image A.
    """

    query: int
    class_id: int
    score: float
    logits: List[np.ndarray]


def _adapter(model: nn.Module) -> SegmenterAdapter:
    # An InstUnique model carries the adapter of its base segmenter.
    adapter = getattr(model, "adapter", None)
    return adapter if isinstance(adapter, SegmenterAdapter) else build_adapter(model)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_input(x: Dict, i: int) -> None:
    image = x.get("image") if isinstance(x, dict) else None
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"inputs[{i}]['image'] must be a (C, H, W) tensor, got {got}")


def query_response(
    model: nn.Module, inputs: Sequence[Dict], query: Optional[int] = None
) -> QueryResponse:
    """Mask logits of one query of ``inputs[0]`` (image A) on every image of ``inputs``.

    Args:
        model: an InstUnique model or a base segmenter with an InstUnique adapter.
        inputs: detectron2 model inputs, one per image: "image" (C, H, W) in the model's
            input format and size, optional "height"/"width" (output resolution).
        query: the query of A to show; default: the one with the highest class score.
    Returns:
        QueryResponse. Each image is forwarded alone, so its logits are those the model
        gives at inference (no padding from the other images).
    """
    if not inputs:
        raise ValueError("query_response needs at least one input (image A)")
    for i, x in enumerate(inputs):
        _check_input(x, i)
    adapter = _adapter(model)
    pixels, sizes, pads = [], [], []
    with _eval_mode(model):
        for i, x in enumerate(inputs):
            images = adapter.preprocess([x])
            out = adapter.forward_train(images)
            if i == 0:
                class_logits, embeds = out.class_logits[0], out.query_embeds[0]
            pixels.append(out.pixel_embeds[0])
            sizes.append(images.image_sizes[0])
            pads.append(tuple(images.tensor.shape[-2:]))

    scores, classes = (v[0] for v in adapter.query_predictions(class_logits[None]))  # (Q,)
    num_queries = scores.shape[0]
    if query is None:
        query = int(scores.argmax())
    elif not (isinstance(query, int) and 0 <= query < num_queries):
        raise ValueError(f"query must be an int in [0, {num_queries}), got {query!r}")
    score, class_id = scores[query], classes[query]

    e = embeds[query]  # (C,)
    logits = []
    for x, feat, size, pad in zip(inputs, pixels, sizes, pads):
        m = torch.einsum("c,chw->hw", e, feat)[None, None].float()
        # The segmenter's own inference path: to the padded input, crop, resize.
        m = torch.nn.functional.interpolate(m, size=pad, mode="bilinear", align_corners=False)
        height, width = x.get("height", size[0]), x.get("width", size[1])
        m = sem_seg_postprocess(m[0], size, height, width)[0]
        logits.append(m.cpu().numpy().astype(np.float32))
    return QueryResponse(int(query), int(class_id), float(score), logits)


def heat_overlay(image: np.ndarray, logits: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """sigmoid(logits) as a JET heat map over a grey copy of ``image``; (H, W, 3) uint8.

    The colour scale is absolute (0 -> blue, 1 -> red), so panels compare directly.
    """
    image = check_image(image)
    if logits.shape != image.shape[:2]:
        raise ValueError(f"logits of shape {logits.shape} do not fit an image {image.shape[:2]}")
    prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -50, 50)))
    heat = cv2.applyColorMap((prob * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)[..., None]
    return (alpha * heat + (1 - alpha) * grey).round().clip(0, 255).astype(np.uint8)


def render_query_response(
    images: Sequence[np.ndarray],
    response: QueryResponse,
    class_names: Optional[Sequence[str]] = None,
    scale: float = 1.0,
    prefix: str = "",
) -> np.ndarray:
    """[A | response on A | response on B | ...] with captions; one row, uint8 RGB.

    Args:
        images: the (H_i, W_i, 3) uint8 RGB images of ``response.logits`` (A first).
        class_names: to name the query's class in the caption.
        prefix: prepended to the first caption (e.g. the model's name).
    """
    if len(images) != len(response.logits):
        raise ValueError(f"got {len(images)} images for {len(response.logits)} response maps")
    name = (
        class_names[response.class_id]
        if class_names is not None and response.class_id < len(class_names)
        else f"class {response.class_id}"
    )
    panels = [scale_image(images[0], scale)]
    captions = [f"{prefix}A: query {response.query} ({name} {response.score:.2f})"]
    for i, (image, logits) in enumerate(zip(images, response.logits)):
        panels.append(scale_image(heat_overlay(image, logits), scale))
        label = "A (own)" if i == 0 else chr(ord("A") + i) if i < 26 else str(i)
        peak = float(1.0 / (1.0 + np.exp(-min(float(logits.max()), 50.0))))
        captions.append(f"on {label}: max {peak:.2f}")
    return compose_row(panels, captions)
