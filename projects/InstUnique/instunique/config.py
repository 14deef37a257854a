"""``add_instunique_config``: the MODEL.INST_UNIQUE namespace and the base segmenters' keys."""
from detectron2.config import CfgNode as CN

from .segmenters.mask2former.config import add_mask2former_config


def add_instunique_config(cfg):
    """Add every key InstUnique and its base segmenters read to ``cfg`` (in place)."""
    add_mask2former_config(cfg)

    cfg.MODEL.INST_UNIQUE = CN()
    # Meta-architecture of the base segmenter that InstUnique trains; inference is its own.
    cfg.MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE = "Mask2Former"

    # Cross-image (inter-image) querying, paper Eq. 5 ("inter-mask prediction loss", Alg. 1).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE = CN()
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED = True
    # Weight w_cross of L_cross in the total loss (Eq. 5 enters unweighted in the paper).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.WEIGHT = 1.0
    # Sigmoid focal loss of Alg. 1 ("Focal_Loss"): alpha and gamma of Lin et al.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.FOCAL_ALPHA = 0.25
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.FOCAL_GAMMA = 2.0
    # Pixel embeddings sampled per image and iteration from its unpadded area: they are the
    # other images' external features in this batch and enter the memory after the loss.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.PIXELS_PER_IMAGE = 1024
    # Memory capacity in pixels (supp. Table S4: 10k/50k/70k/100k; 100k best). 0: only the
    # other images of the mini-batch are external ("mini-batch (w/o memory)" in Table S4).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS = 100000
    # External pixels scored per chunk: bounds the (queries x pixels) logits held at once.
    # 0: chosen from the device and the number of queries (cache-sized on the CPU).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.CHUNK_PIXELS = 0

    # Transformation equivariance, paper Eq. 8.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE = CN()
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED = True
    # lambda of Alg. 1: weight of the equivariance loss.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT = 3.0
    # Query<->target matching of the equivariance criterion: "recompute" (the base
    # criterion's matcher on m~ = e'.T(F), Alg. 1 literally) or "view" (the matching x'
    # got in its own base loss, so both losses agree on which query is which instance).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.MATCHING = "recompute"
    # Whether L_equi keeps the base criterion's classification term on the class logits of
    # x' (True, DESIGN's reading) or only its mask terms (False: Alg. 1 calls
    # criterion(transformed_mask_pred, transformed_gt_mask), masks alone).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.CLASS_TERM = True
    # Transform family T (supp. S1, Table S3): any of "flip", "crop", "rotation", "scaling".
    # The main experiments use flip + crop.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.TRANSFORMS = ["flip", "crop"]
    # Random crop keeps this fraction (lo, hi) of each side (supp. S1: 0.6-1.0).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.CROP_RANGE = (0.6, 1.0)
    # Rotation angle range in degrees (supp. S1: 0-60), sign drawn at random.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.ROTATION_RANGE = (0.0, 60.0)
    # Scaling factor range (supp. S1: 0.5-2.0).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.SCALE_RANGE = (0.5, 2.0)
