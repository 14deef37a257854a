"""SparseInst as an InstUnique base segmenter.

Pixel embeddings F are the mask-branch features (stride 8), query embeddings e the
instance kernels: the mask logits e . F, upsampled as the decoder does, are SparseInst's
own. SparseInst has no "no object" class; its per-query logit layout in
``SegmenterOutputs.class_logits`` is (B, N, K + 1) = [K class logits, objectness logit].
"""
import torch
import torch.nn.functional as F

from ...adapter import ADAPTER_REGISTRY, MetaArchAdapter, SegmenterOutputs
from .decoder import kernel_masks


@ADAPTER_REGISTRY.register()
class SparseInstAdapter(MetaArchAdapter):
    pixel_stride = 8

    @property
    def embed_dim(self):
        return self.model.decoder.mask_branch.projection.out_channels

    def output_module(self):
        # The decoder's output is the raw structure of SparseInst.predict, at inference too.
        return self.model.decoder

    def outputs(self, raw):
        return SegmenterOutputs(
            pixel_embeds=raw["mask_features"],
            query_embeds=raw["pred_kernels"],
            class_logits=torch.cat([raw["pred_logits"], raw["pred_scores"]], dim=-1),
            raw=raw,
        )

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        k = class_logits.shape[-1] - 1
        return {
            "pred_logits": class_logits[..., :k],
            "pred_scores": class_logits[..., k:],
            "pred_masks": kernel_masks(query_embeds, pixel_embeds, self.model.decoder.scale_factor),
        }

    @property
    def mask_threshold(self):
        return self.model.mask_threshold

    def output_probabilities(self, mask_logits, padded_size, image_size, output_size):
        """As SparseInst's inference: logits x2 (the decoder's scale), sigmoid, then the
        probabilities to the padded input, cropped, resized."""
        h, w = image_size
        scale = self.model.decoder.scale_factor
        probs = F.interpolate(mask_logits[None].float(), scale_factor=scale, mode="bilinear",
                              align_corners=False).sigmoid()
        probs = F.interpolate(probs, size=padded_size, mode="bilinear",
                              align_corners=False)[:, :, :h, :w]
        return F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)[0]

    # mask_only (MetaArchAdapter.base_losses) keeps the mask terms alone: objectness is a
    # score, like the classes.

    def query_predictions(self, class_logits):
        """sqrt(sigmoid(best class) * sigmoid(objectness)), SparseInst's inference score
        before mask rescoring, and the best class."""
        probs = class_logits.float().sigmoid()
        best, classes = probs[..., :-1].max(-1)
        return (best * probs[..., -1]).sqrt(), classes

