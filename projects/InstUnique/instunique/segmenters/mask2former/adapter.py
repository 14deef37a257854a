"""Mask2Former as an InstUnique base segmenter."""
import torch

from ...adapter import ADAPTER_REGISTRY, SegmenterAdapter, SegmenterOutputs


@ADAPTER_REGISTRY.register()
class Mask2FormerAdapter(SegmenterAdapter):
    pixel_stride = 4

    @property
    def embed_dim(self):
        return self.model.sem_seg_head.predictor.mask_embed.layers[-1].out_features

    def preprocess(self, batched_inputs):
        return self.model.preprocess_image(batched_inputs)

    def targets(self, batched_inputs, images):
        return self.model.prepare_targets(batched_inputs, images)

    def forward_train(self, images):
        return _outputs(self.model.predict(images))

    def watch_inference(self, callback):
        # The head's output is the raw structure of Mask2Former.predict, at inference too.
        def hook(module, inputs, raw):
            if not module.training:
                callback(_outputs(raw))

        return self.model.sem_seg_head.register_forward_hook(hook)

    def base_losses(self, raw, targets, pixel_valid=None, matching=None, mask_only=False):
        return self.model.losses(
            raw, targets, pixel_valid, matching, ("masks",) if mask_only else None
        )

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        masks = torch.einsum("bqc,bchw->bqhw", query_embeds, pixel_embeds)
        return {"pred_logits": class_logits, "pred_masks": masks}


def _outputs(raw):
    return SegmenterOutputs(
        pixel_embeds=raw["pixel_embeds"],
        query_embeds=raw["pred_embeds"],
        class_logits=raw["pred_logits"],
        raw=raw,
    )
