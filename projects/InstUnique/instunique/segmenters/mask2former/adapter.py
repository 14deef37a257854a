"""Mask2Former as an InstUnique base segmenter."""
import torch

from ...adapter import ADAPTER_REGISTRY, MetaArchAdapter, SegmenterOutputs


@ADAPTER_REGISTRY.register()
class Mask2FormerAdapter(MetaArchAdapter):
    pixel_stride = 4

    @property
    def embed_dim(self):
        return self.model.sem_seg_head.predictor.mask_embed.layers[-1].out_features

    def output_module(self):
        # The head's output is the raw structure of Mask2Former.predict, at inference too.
        return self.model.sem_seg_head

    def outputs(self, raw):
        return SegmenterOutputs(
            pixel_embeds=raw["pixel_embeds"],
            query_embeds=raw["pred_embeds"],
            class_logits=raw["pred_logits"],
            raw=raw,
        )

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        masks = torch.einsum("bqc,bchw->bqhw", query_embeds, pixel_embeds)
        return {"pred_logits": class_logits, "pred_masks": masks}
