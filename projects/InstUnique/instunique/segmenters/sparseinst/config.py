"""Config keys of the SparseInst base segmenter.

Key names are the official ones (hustvl/SparseInst ``sparseinst/config.py``), so the
official yaml files and their overrides carry over. Defaults are the values of the
official R50 GIAM model's resolved config (``sparse_inst_r50_giam.yaml``), not those of the
official adder, whose encoder/decoder defaults name modules the yaml always overrides.
Unlike the official adder, nothing here touches MODEL.DEVICE: the device comes from the
user's config alone.
"""
from detectron2.config import CfgNode as CN


def add_sparseinst_config(cfg):
    """Add the MODEL.SPARSE_INST namespace to ``cfg`` (in place)."""
    cfg.MODEL.SPARSE_INST = CN()
    si = cfg.MODEL.SPARSE_INST

    # Inference (SparseInst paper Sec. 3.4: no NMS). A query is kept when its score
    # sqrt(sigmoid(class) * sigmoid(objectness)) exceeds CLS_THRESHOLD; its mask is the
    # pixels whose probability exceeds MASK_THRESHOLD, which also gates the mask-score
    # rescoring. At most MAX_DETECTIONS queries are reported (official values).
    si.CLS_THRESHOLD = 0.005
    si.MASK_THRESHOLD = 0.45
    si.MAX_DETECTIONS = 100

    # Instance context encoder: FPN-style top-down fusion of IN_FEATURES (strides 8-32)
    # with a pyramid pooling module on the coarsest, fused to one stride-8 map.
    si.ENCODER = CN()
    # Name in the SPARSE_INST_ENCODER registry.
    si.ENCODER.NAME = "InstanceContextEncoder"
    # The official encoder reads this key but applies no norm; only "" is accepted.
    si.ENCODER.NORM = ""
    # Backbone features fused by the encoder, finest first (stride 8, 16, 32).
    si.ENCODER.IN_FEATURES = ["res3", "res4", "res5"]
    # Width of the encoder's output (and of its FPN levels).
    si.ENCODER.NUM_CHANNELS = 256

    # IAM decoder: an instance branch (instance activation maps -> per-instance features
    # -> class, mask kernel, objectness) and a mask branch (the pixel embeddings F).
    si.DECODER = CN()
    # Name in the SPARSE_INST_DECODER registry.
    si.DECODER.NAME = "GroupIAMDecoder"
    # Number of instance predictions N (the "queries"; SparseInst paper: 100).
    si.DECODER.NUM_MASKS = 100
    # Foreground classes K (sigmoid class scores: no "no object" class).
    si.DECODER.NUM_CLASSES = 80
    # Width D of the mask kernels and of the mask-branch features (the embedding C).
    si.DECODER.KERNEL_DIM = 128
    # Bilinear upsampling of the stride-8 mask logits: 2.0 gives the official stride 4.
    si.DECODER.SCALE_FACTOR = 2.0
    # Also return the instance activation maps ("pred_iam"), e.g. for visualisation.
    si.DECODER.OUTPUT_IAM = False
    # Groups of activation maps per instance (group IAM, SparseInst paper Sec. 3.3).
    si.DECODER.GROUPS = 4
    # Instance branch: 3x3 convs of width DIM before the activation maps.
    si.DECODER.INST = CN()
    si.DECODER.INST.DIM = 256
    si.DECODER.INST.CONVS = 4
    # Mask branch: 3x3 convs of width DIM, then a 1x1 projection to KERNEL_DIM.
    si.DECODER.MASK = CN()
    si.DECODER.MASK.DIM = 256
    si.DECODER.MASK.CONVS = 4

    # Criterion (SparseInst paper Eq. 3-4). Weights are the official ones.
    si.LOSS = CN()
    # Name in the SPARSE_INST_CRITERION registry.
    si.LOSS.NAME = "SparseInstCriterion"
    # Loss terms: "labels" (focal class loss) and "masks" (BCE + dice on matched masks, and
    # with them the IoU-aware objectness, as in the official criterion).
    si.LOSS.ITEMS = ("labels", "masks")
    # lambda_c: weight of the sigmoid focal class loss ("loss_ce").
    si.LOSS.CLASS_WEIGHT = 2.0
    # Weight of the per-pixel sigmoid BCE of matched masks ("loss_mask").
    si.LOSS.MASK_PIXEL_WEIGHT = 5.0
    # Weight of the dice loss of matched masks ("loss_dice").
    si.LOSS.MASK_DICE_WEIGHT = 2.0
    # lambda_s: weight of the IoU-aware objectness BCE ("loss_objectness").
    si.LOSS.OBJECTNESS_WEIGHT = 1.0

    # Bipartite matching on dice(mask)^ALPHA * p(class)^BETA (SparseInst paper Eq. 2).
    si.MATCHER = CN()
    # Name in the SPARSE_INST_MATCHER registry.
    si.MATCHER.NAME = "SparseInstMatcher"
    si.MATCHER.ALPHA = 0.8
    si.MATCHER.BETA = 0.2

    # Kept so the official yaml files load; train_net.py builds the training mapper from
    # INPUT.DATASET_MAPPER_NAME ("instance": resize shortest edge + flip, which is what
    # the official SparseInstDatasetMapper does with INPUT.CROP disabled).
    si.DATASET_MAPPER = "SparseInstDatasetMapper"
