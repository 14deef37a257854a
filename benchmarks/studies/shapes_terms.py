"""InstUnique against its paired-view baseline on shapes: the main study and Tables S3 and
S4 in miniature (transform families, memory capacity)."""
from .overrides import (
    BASELINE,
    CROSS_OFF,
    EQUI_OFF,
    EQUI_ONLY,
    INSTUNIQUE,
    LAMBDA3,
    MEMORY,
)

# name -> list of (arm, config, extra opts)
STUDIES = {
    "main": [
        ("baseline (paired views)", BASELINE, []),
        ("InstUnique", INSTUNIQUE, []),
        ("InstUnique, lambda 3 (paper)", INSTUNIQUE, LAMBDA3),
        ("cross-image only", INSTUNIQUE, EQUI_OFF),
        ("equivariance only, lambda 3", INSTUNIQUE, CROSS_OFF + LAMBDA3),
        ("InstUnique, lambda 3, L_equi without class term", INSTUNIQUE,
         LAMBDA3 + ["MODEL.INST_UNIQUE.EQUIVARIANCE.CLASS_TERM", "False"]),
        ("InstUnique, lambda 3, equivariance on the views' matching", INSTUNIQUE,
         LAMBDA3 + ["MODEL.INST_UNIQUE.EQUIVARIANCE.MATCHING", "view"]),
    ],
    # Table S3 in miniature: equivariance only, growing transform family.
    "transforms": [
        ("baseline (paired views)", BASELINE, []),
        ("flip+crop", INSTUNIQUE, EQUI_ONLY + ["['flip','crop']"]),
        ("+rotation", INSTUNIQUE, EQUI_ONLY + ["['flip','crop','rotation']"]),
        ("+scaling", INSTUNIQUE, EQUI_ONLY + ["['flip','crop','scaling']"]),
        ("all", INSTUNIQUE, EQUI_ONLY + ["['flip','crop','rotation','scaling']"]),
    ],
    # Table S4 in miniature: both terms, memory capacity in pixels.
    "memory": [
        ("mini-batch (no memory)", INSTUNIQUE, LAMBDA3 + [MEMORY, "0"]),
        ("10k", INSTUNIQUE, LAMBDA3 + [MEMORY, "10000"]),
        ("50k", INSTUNIQUE, LAMBDA3 + [MEMORY, "50000"]),
        ("100k", INSTUNIQUE, LAMBDA3 + [MEMORY, "100000"]),
    ],
}
