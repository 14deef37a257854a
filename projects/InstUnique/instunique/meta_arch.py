"""The InstUnique meta-architecture: a base segmenter trained with Eq. 5 and Eq. 8."""
import zlib
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from .adapter import SegmenterAdapter, build_adapter
from .data.metadata import training_stuff_classes
from .objectives import CrossImageLoss, CrossSceneLoss, EquivarianceLoss, PixelMemory
from .transforms.build import build_transform_family

_SEGMENTER = "segmenter."
# Where the pixel memory lives in the module tree; checkpoints name it "memory.".
_MEMORY = "cross_image.memory."
# State of InstUnique's own, beside the base model's: the pixel memory, the cross-scene bank.
_OWN_STATE = (_MEMORY, "cross_scene.")
# MODEL.INST_UNIQUE.CROSS_IMAGE.MODE
CROSS_IMAGE_MODES = ("pixels", "cross_scene")
# Keys of the loss dict that InstUnique adds to the base segmenter's own.
_TERM_PREFIXES = ("loss_cross_image", "loss_equi_")


def is_term_loss(key: str) -> bool:
    """Whether a training loss key is one of InstUnique's terms (Eq. 5, Eq. 8), not the
    base segmenter's loss."""
    return key.startswith(_TERM_PREFIXES)


@META_ARCH_REGISTRY.register()
class InstUnique(nn.Module):
    """Training: L_base(x) + L_base(x') + w_cross L_cross + lambda L_equi, then enqueue
    (without L_base(x') when ``base_loss_on_paired_view`` is False, the official SOLOv2
    recipe). Inference: the base segmenter's own forward, untouched.

    The state_dict hides the ``segmenter.`` prefix, so its keys are the base model's
    (official names) plus ``memory.*``: checkpoints move freely between InstUnique and the
    plain base model.
    """

    @configurable
    def __init__(
        self,
        *,
        segmenter: nn.Module,
        cross_image: Optional[CrossImageLoss],
        equivariance: Optional[EquivarianceLoss],
        base_loss_on_paired_view: bool = True,
        cross_scene: Optional[CrossSceneLoss] = None,
        adapter: Optional[SegmenterAdapter] = None,
    ):
        super().__init__()
        self.segmenter = segmenter
        self.adapter = adapter if adapter is not None else build_adapter(segmenter)
        self.cross_image = cross_image
        self.cross_scene = cross_scene
        self.equivariance = equivariance
        self.base_loss_on_paired_view = base_loss_on_paired_view
        self._register_state_dict_hook(_strip_segmenter_prefix)
        self._register_load_state_dict_pre_hook(_add_segmenter_prefix)

    @classmethod
    def from_config(cls, cfg):
        iu = cfg.MODEL.INST_UNIQUE
        base_cfg = cfg.clone()
        base_cfg.defrost()
        base_cfg.MODEL.META_ARCHITECTURE = iu.BASE_META_ARCHITECTURE
        if iu.BASE_META_ARCHITECTURE not in META_ARCH_REGISTRY:
            raise KeyError(
                f"MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE={iu.BASE_META_ARCHITECTURE!r} is not "
                f"a registered meta-architecture"
            )
        segmenter = META_ARCH_REGISTRY.get(iu.BASE_META_ARCHITECTURE)(base_cfg)
        adapter = build_adapter(segmenter)
        cross = eq = scene = None
        _check_nonnegative(cfg)
        if iu.CROSS_IMAGE.MODE not in CROSS_IMAGE_MODES:
            raise ValueError(f"MODEL.INST_UNIQUE.CROSS_IMAGE.MODE must be one of "
                             f"{CROSS_IMAGE_MODES}, got {iu.CROSS_IMAGE.MODE!r}")
        if iu.CROSS_IMAGE.ENABLED and iu.CROSS_IMAGE.MODE == "cross_scene":
            CrossSceneLoss.check_adapter(adapter)
            scene = CrossSceneLoss(weight=iu.CROSS_IMAGE.WEIGHT)
        elif iu.CROSS_IMAGE.ENABLED:
            if iu.CROSS_IMAGE.PIXELS_PER_IMAGE < 1:
                raise ValueError(
                    "MODEL.INST_UNIQUE.CROSS_IMAGE.PIXELS_PER_IMAGE must be >= 1, got "
                    f"{iu.CROSS_IMAGE.PIXELS_PER_IMAGE}"
                )
            cross = CrossImageLoss(
                weight=iu.CROSS_IMAGE.WEIGHT,
                pixels_per_image=iu.CROSS_IMAGE.PIXELS_PER_IMAGE,
                alpha=iu.CROSS_IMAGE.FOCAL_ALPHA,
                gamma=iu.CROSS_IMAGE.FOCAL_GAMMA,
                chunk_pixels=iu.CROSS_IMAGE.CHUNK_PIXELS,
                stride=adapter.pixel_stride,
                queries=iu.CROSS_IMAGE.QUERIES,
                loss=iu.CROSS_IMAGE.LOSS,
                temperature=iu.CROSS_IMAGE.TEMPERATURE,
                hard_negatives=iu.CROSS_IMAGE.HARD_NEGATIVES,
                hard_threshold=iu.CROSS_IMAGE.HARD_THRESHOLD,
                topk=iu.CROSS_IMAGE.TOPK,
                normalization=iu.CROSS_IMAGE.NORMALIZATION,
                pixel_gradient=iu.CROSS_IMAGE.PIXEL_GRADIENT,
                reference=iu.CROSS_IMAGE.REFERENCE,
                response=None if adapter.linear_response else adapter.pixel_logits,
                response_width=adapter.response_width,
                memory_pixels=iu.CROSS_IMAGE.MEMORY_PIXELS,
                embed_dim=adapter.embed_dim,
                stuff_classes=(
                    training_stuff_classes(cfg.DATASETS.TRAIN)
                    if iu.CROSS_IMAGE.STUFF_TARGETS else ()
                ),
            )
        # Built even when the term is off: the paired-view mapper reads the same keys.
        build_transform_family(cfg)
        if iu.EQUIVARIANCE.ENABLED:
            eq = EquivarianceLoss(weight=iu.EQUIVARIANCE.WEIGHT, stride=adapter.pixel_stride,
                                  matching=iu.EQUIVARIANCE.MATCHING,
                                  class_term=iu.EQUIVARIANCE.CLASS_TERM)
        return {"segmenter": segmenter, "cross_image": cross, "equivariance": eq,
                "base_loss_on_paired_view": iu.EQUIVARIANCE.BASE_LOSS_ON_PAIRED_VIEW,
                "cross_scene": scene, "adapter": adapter}

    @property
    def device(self):
        return self.segmenter.device

    @property
    def memory(self) -> Optional[PixelMemory]:
        """The pixel memory of Eq. 5 (owned by ``cross_image``), or None."""
        return self.cross_image.memory if self.cross_image is not None else None

    def __getattr__(self, name: str):
        # The state_dict names the base model's modules at the top level; resolve those
        # names too, so tools that walk key paths (fvcore's checkpointer) find the modules.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self._modules.get("segmenter")
            if modules is not None and name in modules._modules:
                return modules._modules[name]
            raise

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: in training, dicts of the paired-view mapper: view x ("image",
                "instances", "image_id") with "paired_view" (view x' as a dict of its own)
                and "warp" (the AffineWarp from x to x'). At inference, plain dicts.
        Returns:
            training: a dict of losses; inference: the base segmenter's outputs.
        """
        if not self.training:
            return self.segmenter(batched_inputs)
        if any("paired_view" not in x for x in batched_inputs):
            raise ValueError(
                "InstUnique training needs paired views: build the train loader with "
                "instunique.data.PairedViewMapper (train_net.py does this)"
            )
        views = list(batched_inputs) + [x["paired_view"] for x in batched_inputs]
        images = self.adapter.preprocess(views)
        targets = self.adapter.targets(views, images)
        outputs = self.adapter.forward_train(images)
        p = len(batched_inputs)
        if self.base_loss_on_paired_view:
            losses, matching = self.adapter.base_losses(outputs.raw, targets)
        else:
            losses, matching = self.adapter.base_losses(
                self.adapter.batch_slice(outputs.raw, 0, p), targets[:p]
            )
            if self._needs_paired_view_matching():
                matching = matching + self._match_without_loss(outputs, targets, p)

        if self.equivariance is not None:
            warps = [x["warp"] for x in batched_inputs]
            losses.update(self.equivariance(
                self.adapter, outputs, targets, warps, images.image_sizes, matching[len(warps):]
            ))
        if self.cross_image is not None:
            stride = self.adapter.pixel_stride
            valid_hw = [(-(-h // stride), -(-w // stride)) for h, w in images.image_sizes]
            image_ids = torch.tensor(
                [_image_id(x) for x in views], device=outputs.pixel_embeds.device
            )
            losses["loss_cross_image"], _ = self.cross_image(
                outputs, targets, matching, valid_hw, image_ids
            )
        if self.cross_scene is not None:
            losses.update(self.cross_scene(self.adapter, outputs, targets))
        return losses

    def _needs_paired_view_matching(self) -> bool:
        """Whether a term reads the matching of the views x' (then it is computed even
        when x' gets no base loss)."""
        eq, cross = self.equivariance, self.cross_image
        return (eq is not None and eq.matching == "view") or (
            cross is not None and (cross.queries == "matched" or bool(cross.stuff_classes))
        )

    def _match_without_loss(self, outputs, targets: List[Dict], p: int):
        """The final-layer matching of images p: (the views x') by the base criterion,
        with no graph: its losses are discarded."""
        with torch.no_grad():
            raw = self.adapter.final_layer_outputs(
                outputs.class_logits[p:], outputs.query_embeds[p:], outputs.pixel_embeds[p:]
            )
            return self.adapter.base_losses(raw, targets[p:])[1]


def _image_id(x: Dict) -> int:
    if "image_id" not in x:
        raise KeyError(
            "cross-image querying needs each input's dataset 'image_id' (to tell an image's "
            "own pixels from external ones); the dataset dicts lack it"
        )
    image_id = x["image_id"]
    # A stable hash: ids are compared across processes through the shared memory.
    return image_id if isinstance(image_id, int) else zlib.crc32(str(image_id).encode())


def _check_nonnegative(cfg):
    iu = cfg.MODEL.INST_UNIQUE
    for key, value in (
        ("CROSS_IMAGE.WEIGHT", iu.CROSS_IMAGE.WEIGHT),
        ("CROSS_IMAGE.MEMORY_PIXELS", iu.CROSS_IMAGE.MEMORY_PIXELS),
        ("CROSS_IMAGE.CHUNK_PIXELS", iu.CROSS_IMAGE.CHUNK_PIXELS),
        ("EQUIVARIANCE.WEIGHT", iu.EQUIVARIANCE.WEIGHT),
    ):
        if value < 0:
            raise ValueError(f"MODEL.INST_UNIQUE.{key} must be >= 0, got {value}")


def _strip_segmenter_prefix(module, state_dict, prefix, local_metadata):
    # Re-insert every key of this module so the order stays that of registration.
    for key, value in [(k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix)]:
        if key.startswith(prefix + _SEGMENTER):
            key = prefix + key[len(prefix + _SEGMENTER) :]
        elif key.startswith(prefix + _MEMORY):
            key = prefix + "memory." + key[len(prefix + _MEMORY) :]
        state_dict[key] = value
    # The modules' state-dict versions move with their keys: a loader that reads them (the
    # official Mask2Former head renames the keys of "version 1" heads) must find them.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        own = prefix + _SEGMENTER[:-1]
        metadata.pop(own, None)
        for key in [k for k in metadata if k.startswith(own + ".")]:
            metadata[prefix + key[len(own) + 1 :]] = metadata.pop(key)


def _add_segmenter_prefix(state_dict, prefix, *args):
    for key, value in [(k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if rest.startswith("memory."):
            key = prefix + _MEMORY + rest[len("memory.") :]
        elif not rest.startswith((*_OWN_STATE, _SEGMENTER)):
            key = prefix + _SEGMENTER + rest
        state_dict[key] = value
