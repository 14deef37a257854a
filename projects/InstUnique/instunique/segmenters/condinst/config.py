"""Config keys of the CondInst base segmenter: MODEL.FCOS and MODEL.CONDINST.

Key names are AdelaiDet's (aim-uofa/AdelaiDet ``adet/config/defaults.py``), so its yaml
files and overrides carry over. Defaults are the values of the official MS_R_50_1x model's
resolved config (its ``Base-CondInst.yaml`` sets THRESH_WITH_CTR, USE_SCALE and
MAX_PROPOSALS over the adder's defaults; the comments say where the adder differs). Keys of
the other AdelaiDet models (BoxInst, BlendMask, ...) are left out. Nothing here touches
MODEL.DEVICE.
"""
from detectron2.config import CfgNode as CN


def add_condinst_config(cfg):
    """Add the MODEL.FCOS and MODEL.CONDINST namespaces to ``cfg`` (in place)."""
    cfg.MODEL.FCOS = CN()
    fcos = cfg.MODEL.FCOS
    # Foreground classes K (sigmoid class scores: no background logit).
    fcos.NUM_CLASSES = 80
    # FPN levels the FCOS head runs on, finest first, and their strides in input pixels.
    fcos.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    fcos.FPN_STRIDES = [8, 16, 32, 64, 128]
    # Prior foreground probability that initialises the class-logit bias (focal-loss init).
    fcos.PRIOR_PROB = 0.01
    # Score threshold before NMS (training-time proposals are not used by CondInst).
    fcos.INFERENCE_TH_TRAIN = 0.05
    fcos.INFERENCE_TH_TEST = 0.05
    # IoU threshold of the class-aware NMS at inference.
    fcos.NMS_TH = 0.6
    # Candidates kept per level before NMS, and detections kept per image after it.
    fcos.PRE_NMS_TOPK_TRAIN = 1000
    fcos.PRE_NMS_TOPK_TEST = 1000
    fcos.POST_NMS_TOPK_TRAIN = 100
    fcos.POST_NMS_TOPK_TEST = 100
    # Extra FPN levels built on P5 by the backbone: 2 gives P6 and P7 (0 or 1 also work).
    fcos.TOP_LEVELS = 2
    # Norm of the head's towers: "GN" (GroupNorm, 32 groups) or "none".
    fcos.NORM = "GN"
    # A learnable scalar per level multiplies the box regression.
    fcos.USE_SCALE = True
    # Box-quality branch: only "ctrness" (centerness) is implemented ("iou" is AdelaiDet's
    # alternative).
    fcos.BOX_QUALITY = "ctrness"
    # Threshold the class score after multiplying by centerness (True, as Base-CondInst;
    # the adder's default is False).
    fcos.THRESH_WITH_CTR = True
    # Sigmoid focal loss of the class term (Lin et al.).
    fcos.LOSS_ALPHA = 0.25
    fcos.LOSS_GAMMA = 2.0
    # Divisor of the class loss: "fg" (positive locations, averaged over processes) or
    # "all" (every location); AdelaiDet's "moving_fg" is not implemented.
    fcos.LOSS_NORMALIZER_CLS = "fg"
    fcos.LOSS_WEIGHT_CLS = 1.0
    # Object-size limits between consecutive levels: a location of level i is positive
    # only for boxes whose max(l, t, r, b) lies in [SOI[i-1], SOI[i]] (-1 and 1e8 at the
    # ends). Also the normalisers of CondInst's relative coordinates (with 2 * SOI[-1] for
    # the last level). One fewer entry than FPN_STRIDES.
    fcos.SIZES_OF_INTEREST = [64, 128, 256, 512]
    # AdelaiDet defines it but its head always applies ReLU to the regression; not read.
    fcos.USE_RELU = True
    # Deformable last tower conv: not implemented (must be False).
    fcos.USE_DEFORMABLE = False
    # Number of 3x3 convs of the class, box and shared towers.
    fcos.NUM_CLS_CONVS = 4
    fcos.NUM_BOX_CONVS = 4
    fcos.NUM_SHARE_CONVS = 0
    # Positives only within POS_RADIUS * stride of the object's centre (CondInst: the mask's
    # centre of mass), clipped to its box; False: anywhere inside the box.
    fcos.CENTER_SAMPLE = True
    fcos.POS_RADIUS = 1.5
    # Box loss: "giou", "iou" (-log IoU) or "linear_iou" (1 - IoU).
    fcos.LOC_LOSS_TYPE = "giou"
    # AdelaiDet's hooks for other models (proposals / box features in training): must be
    # False.
    fcos.YIELD_PROPOSAL = False
    fcos.YIELD_BOX_FEATURES = False

    cfg.MODEL.CONDINST = CN()
    ci = cfg.MODEL.CONDINST
    # Stride of the mask logits the loss and inference use: the stride-8 dynamic-head
    # output is upsampled by MASK_BRANCH stride / MASK_OUT_STRIDE (aligned bilinear).
    ci.MASK_OUT_STRIDE = 4
    # BoxInst only (bottom rows ignored); kept so AdelaiDet's yaml files load; not read.
    ci.BOTTOM_PIXELS_REMOVED = -1
    # At most this many positive locations of the batch (per process) go to the mask
    # loss, a random subset (500 as Base-CondInst; the adder's default -1: all).
    ci.MAX_PROPOSALS = 500
    # Instead, per image the best TOPK_PROPOSALS_PER_IM / (its instances) locations of each
    # instance by sigmoid(class) * sigmoid(centerness); -1: off. Not with MAX_PROPOSALS.
    ci.TOPK_PROPOSALS_PER_IM = -1

    # The dynamic mask head: NUM_LAYERS 1x1 convs whose filters the controller predicts
    # per instance (CondInst paper Sec. 3.2).
    ci.MASK_HEAD = CN()
    # Width of its hidden layers (the last has 1 output channel).
    ci.MASK_HEAD.CHANNELS = 8
    # Number of dynamic layers (>= 2); 3 gives the paper's 169 parameters per instance.
    ci.MASK_HEAD.NUM_LAYERS = 3
    # AdelaiDet defines it but does not read it; not read.
    ci.MASK_HEAD.USE_FP16 = False
    # Without the 2 relative-coordinate input channels (CondInst paper Table 2 ablation).
    ci.MASK_HEAD.DISABLE_REL_COORDS = False

    # The mask branch: shared mask features at the stride of IN_FEATURES[0].
    ci.MASK_BRANCH = CN()
    # Channels of the mask features (the dynamic head's input, besides the coordinates).
    ci.MASK_BRANCH.OUT_CHANNELS = 8
    # FPN levels fused (each refined by a 3x3 conv, upsampled to the first and summed).
    ci.MASK_BRANCH.IN_FEATURES = ["p3", "p4", "p5"]
    # Width of the refine convs and of the tower.
    ci.MASK_BRANCH.CHANNELS = 128
    # Norm after each conv (detectron2's get_norm names; "" for none).
    ci.MASK_BRANCH.NORM = "BN"
    # 3x3 convs of the tower before the 1x1 projection to OUT_CHANNELS.
    ci.MASK_BRANCH.NUM_CONVS = 4
    # Auxiliary semantic-segmentation loss (the "_sem" configs): not implemented (False).
    ci.MASK_BRANCH.SEMANTIC_LOSS_ON = False
