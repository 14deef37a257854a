"""Run a model from a config on RGB images: the demo's only contact with the model."""
import logging
import os
from typing import Dict, Optional

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.modeling import build_model
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["Predictor", "read_image"]

logger = logging.getLogger(__name__)


def read_image(path: str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not an image (the message names it).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return convert_PIL_to_numpy(img, "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None


def _is_remote(path: str) -> bool:
    return "://" in path


class Predictor:
    """cfg -> a model in eval mode on cfg.MODEL.DEVICE with cfg.MODEL.WEIGHTS loaded.

    ``predictor(image)`` resizes like the test loader (INPUT.MIN_SIZE_TEST /
    MAX_SIZE_TEST), converts to INPUT.FORMAT and returns the model's outputs for one image,
    at the image's own resolution. ``predictor.inputs(image)`` is the model input it builds.
    """

    def __init__(self, cfg, model: Optional[torch.nn.Module] = None):
        self.cfg = cfg.clone()
        self.cfg.freeze()
        weights = cfg.MODEL.WEIGHTS
        if weights and not _is_remote(weights) and not os.path.isfile(weights):
            raise FileNotFoundError(f"MODEL.WEIGHTS: checkpoint not found: {weights}")
        self.model = model if model is not None else build_model(self.cfg)
        self.model.eval()
        if weights:
            DetectionCheckpointer(self.model).load(weights)
        else:
            logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialization")
        self.metadata = MetadataCatalog.get(
            cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        )
        min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        self.resize = T.ResizeShortestEdge([min_size, min_size], max_size) if min_size else None
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {cfg.INPUT.FORMAT!r}")
        self.input_format = cfg.INPUT.FORMAT

    def inputs(self, image: np.ndarray) -> Dict:
        """The model input dict of an (H, W, 3) uint8 RGB image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Predictor expects an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        height, width = image.shape[:2]
        if self.input_format == "BGR":
            image = image[:, :, ::-1]
        if self.resize is not None:
            image = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, image: np.ndarray) -> Dict:
        with torch.no_grad():
            return self.model([self.inputs(image)])[0]
