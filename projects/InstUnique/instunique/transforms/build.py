"""The transform family named by MODEL.INST_UNIQUE.EQUIVARIANCE."""
import re

from .family import TransformFamily

_KEYS = {
    "names": "TRANSFORMS",
    "crop_range": "CROP_RANGE",
    "rotation_range": "ROTATION_RANGE",
    "scale_range": "SCALE_RANGE",
}


def build_transform_family(cfg) -> TransformFamily:
    """Validated ``TransformFamily``; a bad value raises ValueError naming its config key."""
    eq = cfg.MODEL.INST_UNIQUE.EQUIVARIANCE
    if eq.ENABLED and not eq.TRANSFORMS:
        # x' would be x itself, and Eq. 8 a second copy of the base loss.
        raise ValueError(
            "MODEL.INST_UNIQUE.EQUIVARIANCE.TRANSFORMS is empty while EQUIVARIANCE.ENABLED: "
            "list at least one transform (e.g. ['flip', 'crop']) or disable Eq. 8"
        )
    try:
        return TransformFamily(eq.TRANSFORMS, eq.CROP_RANGE, eq.ROTATION_RANGE, eq.SCALE_RANGE)
    except ValueError as e:
        message = re.sub(
            r"\b(" + "|".join(_KEYS) + r")\b",
            lambda m: "MODEL.INST_UNIQUE.EQUIVARIANCE." + _KEYS[m.group(1)],
            str(e),
        )
        raise ValueError(message) from None
