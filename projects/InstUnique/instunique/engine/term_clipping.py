"""Clip the base loss's gradient and InstUnique's terms' gradient each on its own.

The shapes recipes clip the whole model's gradient norm (Mask2Former's recipe). The terms
make that norm larger (SparseInst on shapes: docs/results/sparseinst_shapes.md), so
clipping the sum shrinks the base loss's share of every step by a factor that varies from
step to step. With
``MODEL.INST_UNIQUE.TERMS_CLIP_VALUE`` > 0 the base gradient is clipped to
``SOLVER.CLIP_GRADIENTS.CLIP_VALUE`` exactly as in the paired-view baseline, the terms' to
their own value, and the two are added: the terms cannot take more than that from a step.

It costs a second backward pass through the shared graph (the terms' gradient is taken
apart from the base loss's); ``MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD`` pays it once every that
many steps (:class:`TermClipper`).
"""
import time
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..meta_arch import is_term_loss
from ..solver import clips_terms_separately

__all__ = ["TermClipper", "TermClippingTrainer", "backward_clipped_apart", "build_term_clipper",
           "check_term_clipping", "clips_terms_separately"]


def check_term_clipping(cfg) -> None:
    """Raise ValueError naming the key when TERMS_CLIP_VALUE cannot apply to ``cfg``."""
    value = cfg.MODEL.INST_UNIQUE.TERMS_CLIP_VALUE
    key = "MODEL.INST_UNIQUE.TERMS_CLIP_VALUE"
    if value < 0:
        raise ValueError(f"{key} must be >= 0 (0: clip the sum as SOLVER says), got {value}")
    period = cfg.MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD
    if not isinstance(period, int) or period < 1:
        raise ValueError(f"MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD must be an integer >= 1 (1: "
                         f"clip exactly at every step), got {period!r}")
    if value == 0:
        return
    if cfg.MODEL.META_ARCHITECTURE != "InstUnique":
        raise ValueError(f"{key} = {value} needs MODEL.META_ARCHITECTURE 'InstUnique' (the "
                         f"terms it clips), got {cfg.MODEL.META_ARCHITECTURE!r}")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED or clip.CLIP_TYPE != "full_model":
        raise ValueError(f"{key} = {value} clips the base gradient to SOLVER.CLIP_GRADIENTS."
                         f"CLIP_VALUE: it needs SOLVER.CLIP_GRADIENTS.ENABLED True and CLIP_TYPE "
                         f"'full_model', got {clip.ENABLED} and {clip.CLIP_TYPE!r}")
    if cfg.SOLVER.AMP.ENABLED:
        raise ValueError(f"{key} = {value} is not supported with SOLVER.AMP.ENABLED (the "
                         f"scaled gradients would need unscaling before each clip)")


def build_term_clipper(cfg, params: List[nn.Parameter]) -> "TermClipper":
    clip = cfg.SOLVER.CLIP_GRADIENTS
    return TermClipper(params, clip.CLIP_VALUE, cfg.MODEL.INST_UNIQUE.TERMS_CLIP_VALUE,
                       clip.NORM_TYPE, cfg.MODEL.INST_UNIQUE.TERMS_CLIP_PERIOD)


def _total_norm(grads: List[Tensor], norm_type: float) -> Tensor:
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g, norm_type) for g in grads]), norm_type)


def backward_clipped_apart(params: List[nn.Parameter], base: Tensor, terms: Tensor,
                           base_clip: float, terms_clip: float, norm_type: float
                           ) -> Tuple[float, float]:
    """Set ``p.grad`` = clip(d base / dp, base_clip) + clip(d terms / dp, terms_clip), each
    clipped by its own total norm over ``params``. Returns both norms before clipping.

    The terms' gradient is taken with ``autograd.grad`` (and averaged over processes by
    hand), the base loss's with ``backward()``, so DistributedDataParallel reduces once.
    """
    term_grads = torch.autograd.grad(terms, params, retain_graph=True, allow_unused=True)
    term_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, term_grads)]
    if comm.get_world_size() > 1:
        for g in term_grads:
            torch.distributed.all_reduce(g)
            g /= comm.get_world_size()
    base.backward()
    base_norm = torch.nn.utils.clip_grad_norm_(params, base_clip, norm_type)
    terms_norm = _total_norm(term_grads, norm_type)
    scale = (terms_clip / (terms_norm + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, term_grads):
        if p.grad is None:
            p.grad = g * scale
        else:
            p.grad.add_(g * scale)
    return float(base_norm), float(terms_norm)


class TermClipper:
    """Fills ``p.grad`` from one step's loss dict with the base loss's and the terms'
    gradients clipped apart (:func:`backward_clipped_apart`), exactly at every iteration
    that is a multiple of ``period`` (and whenever nothing was measured yet); in between,
    with one backward pass: the terms weighted by the ratio of the two clip factors of the
    last exact step, the sum clipped to the norm the exact clip gave then.

    The exact clip's second backward pass is the whole of its extra cost
    (docs/results/step_cost.md); the norms it divides by drift over hundreds of
    iterations (docs/results/sparseinst_shapes.md), so measuring them every ``period``
    steps keeps the base loss's share of a step near the exact clip's at 1 / ``period`` of
    that cost. What it measured is in :meth:`state_dict`, so a resumed run repeats the
    uninterrupted one.
    """

    def __init__(self, params: List[nn.Parameter], base_clip: float, terms_clip: float,
                 norm_type: float, period: int = 1):
        self.params, self.norm_type, self.period = params, norm_type, period
        self.base_clip, self.terms_clip = base_clip, terms_clip
        # From the last exact step: weight of the terms relative to the base, clipped norm.
        self._ratio: Optional[float] = None
        self._norm: Optional[float] = None

    def state_dict(self) -> Dict[str, Optional[float]]:
        return {"ratio": self._ratio, "norm": self._norm}

    def load_state_dict(self, state: Dict[str, Optional[float]]) -> None:
        self._ratio, self._norm = state["ratio"], state["norm"]

    def backward(self, loss_dict: Dict[str, Tensor], iteration: int) -> Dict[str, float]:
        """Fill ``p.grad``; returns the gradient norms measured, to log (none at a
        one-pass step, none when no term carries a gradient)."""
        base = sum(v for k, v in loss_dict.items() if not is_term_loss(k))
        terms = sum(v for k, v in loss_dict.items() if is_term_loss(k))
        if not (isinstance(terms, Tensor) and terms.requires_grad):
            base.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.base_clip, self.norm_type)
            return {}
        if self._ratio is not None and iteration % self.period != 0:
            (base + self._ratio * terms).backward()
            torch.nn.utils.clip_grad_norm_(self.params, self._norm, self.norm_type)
            return {}
        base_norm, terms_norm = backward_clipped_apart(
            self.params, base, terms, self.base_clip, self.terms_clip, self.norm_type)
        self._ratio = _clip_factor(self.terms_clip, terms_norm) / _clip_factor(
            self.base_clip, base_norm)
        self._norm = float(_total_norm([p.grad for p in self.params], self.norm_type))
        return {"grad_norm/base": base_norm, "grad_norm/terms": terms_norm}


def _clip_factor(clip: float, norm: float) -> float:
    # As torch.nn.utils.clip_grad_norm_ scales.
    return min(1.0, clip / (norm + 1e-6))


class TermClippingTrainer(SimpleTrainer):
    """SimpleTrainer whose step clips the base loss's gradient and the terms' apart (the
    optimizer then must not clip: :func:`instunique.solver.build_optimizer` leaves it out)."""

    def __init__(self, model, data_loader, optimizer, clipper: TermClipper):
        super().__init__(model, data_loader, optimizer)
        self.clipper = clipper

    def run_step(self):
        assert self.model.training, "[TermClippingTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        loss_dict: Dict[str, Tensor] = self.model(data)
        self.optimizer.zero_grad()
        norms = self.clipper.backward(loss_dict, self.iter)
        if norms:
            get_event_storage().put_scalars(**norms, smoothing_hint=False)
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def state_dict(self):
        return {**super().state_dict(), "term_clipper": self.clipper.state_dict()}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # Checkpoints written before TERMS_CLIP_PERIOD: the next step measures.
        if "term_clipper" in state_dict:
            self.clipper.load_state_dict(state_dict["term_clipper"])
