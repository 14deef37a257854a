"""The logging of a run: detectron2's ``default_setup`` plus this package's own logger, each
line printed once however many runs one process sets up (a notebook, a benchmark)."""
import logging

from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["setup_run"]

# detectron2 and fvcore get theirs from default_setup; "instunique" (the uniqueness table,
# data checks, term clipping) would otherwise reach no handler and print nothing at INFO.
_LOGGERS = ("detectron2", "fvcore", "instunique")


def setup_run(cfg, args) -> None:
    """``default_setup(cfg, args)`` (output dir, config dump, seeds, environment) and the
    "instunique" logger to stdout and OUTPUT_DIR/log.txt. detectron2's ``setup_logger``
    adds handlers for every new output directory and never removes the old ones, so a
    second run in one process would print each line twice: an earlier run's handlers go."""
    before = {name: list(logging.getLogger(name).handlers) for name in _LOGGERS}
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="instunique",
                 abbrev_name="iu")
    for name, old in before.items():
        logger = logging.getLogger(name)
        if len(logger.handlers) > len(old):  # set up anew for this run's output
            for handler in old:
                logger.removeHandler(handler)
