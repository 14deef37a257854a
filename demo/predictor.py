"""detectron2's DefaultPredictor with what the demo needs on top of it."""
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from instunique.engine.trainer import load_for_evaluation

__all__ = ["Predictor", "check_weights"]


def check_weights(cfg, key: str = "MODEL.WEIGHTS") -> None:
    """FileNotFoundError for a local checkpoint that is not there (detectron2 would only
    assert once the model is built)."""
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"{key}: checkpoint not found: {weights}")


class Predictor(DefaultPredictor):
    """DefaultPredictor (BGR image in, cfg.MODEL.WEIGHTS loaded, INPUT.MIN/MAX_SIZE_TEST
    resize, INPUT.FORMAT conversion) that can also

    - return outputs at another size than the image's, e.g. the model's input size
      (``output_size``; see :meth:`prediction_size`),
    - give the model input it builds (:meth:`inputs`), for views that forward the model
      themselves (query responses),

    and refuses a checkpoint that leaves model parameters unloaded or an empty
    MODEL.WEIGHTS (unless TEST.ALLOW_RANDOM_WEIGHTS).
    """

    def __init__(self, cfg):
        check_weights(cfg)
        # DefaultPredictor's __init__ without its checkpoint load, which would load whatever
        # matches and warn about the rest (and log "initializing from scratch" first): the
        # weights are loaded once, refusing a partly random model (another query count,
        # another class count), as --eval-only refuses to score one.
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        load_for_evaluation(self.cfg, self.model, command="demo/demo.py")
        test_sets = cfg.DATASETS.TEST
        self.metadata = MetadataCatalog.get(test_sets[0] if test_sets else "__unused")
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) of the model input made from an image of (height, width)."""
        if not self.cfg.INPUT.MIN_SIZE_TEST:  # ResizeShortestEdge's "no resize"
            return height, width
        return self.aug.get_output_shape(
            height, width, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
        )

    def prediction_size(self, height: int, width: int) -> Tuple[int, int]:
        """The image's size, or the model input's when that has fewer pixels: the model
        then never up-samples its masks beyond what it saw (memory on large images)."""
        h, w = self.input_size(height, width)
        return (height, width) if height * width <= h * w else (h, w)

    def inputs(self, original_image: np.ndarray,
               output_size: Optional[Tuple[int, int]] = None) -> Dict:
        """The model input DefaultPredictor builds from an (H, W, 3) BGR uint8 image, with
        "height"/"width" from ``output_size`` (default: the image's)."""
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) BGR image, got {original_image.shape}")
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = output_size or original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return {"image": image, "height": int(height), "width": int(width)}

    def __call__(self, original_image: np.ndarray,
                 output_size: Optional[Tuple[int, int]] = None) -> Dict:
        """The model's outputs for one BGR image, at ``output_size`` (default: the image's)."""
        with torch.no_grad():
            return self.model([self.inputs(original_image, output_size)])[0]
