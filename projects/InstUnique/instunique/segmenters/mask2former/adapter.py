"""Mask2Former as an InstUnique base segmenter."""
import torch

from ...adapter import ADAPTER_REGISTRY, MetaArchAdapter, SegmenterOutputs


@ADAPTER_REGISTRY.register()
class Mask2FormerAdapter(MetaArchAdapter):
    pixel_stride = 4
    decodes_across_scenes = True

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

    def forward_train(self, images):
        features = self.model.backbone(images.tensor)
        raw = self.model.sem_seg_head(features)
        raw["backbone_features"] = features
        return self.outputs(raw)

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        return {"pred_logits": class_logits,
                "pred_masks": self.mask_logits(query_embeds, pixel_embeds)}

    def scene(self, raw):
        """What ``decode_across`` needs of a batch to decode other queries on it later: its
        backbone features, detached ({name: (B, C_l, H_l, W_l)})."""
        return {k: v.detach() for k, v in raw["backbone_features"].items()}

    def decode_across(self, raw, scene):
        """The predictions of ``raw``'s queries (image b's) on image b of ``scene``, whose
        backbone features pass the current pixel decoder without gradient (as released:
        the other images' pixel-decoder outputs are detached); a raw structure for
        ``base_losses``."""
        head = self.model.sem_seg_head
        b = min(raw["pred_logits"].shape[0], next(iter(scene.values())).shape[0])
        with torch.no_grad():
            mask_features, _, multi_scale = head.pixel_decoder.forward_features(
                {k: v[:b] for k, v in scene.items()}
            )
            if hasattr(head, "mask_position"):
                mask_features = head.mask_position(mask_features)
        states = [q[:b] for q in raw["query_states"]]
        return head.predictor.decode_across(states, raw["query_pos"][:b], multi_scale,
                                            mask_features)
