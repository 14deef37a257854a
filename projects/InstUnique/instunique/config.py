"""``add_instunique_config``: the MODEL.INST_UNIQUE namespace and the base segmenters' keys;
``load_config``: a config file with them, as every entry point reads one."""
import os
from typing import Sequence

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .backbones.config import add_efficientnet_config, add_timm_backbone_config
from .segmenters.condinst.config import add_condinst_config
from .segmenters.mask2former.config import add_mask2former_config
from .segmenters.sparseinst.config import add_sparseinst_config


def add_instunique_config(cfg):
    """Add every key InstUnique and its base segmenters read to ``cfg`` (in place)."""
    add_mask2former_config(cfg)
    add_sparseinst_config(cfg)
    add_condinst_config(cfg)
    add_timm_backbone_config(cfg)
    add_efficientnet_config(cfg)

    # A user's own COCO-format datasets, registered by train_net.py before anything is
    # built (instunique/data/user_datasets.py): entries "NAME=JSON:IMAGE_ROOT", paths
    # relative to the working directory, each registered with detectron2's
    # register_coco_instances as NAME for DATASETS.TRAIN / TEST. With them, the segmenter's
    # class count (e.g. MODEL.SEM_SEG_HEAD.NUM_CLASSES) may be -1: taken from the categories.
    cfg.DATASETS.REGISTER = []
    # train_net.py opens every image of the datasets it uses before the first iteration
    # (instunique/data/validation.py). A missing or undecodable one stops it there, naming
    # the dataset, image id and file; True instead leaves such images out of the run (the
    # loader and the COCO evaluation alike) and logs how many.
    cfg.DATALOADER.SKIP_BAD_IMAGES = False

    cfg.MODEL.INST_UNIQUE = CN()
    # Meta-architecture of the base segmenter that InstUnique trains; inference is its own.
    cfg.MODEL.INST_UNIQUE.BASE_META_ARCHITECTURE = "Mask2Former"

    # Cross-image (inter-image) querying, paper Eq. 5 ("inter-mask prediction loss", Alg. 1).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE = CN()
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED = True
    # Weight w_cross of L_cross in the total loss (Eq. 5 enters unweighted in the paper).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.WEIGHT = 1.0
    # What the cross-image term is: "pixels" (Eq. 5 and Alg. 1: the queries scored against
    # external pixel embeddings, the keys below) or "cross_scene" (the paper's released
    # Mask2Former code, commit 6ab0740 of JamesLiang819/Instance_Unique_Querying: each image's
    # queries decoded on the previous batch's image and supervised with its ground truth;
    # objectives/cross_scene.py; WEIGHT scales it, the other CROSS_IMAGE keys are not read).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.MODE = "pixels"
    # Which queries are scored against external pixels: "all" (Alg. 1 read literally: every
    # query of every image) or "matched" (the official SOLOv2 and CondInst code: only the
    # queries the base matcher assigned to an instance; the others get no Eq. 5 gradient).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.QUERIES = "all"
    # Loss of one (query, external pixel) pair: "focal" (Alg. 1's "Focal_Loss" towards 0)
    # or "probability" (the official CondInst code: s = sigmoid(z / TEMPERATURE) itself).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.LOSS = "focal"
    # Sigmoid focal loss of Alg. 1 ("Focal_Loss"): alpha in [0, 1] and gamma >= 0 of Lin et
    # al. Read by LOSS "focal" only.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.FOCAL_ALPHA = 0.25
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.FOCAL_GAMMA = 2.0
    # Every logit z = e . f is divided by this before the loss and the hard-negative test
    # (> 0; Alg. 1: 1; the official CondInst code: 3, s = sigmoid(z / 3)).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.TEMPERATURE = 1.0
    # Which pairs contribute: "none" (every pair, Alg. 1), "threshold" (only pairs whose
    # wrong-answer probability sigmoid(z / TEMPERATURE) >= HARD_THRESHOLD: the official
    # CondInst code) or "topk" (the TOPK hardest external pixels of each query; no source,
    # a bounded-count alternative to the threshold).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.HARD_NEGATIVES = "none"
    # Probability threshold of HARD_NEGATIVES "threshold", in (0, 1) (official CondInst: 0.8).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.HARD_THRESHOLD = 0.8
    # External pixels kept per query by HARD_NEGATIVES "topk", >= 1.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.TOPK = 64
    # How the pair losses are averaged: "mean" over the kept (query, pixel) pairs (Alg. 1),
    # "mean_all" over every scored pair, those HARD_NEGATIVES leaves out counting as zeros
    # (the official CondInst code: s < 0.8 set to 0, then the mean), or "per_query" (each
    # query's mean over its kept pixels, summed over queries and divided by the batch's
    # ground-truth masks: the base criterion's convention for its mask terms).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.NORMALIZATION = "mean"
    # Where Eq. 5's gradient goes: "none", the queries only (Alg. 1 detaches the external
    # features) or "batch", also the pixel embeddings of the other images of the batch (the
    # memory stays detached), so the pixel decoder too can make look-alike instances of
    # different images answer differently. Ours, not the paper's: an ablation
    # (docs/results/eq5_eq8_variants.md). "batch" needs NORMALIZATION "mean" or "mean_all" and
    # no "topk".
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.PIXEL_GRADIENT = "none"
    # What an external logit z = e . f is measured against: "none" (z itself, target 0: the
    # paper's Eq. 5) or "own_instance" (z - e . r, r the mean pixel embedding of the query's
    # matched instance in its own image, so the loss asks "fires on the external pixel less
    # than on its own instance" and its gradient moves e along f - r). Ours, not the
    # paper's: Eq. 5 at target 0 makes queries timid on look-alike data
    # (docs/results/eq5_eq8_variants.md). Needs QUERIES "matched".
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.REFERENCE = "none"
    # Pixel embeddings sampled per image and iteration from its unpadded area: they are the
    # other images' external features in this batch and enter the memory after the loss.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.PIXELS_PER_IMAGE = 1024
    # Memory capacity in pixels (supp. Table S4: 10k/50k/70k/100k; 100k best). 0: only the
    # other images of the mini-batch are external ("mini-batch (w/o memory)" in Table S4).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS = 100000
    # External pixels scored per chunk: bounds the (queries x pixels) logits held at once.
    # 0: chosen from the device and the number of queries (cache-sized on the CPU).
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.CHUNK_PIXELS = 0
    # Panoptic data (supp. S1): a query matched to a stuff segment of class c gets target 1
    # on external pixels labelled c. The stuff classes are those of DATASETS.TRAIN's
    # metadata (none for instance datasets). False: target 0 everywhere, as for things.
    cfg.MODEL.INST_UNIQUE.CROSS_IMAGE.STUFF_TARGETS = True

    # Transformation equivariance, paper Eq. 8.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE = CN()
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED = True
    # lambda of Alg. 1: weight of the equivariance loss (Alg. 1: 3; official SOLOv2: 0.3).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT = 3.0
    # Whether view x' gets the base loss of its own besides Eq. 8 (True: our reading of the
    # paper, both views are real training samples) or only x does (False: the official SOLOv2
    # code, where x' is seen through the equivariance term alone). With False, x' is
    # still matched, without loss, where Eq. 5 or MATCHING "view" needs its matching.
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.BASE_LOSS_ON_PAIRED_VIEW = True
    # Query<->target matching of the equivariance criterion: "recompute" (the base
    # criterion's matcher on m~ = e'.T(F), Alg. 1 literally) or "view" (the matching x'
    # got in its own base loss, so both losses agree on which query is which instance).
    cfg.MODEL.INST_UNIQUE.EQUIVARIANCE.MATCHING = "recompute"
    # Whether L_equi keeps the base criterion's classification term on the class logits of
    # x' (True: Eq. 8 applies the base loss, class term included) or only its mask terms
    # (False: Alg. 1 calls criterion(transformed_mask_pred, transformed_gt_mask), masks
    # alone).
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

    # Gradient clipping of the terms apart from the base loss (ours; the paper and the
    # official code clip nothing apart). 0: the optimizer clips the sum of all losses as
    # SOLVER.CLIP_GRADIENTS says. > 0: the base loss's gradient is clipped to
    # SOLVER.CLIP_GRADIENTS.CLIP_VALUE as in the paired-view baseline and the terms' (Eq. 5 +
    # Eq. 8) to this norm, then added (instunique/engine/term_clipping.py; needs CLIP_TYPE
    # "full_model", costs a second backward pass). Why: where the terms' gradient outgrows
    # the base loss's, clipping the sum shrinks the base loss's share of every step
    # (docs/results/sparseinst_shapes.md).
    cfg.MODEL.INST_UNIQUE.TERMS_CLIP_VALUE = 0.0
    # With TERMS_CLIP_VALUE > 0: clip apart exactly (two backward passes) every this many
    # steps; in between, one backward pass weights the terms by the ratio of the two clip
    # factors last measured and clips the sum to the norm the exact clip gave then (ours,
    # engine/term_clipping.py). 1: exact at every step (accuracy and cost of both:
    # docs/results/sparseinst_shapes.md, docs/results/step_cost.md).
    cfg.MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD = 1

    # A checkpoint of another run (a path) to continue from, as --resume continues one's own:
    # weights, optimizer, scheduler, iteration, seed and data order. For warm starts: runs
    # that share a baseline's first half and differ in the second. "": start afresh. Ours.
    cfg.SOLVER.WARM_START = ""
    # Periodic checkpoints (SOLVER.CHECKPOINT_PERIOD) kept on disk: the newest this many,
    # model_final.pth always; 0 keeps every one (detectron2's behaviour).
    cfg.SOLVER.CHECKPOINT_MAX_TO_KEEP = 0

    # --eval-only with MODEL.WEIGHTS "" evaluates a randomly initialised model, which is
    # almost always a mistake (a forgotten key): refused unless this is True.
    cfg.TEST.ALLOW_RANDOM_WEIGHTS = False

    # Query-uniqueness evaluation (instunique.evaluation.QueryUniquenessEvaluator), run by
    # train_net.py beside COCOEvaluator in --eval-only and periodic evaluation. Serves any
    # base segmenter with an adapter, InstUnique or plain.
    cfg.TEST.UNIQUENESS = CN()
    cfg.TEST.UNIQUENESS.ENABLED = False
    # Validation images are cut, in loader order, into consecutive groups of this many (per
    # process); a query is scored against the other images of its group (>= 2).
    cfg.TEST.UNIQUENESS.GROUP_SIZE = 8
    # A query is confident when its best class score (the adapter's query_scores) exceeds
    # this; only confident queries are counted (0.5: more likely an object than not).
    cfg.TEST.UNIQUENESS.SCORE_THRESH = 0.5
    # Valid pixel embeddings of each image kept as external pixels (a fixed random sample
    # per image; 0: all). Bounds memory on large images; shapes (32 x 32 cells) keeps all.
    cfg.TEST.UNIQUENESS.PIXELS_PER_IMAGE = 4096


def load_config(config_file: str, opts: Sequence = ()) -> CN:
    """detectron2's defaults, every key of this project, ``config_file`` (its _BASE_ chain)
    and then ``opts`` (KEY VALUE ...) on top; not frozen."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = get_cfg()
    add_instunique_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
