"""Eq. 5 / Eq. 8 variants on shapes_crowd and shapes, with the query-uniqueness figures."""
from .overrides import (
    BASELINE,
    CI,
    INSTUNIQUE,
    MASK_RCNN_SHAPES,
    OFFICIAL_EQ5,
    OFFICIAL_EQ8,
    OWN_INSTANCE,
    QUERY_SELECTION,
    TERMS_CLIP,
)

STUDIES = {}
# Instance-unique querying where look-alike instances crowd every image: shapes_crowd,
# 8-20 instances per image, so 40 queries. Both configs turn the uniqueness evaluator on.
CROWD = ["DATASETS.TRAIN", "('shapes_crowd_train',)", "DATASETS.TEST", "('shapes_crowd_val',)",
         "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "40", "TEST.DETECTIONS_PER_IMAGE", "40"]
STUDIES["uniqueness_crowd"] = [
    ("baseline (paired views)", BASELINE, CROWD),
    ("InstUnique (Alg. 1: all queries, mean focal, lambda 1)", INSTUNIQUE, CROWD),
    ("official Eq. 5 + official Eq. 8", INSTUNIQUE, CROWD + OFFICIAL_EQ5 + OFFICIAL_EQ8),
    ("official Eq. 5, lambda 1", INSTUNIQUE, CROWD + OFFICIAL_EQ5),
    ("matched queries, per-query focal, top-64, weight 10", INSTUNIQUE, CROWD + [
        CI + "QUERIES", "matched", CI + "NORMALIZATION", "per_query",
        CI + "HARD_NEGATIVES", "topk", CI + "TOPK", "64", CI + "WEIGHT", "10.0"]),
    # The official Eq. 5 at a tenth of its weight.
    ("official Eq. 5 at weight 1, lambda 1", INSTUNIQUE, CROWD + OFFICIAL_EQ5 + [
        CI + "WEIGHT", "1.0"]),
    # Eq. 5's gradient also into the batch's pixel embeddings: can it act when the external
    # look-alike pixels are not detached?
    ("InstUnique (Alg. 1) + pixel gradient into the batch", INSTUNIQUE, CROWD + [
        CI + "PIXEL_GRADIENT", "batch"]),
    ("official Eq. 5 + official Eq. 8 + pixel gradient into the batch", INSTUNIQUE,
     CROWD + OFFICIAL_EQ5 + OFFICIAL_EQ8 + [CI + "PIXEL_GRADIENT", "batch"]),
    # External logits measured against the query's own instance (ours).
    ("official Eq. 5 + Eq. 8, against the own instance", INSTUNIQUE,
     CROWD + OFFICIAL_EQ5 + OFFICIAL_EQ8 + OWN_INSTANCE),
    # The anchor: same data, iterations and 8 images per iteration, 40 detections.
    ("Mask R-CNN R18-FPN (detectron2)", MASK_RCNN_SHAPES, CROWD[:4] + CROWD[-2:]),
]
# The same variants on shapes, whose colours are drawn per image: a look-alike of another
# image differs in shade, so a query can be unique by appearance, which shapes_crowd's
# identical instances rule out (our reading of why the official Eq. 5 costs AP there).
STUDIES["uniqueness_shapes"] = [
    ("baseline (paired views)", BASELINE, []),
    ("InstUnique (Alg. 1: all queries, mean focal, lambda 1)", INSTUNIQUE, []),
    ("official Eq. 5 + official Eq. 8", INSTUNIQUE, OFFICIAL_EQ5 + OFFICIAL_EQ8),
    ("official Eq. 5 at weight 3 + official Eq. 8", INSTUNIQUE,
     OFFICIAL_EQ5 + OFFICIAL_EQ8 + [CI + "WEIGHT", "3.0"]),
    # External logits measured against the query's own instance (ours).
    ("official Eq. 5 + Eq. 8, against the own instance", INSTUNIQUE,
     OFFICIAL_EQ5 + OFFICIAL_EQ8 + OWN_INSTANCE),
    # The official Eq. 8 drops the base loss on x': Eq. 5's share of the AP cost alone.
    ("official Eq. 5 against the own instance, our Eq. 8 (lambda 1)", INSTUNIQUE,
     OFFICIAL_EQ5 + OWN_INSTANCE),
    # Queries made from each image's own tokens (MODEL.MASK_FORMER.QUERY_SELECTION): do
    # they fire less on other images without any term?
    ("baseline, query selection", BASELINE, QUERY_SELECTION),
    ("official Eq. 5 + Eq. 8, against the own instance, query selection", INSTUNIQUE,
     OFFICIAL_EQ5 + OFFICIAL_EQ8 + OWN_INSTANCE + QUERY_SELECTION),
    # Is the own-instance arm's AP cost the terms' share of a clipped step (as for
    # SparseInst)? Base clipped to 1, terms to 0.25.
    ("official Eq. 5 + Eq. 8, against the own instance, terms clipped apart to 0.25",
     INSTUNIQUE, OFFICIAL_EQ5 + OFFICIAL_EQ8 + OWN_INSTANCE + [TERMS_CLIP, "0.25"]),
]
