"""Stop training at the first NaN or inf, naming the iteration and the term it appeared in.

A diverging run otherwise dies one step later, deep in the Hungarian matching (scipy's
"matrix contains invalid numeric entries"), with no hint of when or why. Three layers:

- the matchers refuse a non-finite cost and name the model output
  (:mod:`instunique.segmenters.finite_cost`);
- :func:`install_nonfinite_checks` checks every training forward's loss dict (naming the
  loss key) and, before every optimizer step, the gradients (naming the parameter);
- :func:`at_iteration`, around the trainer's ``run_step``, puts the iteration in front of
  any of these messages.

Under AMP the gradient check sees only the steps GradScaler lets through: an overflow in
scaled gradients is AMP's own business (it skips the step and lowers the scale).
"""
import contextlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "at_iteration",
    "check_gradients",
    "check_losses",
    "first_nonfinite",
    "install_nonfinite_checks",
]

_CAUSE = "a too high SOLVER.BASE_LR is the usual cause"


def first_nonfinite(named: Iterable[Tuple[str, Optional[Tensor]]]) -> Optional[Tuple[str, str]]:
    """(name, "NaN" or "inf") of the first tensor with a non-finite value; None if all are
    finite. ``None`` tensors (parameters without a gradient) are skipped."""
    items = [(name, t) for name, t in named if t is not None]
    if not items:
        return None
    # One device sync for all tensors; the culprit is looked for only after a failure.
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in items])
    if bool(finite.all()):
        return None
    name, tensor = items[int((~finite).nonzero()[0, 0])]
    return name, "NaN" if bool(torch.isnan(tensor).any()) else "inf"


def check_losses(losses: Dict[str, Tensor]) -> None:
    """Raise FloatingPointError naming the first loss key whose value is not finite."""
    found = first_nonfinite((key, torch.as_tensor(value)) for key, value in losses.items())
    if found:
        key, kind = found
        raise FloatingPointError(f"loss {key!r} is {kind} ({_CAUSE})")


def check_gradients(named_parameters: Iterable[Tuple[str, nn.Parameter]]) -> None:
    """Raise FloatingPointError naming the first parameter whose gradient is not finite."""
    found = first_nonfinite((name, p.grad) for name, p in named_parameters)
    if found:
        name, kind = found
        raise FloatingPointError(f"gradient of parameter {name!r} has {kind} ({_CAUSE})")


def _unwrapped(model: nn.Module) -> nn.Module:
    # DistributedDataParallel prefixes every parameter name with "module.".
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def install_nonfinite_checks(model: nn.Module, optimizer: torch.optim.Optimizer
                             ) -> List[RemovableHandle]:
    """Check every training forward's loss dict (:func:`check_losses`) and, before each
    ``optimizer.step()``, the gradients of its parameters (:func:`check_gradients`).

    Returns the hook handles (``handle.remove()`` uninstalls).
    """
    names = {id(p): name for name, p in _unwrapped(model).named_parameters()}

    def before_step(optimizer, args, kwargs):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        check_gradients((names.get(id(p), f"#{i} of the optimizer"), p)
                        for i, p in enumerate(params))

    def after_forward(module, inputs, output):
        # In eval mode the model returns predictions, not a loss dict.
        if module.training and isinstance(output, dict):
            check_losses(output)

    return [optimizer.register_step_pre_hook(before_step),
            model.register_forward_hook(after_forward)]


@contextlib.contextmanager
def at_iteration(iteration: int) -> Iterator[None]:
    """Re-raise a FloatingPointError from the block as "iteration N: <message>"."""
    try:
        yield
    except FloatingPointError as e:
        if str(e).startswith("iteration "):
            raise
        raise FloatingPointError(f"iteration {iteration}: {e}") from e
