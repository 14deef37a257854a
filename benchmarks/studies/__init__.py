"""The accuracy studies as data: name -> [(arm, config, config overrides)], one module per
family; ``benchmarks/accuracy_study.py`` runs them."""
from . import (
    base,
    condinst,
    panoptic,
    pretrained,
    regime,
    shapes_terms,
    sparseinst,
    uniqueness,
)

STUDIES = {}
for _module in (shapes_terms, base, pretrained, sparseinst, uniqueness, regime, panoptic,
                condinst):
    STUDIES.update(_module.STUDIES)
# The evaluator's result group and figures each study reports: mask AP unless named here.
TASKS = dict(panoptic.TASKS)

__all__ = ["STUDIES", "TASKS"]
