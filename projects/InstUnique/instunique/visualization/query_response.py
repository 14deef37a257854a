"""Where does one query fire? Its mask on its own image and on others.

A query of image A is its embedding e_q. Read on the pixel embeddings F_B of any image B
(the adapter's ``mask_logits``: e_q . F_B for Mask2Former and SparseInst) it gives a mask
probability map, upsampled as the base inference does; for A itself that map is the
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
from torch import nn

from ..adapter import SegmenterAdapter, build_adapter
from .comparison import check_image, compose_row, scale_image

__all__ = ["QueryResponse", "heat_overlay", "query_response", "render_query_response"]


@dataclass
class QueryResponse:
    """One query of image A and its mask probabilities on every image.

    query: index of the query in A's decoder output.
    class_id: the query's most likely (non-void) class.
    score: its confidence (the adapter's query_predictions: for Mask2Former the probability
        of that class).
    probs: per image i, (height_i, width_i) float32 mask probabilities of the query on F_i
        at the output resolution of that image (its dict's "height"/"width"), as the base
        inference computes them; probs[0] is image A.
    threshold: the probability above which the base inference puts a pixel in the mask.
    """

    query: int
    class_id: int
    score: float
    probs: List[np.ndarray]
    threshold: float


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

    e = embeds[query][None, None]  # (1, 1, D)
    probs = []
    for x, feat, size, pad in zip(inputs, pixels, sizes, pads):
        logits = adapter.mask_logits(e, feat[None])[0]
        height, width = x.get("height", size[0]), x.get("width", size[1])
        m = adapter.output_probabilities(logits, pad, size, (height, width))[0]
        probs.append(m.cpu().numpy().astype(np.float32))
    return QueryResponse(int(query), int(class_id), float(score), probs,
                         float(adapter.mask_threshold))


def heat_overlay(image: np.ndarray, prob: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Probabilities ``prob`` (H, W) as a JET heat map over a grey copy of ``image``;
    (H, W, 3) uint8.

    The colour scale is absolute (0 -> blue, 1 -> red), so panels compare directly.
    """
    image = check_image(image)
    if prob.shape != image.shape[:2]:
        raise ValueError(f"probabilities of shape {prob.shape} do not fit an image "
                         f"{image.shape[:2]}")
    prob = np.clip(prob, 0.0, 1.0)
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
        images: the (H_i, W_i, 3) uint8 RGB images of ``response.probs`` (A first).
        class_names: to name the query's class in the caption.
        prefix: prepended to the first caption (e.g. the model's name).
    """
    if len(images) != len(response.probs):
        raise ValueError(f"got {len(images)} images for {len(response.probs)} response maps")
    name = (
        class_names[response.class_id]
        if class_names is not None and response.class_id < len(class_names)
        else f"class {response.class_id}"
    )
    panels = [scale_image(images[0], scale)]
    captions = [f"{prefix}A: query {response.query} ({name} {response.score:.2f})"]
    for i, (image, prob) in enumerate(zip(images, response.probs)):
        panels.append(scale_image(heat_overlay(image, prob), scale))
        label = "A (own)" if i == 0 else chr(ord("A") + i) if i < 26 else str(i)
        captions.append(f"on {label}: max {float(prob.max()):.2f}")
    return compose_row(panels, captions)
