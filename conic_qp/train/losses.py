"""Training losses (paper II.B-C): class-weighted semantic CE, 3-label CE and centre-vector L2.

Pixel-level class imbalance is handled by weighting the semantic cross-entropy with
``w_c = (1 - X_c) ** rho`` where ``X_c`` is an exponential moving average of the class pixel
fractions seen in training batches (eq. 3), so frequent classes (background above all) weigh
little and rare ones close to 1.

Target conventions (see ``conic_qp.targets``): semantic target (B, H, W) long with 0 background,
1..C nucleus classes and -1 ignore; 3-label target (B, H, W) long with 0 background, 1 interior,
2 boundary (-1 ignore); vector target (B, 2, H, W) float, 0 outside nuclei.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conic_qp.errors import ConicQPError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -1

#: EMA decay of the class prior. The paper does not state it; 0.99 averages over roughly the
#: last 100 steps (400 tiles at batch size 4), smooth enough to be stable, quick to follow.
DEFAULT_GAMMA = 0.99
#: Exponent of the class weights (paper: rho = 3, after Jaeger et al.).
DEFAULT_RHO = 3.0
#: Label smoothing of the semantic cross-entropy (paper: 0.05).
DEFAULT_LABEL_SMOOTHING = 0.05


def batch_class_fractions(
    target: Tensor, n_classes_plus_bg: int, ignore_index: int = IGNORE_INDEX
) -> Tensor | None:
    """Fraction of the labelled pixels of a batch in each class (eq. 1 pooled over the batch).

    Returns None when no pixel is labelled (the prior must then not move).
    """
    valid = target != ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return None
    values = target[valid].long()
    if int(values.min()) < 0 or int(values.max()) >= n_classes_plus_bg:
        raise ConicQPError(
            f"semantic target values {int(values.min())}..{int(values.max())} are outside "
            f"0..{n_classes_plus_bg - 1}; check the class scheme of the data and the model"
        )
    counts = torch.bincount(values.flatten(), minlength=n_classes_plus_bg)
    return counts.float() / n_valid


class EMAClassPrior(nn.Module):
    """Exponential moving average of class pixel fractions (eq. 3) and the weights it implies.

    ``X_c <- gamma * X_c + (1 - gamma) * X_c,batch`` at every :meth:`update`; the prior starts at
    ``prior`` if given, else at the first labelled batch's fractions. It is a buffer, so it is
    saved in ``state_dict`` and a resumed run continues with the same weights.
    """

    prior: Tensor
    initialised: Tensor

    def __init__(
        self,
        n_classes_plus_bg: int,
        gamma: float = DEFAULT_GAMMA,
        rho: float = DEFAULT_RHO,
        prior: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_classes_plus_bg < 2:
            raise ConicQPError(f"need background plus >= 1 class, got {n_classes_plus_bg}")
        if not 0.0 <= gamma < 1.0:
            raise ConicQPError(f"EMA gamma must be in [0, 1), got {gamma}")
        self.n = n_classes_plus_bg
        self.gamma = gamma
        self.rho = rho
        init = torch.zeros(n_classes_plus_bg)
        if prior is not None:
            init = torch.as_tensor(prior, dtype=torch.float32).clone()
            if init.shape != (n_classes_plus_bg,):
                raise ConicQPError(
                    f"class prior has shape {tuple(init.shape)}, expected ({n_classes_plus_bg},)"
                )
        self.register_buffer("prior", init.float())
        self.register_buffer("initialised", torch.tensor(prior is not None))

    @torch.no_grad()
    def update(self, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """Fold one batch's semantic target into the prior; return the prior."""
        x = batch_class_fractions(target, self.n, ignore_index)
        if x is None:
            return self.prior
        x = x.to(self.prior.device)
        if bool(self.initialised):
            self.prior.mul_(self.gamma).add_(x, alpha=1.0 - self.gamma)
        else:
            self.prior.copy_(x)
            self.initialised.fill_(True)
        return self.prior

    def weights(self) -> Tensor:
        """Class weights ``(1 - X_c) ** rho`` (all ones before the first update)."""
        return (1.0 - self.prior).clamp_min(0.0) ** self.rho


def _zero(t: Tensor) -> Tensor:
    """A zero that keeps the graph (so ``backward`` works when a term is skipped)."""
    return t.sum() * 0.0


def weighted_semantic_loss(
    logits: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Class-weighted, label-smoothed cross-entropy over labelled pixels.

    Exactly :func:`torch.nn.functional.cross_entropy` with mean reduction (normalised by the
    summed weights of the labelled pixels); ``weights=None`` is the unweighted ablation. A batch
    without labelled pixels gives 0 instead of NaN.
    """
    target = target.long()
    if not bool((target != ignore_index).any()):
        return _zero(logits)
    w = None if weights is None else weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(
        logits.float(),
        target,
        weight=w,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


def three_label_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Plain cross-entropy of the background / interior / boundary map."""
    target = target.long()
    if not bool((target != ignore_index).any()):
        return _zero(logits)
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def vector_loss(pred: Tensor, target: Tensor, nucleus_mask: Tensor) -> Tensor:
    """Mean squared Euclidean error of centre vectors over nucleus pixels only.

    Background vectors are undefined and not penalised; a batch without nuclei gives 0.
    """
    if pred.shape != target.shape or pred.shape[1] != 2:
        raise ConicQPError(
            f"vector shapes differ or are not (B, 2, H, W): {pred.shape}, {target.shape}"
        )
    mask = nucleus_mask.bool()
    if not bool(mask.any()):
        return _zero(pred)
    se = ((pred.float() - target.float()) ** 2).sum(dim=1)
    return se[mask].mean()


def instance_loss(
    three_label_logits: Tensor,
    three_label_target: Tensor,
    vector_pred: Tensor,
    vector_target: Tensor,
    nucleus_mask: Tensor,
) -> Tensor:
    """Instance branch loss: 3-label cross-entropy + centre-vector L2 (paper II.C)."""
    return three_label_loss(three_label_logits, three_label_target) + vector_loss(
        vector_pred, vector_target, nucleus_mask
    )


def total_loss(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    semantic_weights: Tensor | None = None,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> dict[str, Tensor]:
    """Sum of the three losses, with the parts for logging.

    Parameters
    ----------
    outputs : network output with ``semantic`` (B, C+1, H, W), ``three_label`` (B, 3, H, W) and
        ``vectors`` (B, 2, H, W).
    targets : ``semantic``, ``three_label``, ``vectors``; optional ``nucleus_mask`` (B, H, W)
        (default: 3-label target interior or boundary) and ``has_classes`` (B,) bool: samples
        without class labels get an all-ignore semantic target, so they add nothing to the
        semantic term but still train the instance branch.

    Returns
    -------
    dict with ``loss`` (to backpropagate), ``semantic``, ``three_label`` and ``vector``.
    """
    sem_target = targets["semantic"].long()
    if "has_classes" in targets:
        keep = targets["has_classes"].bool().to(sem_target.device).view(-1, 1, 1)
        sem_target = torch.where(keep, sem_target, torch.full_like(sem_target, IGNORE_INDEX))
    tl_target = targets["three_label"].long()
    mask = targets.get("nucleus_mask")
    if mask is None:
        mask = tl_target > 0
    parts = {
        "semantic": weighted_semantic_loss(
            outputs["semantic"], sem_target, semantic_weights, label_smoothing
        ),
        "three_label": three_label_loss(outputs["three_label"], tl_target),
        "vector": vector_loss(outputs["vectors"], targets["vectors"], mask),
    }
    parts["loss"] = parts["semantic"] + parts["three_label"] + parts["vector"]
    return parts


class ConicLoss(nn.Module):
    """The paper's training loss with its EMA class prior; ``weighted=False`` is the ablation.

    In training mode every call first folds the batch's semantic target into the prior (eq. 3),
    then weights the cross-entropy with ``(1 - prior) ** rho``; in eval mode the prior is frozen.
    """

    def __init__(
        self,
        n_classes_plus_bg: int,
        weighted: bool = True,
        gamma: float = DEFAULT_GAMMA,
        rho: float = DEFAULT_RHO,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
        prior: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weighted = weighted
        self.label_smoothing = label_smoothing
        self.prior = EMAClassPrior(n_classes_plus_bg, gamma, rho, prior)

    def forward(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        weights = None
        if self.weighted:
            if self.training:
                sem = targets["semantic"]
                if "has_classes" in targets:
                    keep = targets["has_classes"].bool().to(sem.device).view(-1, 1, 1)
                    sem = torch.where(keep, sem, torch.full_like(sem, IGNORE_INDEX))
                self.prior.update(sem)
            if bool(self.prior.initialised):
                weights = self.prior.weights()
        return total_loss(outputs, targets, weights, self.label_smoothing)
