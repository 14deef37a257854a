"""What the query-based base segmenters share: one forward over their four steps."""
from typing import Dict, List

from torch import nn


class QuerySegmenter(nn.Module):
    """A meta-architecture made of ``preprocess_image``, ``predict``, ``prepare_targets``,
    ``losses`` and ``inference``; the InstUnique adapters call the same steps one by one."""

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: detectron2 dicts with "image" (3, H, W) and, in training,
                "instances"; "height"/"width" give the output resolution at inference.
        Returns:
            training: a dict of losses; inference: a list of per-image result dicts.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if self.training:
            return self.losses(outputs, self.prepare_targets(batched_inputs, images))[0]
        return self.inference(outputs, batched_inputs, images)
