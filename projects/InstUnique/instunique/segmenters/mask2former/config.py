"""Config keys of the Mask2Former base segmenter.

Key names and defaults are the official Mask2Former ones, so the official yaml files and
their overrides carry over unchanged.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config


def add_mask2former_config(cfg):
    """Add the MODEL.MASK_FORMER namespace and Mask2Former's extra keys to ``cfg``."""
    # The official yaml files also set DeepLab's keys (MODEL.RESNETS.STEM_TYPE, poly lr).
    if not hasattr(cfg.MODEL.RESNETS, "STEM_TYPE"):
        add_deeplab_config(cfg)
    # Dataset mapper of the training loader: "coco_instance_lsj" (large-scale jitter, the
    # official COCO recipe) or "instance" (detectron2's ResizeShortestEdge + flip).
    cfg.INPUT.DATASET_MAPPER_NAME = "instance"
    # Large-scale jitter: output side and the range of random rescaling around it.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Pad every image of a batch to a multiple of this (-1: the model's own divisibility).
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # AdamW for the transformer; the backbone learns at BASE_LR x this.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Weight decay of embedding tables (queries, level embeddings).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0

    cfg.MODEL.MASK_FORMER = CN()
    # Loss weights of the set criterion and of the Hungarian costs.
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True  # a loss on every decoder layer's output
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1  # cross-entropy weight of the "no object" class
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0  # sigmoid binary cross-entropy on masks

    # Transformer decoder.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.0
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0  # unused by Mask2Former; kept for the official yaml
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 10  # decoder layers + 1 (the prediction before layer 0)
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # Project the pixel decoder's features even when their width equals HIDDEN_DIM.
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False

    # Inference.
    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.8
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # Ours, not in Mask2Former: cut each instance mask to its largest 8-connected piece
    # before its mask score and box. A query's mask often also fires on touching
    # look-alikes (measured by benchmarks/largest_component.py:
    # docs/results/competent_base.md). Off, as the official model: an occluded object can
    # be visible in several pieces, as on COCO.
    cfg.MODEL.MASK_FORMER.TEST.LARGEST_COMPONENT = False

    # Images are padded to a multiple of this before the backbone.
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32

    # Pixel decoder.
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256  # width C of the pixel embeddings F
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    # How multi-scale deformable attention samples (ours; the official model needs a compiled
    # CUDA op): "pytorch" (grid_sample per level, any device), "triton" (our Triton kernels,
    # CUDA; on the CPU only under TRITON_INTERPRET=1), "auto" (Triton on CUDA when it
    # imports, PyTorch otherwise). Same parameters and outputs within float tolerance.
    cfg.MODEL.SEM_SEG_HEAD.DEFORM_ATTN_IMPL = "auto"
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # Add a learned projection of sine position features to the mask features F (ours; not
    # in Mask2Former: SOLO, CondInst and SparseInst give their mask features coordinates).
    # Lets a query tell apart touching look-alike instances; adds MASK_DIM^2 + MASK_DIM
    # parameters (sem_seg_head.mask_position.*). Off: the official architecture.
    cfg.MODEL.MASK_FORMER.MASK_POSITION_FEATURES = False

    # Queries from each image's top-scoring multi-scale memory tokens (their features and
    # positions) instead of learned embeddings (ours, after Mask DINO's query selection;
    # needs class logits). Replaces query_feat / query_embed by selection_proj /
    # selection_norm. Off: the official architecture.
    cfg.MODEL.MASK_FORMER.QUERY_SELECTION = False

    # Point-sampled mask losses (PointRend-style importance sampling).
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
