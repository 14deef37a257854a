"""The one way a run gets its data ready: ``prepare_datasets(cfg, train)``.

In order: the user's DATASETS.REGISTER specs are registered and the class count checked or
set from them; every dataset the run reads is looked up (built-in synthetic data is
generated on first use) and its files found; its images, masks and classes are validated
(what DATALOADER.SKIP_BAD_IMAGES leaves out, the dataset is re-registered without). All of
it before a model is built, so bad data fails in seconds, naming the dataset.
"""
from .datasets import check_dataset
from .user_datasets import setup_user_datasets
from .validation import validate_datasets

__all__ = ["prepare_datasets"]


def prepare_datasets(cfg, train: bool = True) -> None:
    """Get DATASETS.TEST and, if ``train``, DATASETS.TRAIN ready (see the module docstring).

    ``cfg`` must not be frozen: a class count of AUTO is filled in from the data. Without
    ``train`` (``--eval-only``) a missing training set is no error.
    """
    setup_user_datasets(cfg, eval_only=not train)
    for name in (*(cfg.DATASETS.TRAIN if train else ()), *cfg.DATASETS.TEST):
        check_dataset(name)
    validate_datasets(cfg, train=train)
