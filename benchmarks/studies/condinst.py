"""Supp. Tables S3/S4's base model in miniature: CondInst on shapes, its paired-view
baseline against InstUnique, with detectron2's Mask R-CNN (the same ImageNet
EfficientNet-Lite0 in an FPN, the same iterations and images per iteration) beside it."""
STUDIES = {}
STUDIES["condinst_shapes"] = [
    ("baseline (paired views)", "configs/shapes/paired_views_condinst_effl0_shapes.yaml", []),
    ("InstUnique", "configs/shapes/instunique_condinst_effl0_shapes.yaml", []),
    ("CondInst (plain)", "configs/shapes/condinst_effl0_shapes.yaml", []),
    ("Mask R-CNN EfficientNet-Lite0-FPN, ImageNet",
     "configs/shapes/mask_rcnn_effl0_FPN_shapes.yaml", []),
]
