"""The method in the paper's regime: instances that differ in appearance (shapes_diverse), an
ImageNet-pretrained backbone, the released variants, warm starts."""
from .overrides import (
    CI,
    OFFICIAL_EQ5,
    OFFICIAL_EQ8,
    OWN_INSTANCE,
)

STUDIES = {}
# Eq. 5 as released in the official CondInst code: its thresholded s averaged over every pair.
RELEASED_EQ5 = OFFICIAL_EQ5 + [CI + "NORMALIZATION", "mean_all"]
# The cross-image term of the released Mask2Former code (no equivariance term there).
CROSS_SCENE = [CI + "MODE", "cross_scene", "MODEL.INST_UNIQUE.EQUIVARIANCE.ENABLED", "False"]
DIVERSE_BASELINE = "configs/shapes_diverse/paired_views_mask2former_effl0_diverse.yaml"
DIVERSE_INSTUNIQUE = "configs/shapes_diverse/instunique_mask2former_effl0_diverse.yaml"
REGIME_ARMS = [
    ("InstUnique, Alg. 1 (the shapes defaults)", []),
    ("released Mask2Former cross-scene decoding", CROSS_SCENE),
    ("official Eq. 5 as released + official Eq. 8", RELEASED_EQ5 + OFFICIAL_EQ8),
    ("official Eq. 5 + Eq. 8, against the own instance",
     OFFICIAL_EQ5 + OFFICIAL_EQ8 + OWN_INSTANCE),
]
STUDIES["regime_diverse"] = [
    ("baseline (paired views)", DIVERSE_BASELINE, []),
    *[(name, DIVERSE_INSTUNIQUE, opts) for name, opts in REGIME_ARMS],
]
# Warm start: every arm continues the baseline's checkpoint of the half-way iteration (same
# data order) and trains the second half with the terms. Run the baseline arm first
# (`--arms "baseline (paired views)"`, it keeps all its checkpoints), then the others; with
# the terms off the second half would repeat the baseline bit for bit (exact resume).
WARM = ["SOLVER.WARM_START", "{half_checkpoint}"]
STUDIES["regime_diverse_warm"] = [
    ("baseline (paired views)", DIVERSE_BASELINE,
     ["SOLVER.CHECKPOINT_MAX_TO_KEEP", "0", "SOLVER.CHECKPOINT_PERIOD", "100"]),
    *[(f"warm start, {name}", DIVERSE_INSTUNIQUE, WARM + opts) for name, opts in REGIME_ARMS],
]
STUDIES["regime_shapes"] = [
    ("baseline (paired views)", "configs/shapes/paired_views_mask2former_effl0_shapes.yaml", []),
    *[(name, "configs/shapes/instunique_mask2former_effl0_shapes.yaml", opts)
      for name, opts in REGIME_ARMS],
]
