"""From scratch (R18) against the ImageNet-pretrained EfficientNet-Lite0, for our Mask2Former
and for detectron2's Mask R-CNN."""
STUDIES = {}
# From scratch (R18) against the ImageNet-pretrained EfficientNet-Lite0, for our Mask2Former
# and for detectron2's Mask R-CNN, at the configs' own schedules.
for _data in ("shapes", "blobs"):
    STUDIES[f"pretrained_{_data}"] = [
        ("Mask R-CNN R18-FPN, from scratch", f"configs/{_data}/mask_rcnn_R18_FPN_{_data}.yaml", []),
        ("Mask R-CNN EfficientNet-Lite0-FPN, ImageNet",
         f"configs/{_data}/mask_rcnn_effl0_FPN_{_data}.yaml", []),
        ("Mask2Former R18, from scratch", f"configs/{_data}/mask2former_{_data}.yaml", []),
        # The backbone at the official Mask2Former 0.1x learning rate, as the configs first had.
        ("Mask2Former EfficientNet-Lite0, ImageNet",
         f"configs/{_data}/mask2former_effl0_{_data}.yaml", ["SOLVER.BACKBONE_MULTIPLIER", "0.1"]),
        # Is it the backbone's 0.1x learning rate, or the pretraining itself? (The configs'
        # setting.)
        ("Mask2Former EfficientNet-Lite0, ImageNet, backbone at the full learning rate",
         f"configs/{_data}/mask2former_effl0_{_data}.yaml", ["SOLVER.BACKBONE_MULTIPLIER", "1.0"]),
        ("Mask2Former EfficientNet-Lite0, from scratch",
         f"configs/{_data}/mask2former_effl0_{_data}.yaml",
         ["MODEL.EFFICIENTNET.WEIGHTS", "", "SOLVER.BACKBONE_MULTIPLIER", "1.0"]),
    ]
