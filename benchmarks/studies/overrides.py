"""Config files and override lists that several studies share (KEY VALUE ... lists)."""

BASELINE = "configs/shapes/paired_views_mask2former_shapes.yaml"
INSTUNIQUE = "configs/shapes/instunique_mask2former_shapes.yaml"  # lambda = 1
CROSS_OFF = ["MODEL.INST_UNIQUE.CROSS_IMAGE.ENABLED", "False"]
EQUI_OFF = ["MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", "False"]
LAMBDA3 = ["MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", "3.0"]  # the paper's (Alg. 1)
# Equivariance only at lambda 3; each arm appends the value of TRANSFORMS.
EQUI_ONLY = CROSS_OFF + LAMBDA3 + ["MODEL.INST_UNIQUE.EQUIVARIANCE.TRANSFORMS"]
MEMORY = "MODEL.INST_UNIQUE.CROSS_IMAGE.MEMORY_PIXELS"
# The anchor and the base models of the recipe studies (no InstUnique terms).
MASK_RCNN_SHAPES = "configs/shapes/mask_rcnn_R18_FPN_shapes.yaml"
M2F_SHAPES = "configs/shapes/mask2former_shapes.yaml"
MASK_RCNN_BLOBS = "configs/blobs/mask_rcnn_R18_FPN_blobs.yaml"
M2F_BLOBS = "configs/blobs/mask2former_blobs.yaml"
SPARSEINST_BLOBS = "configs/blobs/sparseinst_blobs.yaml"
SI_BASELINE = "configs/shapes/paired_views_sparseinst_shapes.yaml"
SI_INSTUNIQUE = "configs/shapes/instunique_sparseinst_shapes.yaml"
NO_CLIP = ["SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
TERMS_CLIP = "MODEL.INST_UNIQUE.TERMS_CLIP_VALUE"
TERMS_CLIP_PERIOD = "MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD"
CI = "MODEL.INST_UNIQUE.CROSS_IMAGE."
# Eq. 5 as the official CondInst code: matched queries, s = sigmoid(z / 3) itself on the
# pairs with s >= 0.8, weight 10.
OFFICIAL_EQ5 = [CI + "QUERIES", "matched", CI + "LOSS", "probability", CI + "TEMPERATURE", "3.0",
                CI + "HARD_NEGATIVES", "threshold", CI + "HARD_THRESHOLD", "0.8",
                CI + "WEIGHT", "10.0"]
# Ours: every external logit measured against the query's own instance, so Eq. 5 asks for a
# weaker answer outside than on its own instance, not for no answer; at threshold 0.5 the
# kept pairs are those where the query fires outside at least as on its own instance.
OWN_INSTANCE = [CI + "REFERENCE", "own_instance", CI + "HARD_THRESHOLD", "0.5"]
# Eq. 8 as the official SOLOv2 code: no base loss on x', lambda 0.3.
OFFICIAL_EQ8 = ["MODEL.INST_UNIQUE.EQUIVARIANCE.BASE_LOSS_ON_PAIRED_VIEW", "False",
                "MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", "0.3"]
# Queries start on the top-scoring memory tokens (Mask DINO's query selection; ours).
QUERY_SELECTION = ["MODEL.MASK_FORMER.QUERY_SELECTION", "True"]
