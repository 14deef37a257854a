"""Supp. Table S2 in miniature: panoptic Mask2Former on shapes_panoptic, scored by PQ."""
STUDIES = {}
STUDIES["panoptic"] = [
    ("baseline (paired views)", "configs/shapes/paired_views_mask2former_panoptic_shapes.yaml",
     []),
    ("InstUnique (stuff-aware Eq. 5)", "configs/shapes/instunique_mask2former_panoptic_shapes.yaml",
     []),
]
# The evaluator's result group and figures each study reports: mask AP unless named here.
TASKS = {"panoptic": ("panoptic_seg", ["PQ", "PQ_th", "PQ_st", "SQ", "RQ"])}
