"""CondInst as an InstUnique base segmenter.

CondInst's "query" at an FCOS location is the dynamic filters the controller predicts
there; its mask logit on a pixel is the dynamic mask head run on [relative coordinates,
mask-branch features] of that pixel, not a dot product. The adapter packs what that needs
into the two embeddings the objectives pass around unchanged:

- pixel embeddings (B, 2 + C_mask, H/8, W/8): the input-pixel (x, y) of each cell of the
  mask-feature map (stride * index + stride // 2, CondInst's locations), then the mask
  features. A pixel sampled into the Eq. 5 memory keeps the coordinates of its own image.
- query embeddings (B, L, P_gen + 3) over the L FCOS locations of P3..P7: the controller's
  parameters, the location's input-pixel (x, y) and its FPN level.

The logit of a query on an external pixel uses the pixel's coordinates in its own image
relative to the query's location in the query's image (ours: the released CondInst code
pairs each query with a random positive of the other image and uses that positive's
location instead, which a memory of pixels cannot hold). Class logits are
(B, L, K + 1) = [K class logits, centerness logit]; the queries the base loss matches are
the positive locations fed to the mask head.
"""
import torch
import torch.nn.functional as F

from ...adapter import ADAPTER_REGISTRY, MetaArchAdapter, SegmenterOutputs
from .dynamic_head import dynamic_mask_logits
from .mask_branch import aligned_bilinear
from .meta_arch import MASK_THRESHOLD
from .targets import compute_locations


@ADAPTER_REGISTRY.register()
class CondInstAdapter(MetaArchAdapter):
    linear_response = False

    @property
    def pixel_stride(self):
        return self.model.mask_branch.out_stride

    @property
    def embed_dim(self):
        return 2 + self.model.mask_head.in_channels

    @property
    def response_width(self):
        return self.model.mask_head.channels

    @property
    def mask_threshold(self):
        return MASK_THRESHOLD

    def output_module(self):
        # An identity that predict() passes its raw structure through, to be watched.
        return self.model.raw_output

    def outputs(self, raw):
        feats = raw["mask_feats"]
        b, _, h, w = feats.shape
        grid = compute_locations(h, w, self.pixel_stride, feats.device).to(feats.dtype)
        coords = grid.t().reshape(1, 2, h, w).expand(b, -1, -1, -1)
        queries = torch.cat([raw["params"], raw["locations"].to(raw["params"].dtype),
                             raw["levels"][..., None].to(raw["params"].dtype)], -1)
        return SegmenterOutputs(
            pixel_embeds=torch.cat([coords, feats], 1),
            query_embeds=queries,
            class_logits=torch.cat([raw["cls_logits"], raw["ctrness"]], -1),
            raw=raw,
        )

    def _unpack(self, queries: torch.Tensor):
        """(R, P_gen + 3) query embeddings -> params (R, P_gen), locations (R, 2), soi (R,)."""
        p = self.model.mask_head.num_gen_params
        levels = queries[:, p + 2].detach().round().long()
        return queries[:, :p], queries[:, p : p + 2].detach(), self.model.mask_head.soi(levels)

    def pixel_logits(self, queries, pixels):
        """The dynamic head of each query (R, P_gen + 3) on pixels (N, 2 + C_mask): (R, N)."""
        head = self.model.mask_head
        params, locations, soi = self._unpack(queries)
        return dynamic_mask_logits(params, locations, soi, pixels[:, 2:].t()[None],
                                   pixels[:, :2], head.channels, head.num_layers,
                                   head.rel_coords)

    def mask_logits(self, query_embeds, pixel_embeds):
        """(B, Q, H/8, W/8) on the mask-feature grid (the coordinates are the grid's own,
        whatever channels 0-1 of ``pixel_embeds`` hold, e.g. after a warp)."""
        b, q, _ = query_embeds.shape
        h, w = pixel_embeds.shape[-2:]
        grid = compute_locations(h, w, self.pixel_stride, pixel_embeds.device)
        pixels = torch.cat([grid.to(pixel_embeds.dtype).t()[None].expand(b, -1, -1),
                            pixel_embeds[:, 2:].flatten(2)], 1)  # (B, 2 + C, h * w)
        return torch.stack([
            self.pixel_logits(query_embeds[i], pixels[i].t()) for i in range(b)
        ]).reshape(b, q, h, w)

    def output_probabilities(self, mask_logits, padded_size, image_size, output_size):
        """As CondInst's inference: aligned-bilinear to the mask out-stride, sigmoid,
        aligned-bilinear to the padded input, crop, bilinear resize."""
        head = self.model.mask_head
        h, w = image_size
        logits = aligned_bilinear(mask_logits[:, None].float(),
                                  self.pixel_stride // head.mask_out_stride)
        probs = aligned_bilinear(logits.sigmoid(), padded_size[0] // logits.shape[-2])
        probs = probs[:, :, :h, :w]
        return F.interpolate(probs, size=output_size, mode="bilinear", align_corners=False)[:, 0]

    def final_layer_outputs(self, class_logits, query_embeds, pixel_embeds):
        """A structure with the mask head's inputs only: CondInst's FCOS terms (classes,
        boxes, centerness) do not depend on the masks, so on x' they would repeat L_base
        exactly; ``base_losses`` scores its mask term alone."""
        p = self.model.mask_head.num_gen_params
        k = class_logits.shape[-1] - 1
        return {
            "cls_logits": class_logits[..., :k],
            "ctrness": class_logits[..., k:],
            "params": query_embeds[..., :p],
            "locations": query_embeds[..., p : p + 2].detach(),
            "levels": query_embeds[..., p + 2].detach().round().long(),
            "mask_feats": pixel_embeds[:, 2:],
        }

    def base_losses(self, raw, targets, pixel_valid=None, matching=None, mask_only=False):
        mask_only = mask_only or "bbox_reg" not in raw  # a final_layer_outputs structure
        return super().base_losses(raw, targets, pixel_valid, matching, mask_only)

    def query_predictions(self, class_logits):
        """sqrt(sigmoid(best class) * sigmoid(centerness)), CondInst's detection score,
        and the best class."""
        probs = class_logits.float().sigmoid()
        best, classes = probs[..., :-1].max(-1)
        return (best * probs[..., -1]).sqrt(), classes
