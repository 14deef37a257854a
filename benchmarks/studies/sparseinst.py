"""Supp. Table S1 in miniature: SparseInst, its paired-view baseline against InstUnique."""
from .overrides import (
    CI,
    CROSS_OFF,
    EQUI_OFF,
    NO_CLIP,
    OFFICIAL_EQ8,
    SI_BASELINE,
    SI_INSTUNIQUE,
    TERMS_CLIP,
    TERMS_CLIP_PERIOD,
)

STUDIES = {}
# Supp. Table S1 in miniature: SparseInst, its paired-view baseline against InstUnique.
# JOINT: the terms' gradient clipped with the base loss's (TERMS_CLIP_VALUE 0), as the arms
# that ask about the terms themselves measure them.
JOINT = [TERMS_CLIP, "0.0"]
STUDIES["sparseinst"] = [
    ("baseline (paired views)", SI_BASELINE, []),
    ("InstUnique", SI_INSTUNIQUE, JOINT),
    # Which term costs AP? SparseInst has no deep supervision, so L_equi at lambda 1 is as
    # heavy as its whole base loss (for the shapes Mask2Former, one of its 4 supervised
    # outputs).
    ("cross-image only", SI_INSTUNIQUE, JOINT + EQUI_OFF),
    ("InstUnique, lambda 0.2", SI_INSTUNIQUE,
     JOINT + ["MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", "0.2"]),
    ("official Eq. 8 (lambda 0.3, no base loss on x')", SI_INSTUNIQUE, JOINT + OFFICIAL_EQ8),
    # Each term alone, and Eq. 5 on matched queries only.
    ("equivariance only", SI_INSTUNIQUE, JOINT + CROSS_OFF),
    ("Eq. 5 on matched queries only", SI_INSTUNIQUE, JOINT + [CI + "QUERIES", "matched"]),
    # Lighter terms.
    ("equivariance only, lambda 0.2", SI_INSTUNIQUE,
     JOINT + CROSS_OFF + ["MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", "0.2"]),
    ("cross-image only, weight 0.1", SI_INSTUNIQUE, JOINT + EQUI_OFF + [CI + "WEIGHT", "0.1"]),
    # At weight 0 a term changes no gradient: these match the baseline unless a term's mere
    # presence has a side effect.
    ("cross-image only, weight 0", SI_INSTUNIQUE, JOINT + EQUI_OFF + [CI + "WEIGHT", "0.0"]),
    ("equivariance only, lambda 0", SI_INSTUNIQUE,
     JOINT + CROSS_OFF + ["MODEL.INST_UNIQUE.EQUIVARIANCE.WEIGHT", "0.0"]),
    # Our shapes configs clip the whole model's gradient norm to 1 (the Mask2Former recipe);
    # the official SparseInst recipe does not clip. Every step is clipped (the base
    # gradient's norm is ~5 on the kernel layer alone), so a term's gradient rescales the
    # base loss's in every step, by a factor that varies from step to step.
    ("baseline, no gradient clipping (official SparseInst)", SI_BASELINE, NO_CLIP),
    ("InstUnique, no gradient clipping", SI_INSTUNIQUE, JOINT + NO_CLIP),
    # The base loss's gradient clipped to 1 as in the baseline, the terms' to their own norm,
    # then added (MODEL.INST_UNIQUE.TERMS_CLIP_VALUE): the terms cannot shrink the base
    # loss's share of a step.
    *[(f"InstUnique, terms clipped apart to {value}", SI_INSTUNIQUE,
       [TERMS_CLIP, value, TERMS_CLIP_PERIOD, "1"]) for value in ("0.25", "1.0")],
    # The same at a seventh of its extra step cost: the second backward pass once every 10
    # steps, one pass from the last measured clip factors in between (TERMS_CLIP_PERIOD).
    ("InstUnique, terms clipped apart to 0.25, exact every 10 steps", SI_INSTUNIQUE,
     [TERMS_CLIP, "0.25", TERMS_CLIP_PERIOD, "10"]),
]
