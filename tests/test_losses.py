"""Training losses: EMA class prior (eq. 3), weighted semantic CE, instance losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conic_qp.errors import ConicQPError
from conic_qp.train.losses import (
    ConicLoss,
    EMAClassPrior,
    instance_loss,
    three_label_loss,
    total_loss,
    vector_loss,
    weighted_semantic_loss,
)

torch.set_num_threads(1)


def test_ema_prior_literal_updates_and_weights() -> None:
    ema = EMAClassPrior(3, gamma=0.5, rho=3)
    assert not bool(ema.initialised)
    ema.update(torch.tensor([[0, 0, 1, 2]]))  # first batch initialises: [1/2, 1/4, 1/4]
    torch.testing.assert_close(ema.prior, torch.tensor([0.5, 0.25, 0.25]))
    ema.update(torch.tensor([[0, 0, 0, 0]]))  # 0.5 * prior + 0.5 * [1, 0, 0]
    torch.testing.assert_close(ema.prior, torch.tensor([0.75, 0.125, 0.125]))
    torch.testing.assert_close(ema.weights(), torch.tensor([0.25**3, 0.875**3, 0.875**3]))


def test_ema_prior_from_given_prior_ignores_ignore_pixels() -> None:
    ema = EMAClassPrior(3, gamma=0.9, prior=[0.8, 0.1, 0.1])
    ema.update(torch.tensor([[0, 1, -1, -1]]))  # labelled fractions [0.5, 0.5, 0]
    torch.testing.assert_close(ema.prior, torch.tensor([0.77, 0.14, 0.09]))
    before = ema.prior.clone()
    ema.update(torch.full((2, 3), -1))  # nothing labelled: no change
    torch.testing.assert_close(ema.prior, before)
    assert "prior" in ema.state_dict()


def test_ema_prior_bad_input() -> None:
    with pytest.raises(ConicQPError):
        EMAClassPrior(3, prior=[0.5, 0.5])
    with pytest.raises(ConicQPError):
        EMAClassPrior(3, gamma=1.0)
    with pytest.raises(ConicQPError, match="outside"):
        EMAClassPrior(3).update(torch.tensor([[0, 3]]))


def _manual_weighted_ce(logits: np.ndarray, target: np.ndarray, w: np.ndarray, eps: float) -> float:
    """Weighted, label-smoothed CE as documented by PyTorch, over non-ignored pixels."""
    z = logits.reshape(logits.shape[0], -1).T  # (pixels, C)
    t = target.ravel()
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    valid = t >= 0
    logp, t = logp[valid], t[valid]
    c = z.shape[1]
    norm = w[t].sum()
    nll = -(w[t] * logp[np.arange(len(t)), t]).sum() / norm
    smooth = -(logp * w[None, :]).sum() / norm
    return (1 - eps) * nll + eps / c * smooth


def test_weighted_ce_equals_manual_computation() -> None:
    logits = np.array(
        [[[[2.0, -1.0, 0.5, 3.0]], [[0.0, 1.5, -0.5, 1.0]], [[-1.0, 0.2, 2.5, 0.0]]]]
    )  # (1, 3, 1, 4)
    target = np.array([[[0, 1, 2, -1]]])
    w = np.array([0.1, 1.0, 0.5])
    got = weighted_semantic_loss(
        torch.tensor(logits), torch.tensor(target), torch.tensor(w), label_smoothing=0.05
    )
    assert got.item() == pytest.approx(_manual_weighted_ce(logits[0], target[0], w, 0.05), rel=1e-5)
    plain = weighted_semantic_loss(torch.tensor(logits), torch.tensor(target), None, 0.0)
    assert plain.item() == pytest.approx(
        _manual_weighted_ce(logits[0], target[0], np.ones(3), 0.0), rel=1e-5
    )


def test_ignore_index_honoured() -> None:
    logits = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    target[1] = -1
    base = weighted_semantic_loss(logits, target, torch.tensor([0.2, 1.0, 0.7]))
    changed = logits.clone()
    changed[1] += 10 * torch.randn(3, 4, 4)
    assert weighted_semantic_loss(changed, target, torch.tensor([0.2, 1.0, 0.7])).item() == (
        pytest.approx(base.item())
    )
    none = torch.full((2, 4, 4), -1)
    leaf = logits.clone().requires_grad_(True)
    zero = weighted_semantic_loss(leaf, none)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(leaf.grad).all()


def test_vector_loss_counts_nucleus_pixels_only() -> None:
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.zeros(1, 2, 2, 2)
    target[0, 0, 0, 0], target[0, 1, 0, 0] = 3.0, 4.0  # squared distance 25 at (0, 0)
    target[0, 0, 1, 1] = 100.0  # outside the mask: not penalised
    mask = torch.tensor([[[True, True], [False, False]]])
    assert vector_loss(pred, target, mask).item() == pytest.approx(25 / 2)
    assert vector_loss(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_instance_loss_is_ce_plus_l2() -> None:
    g = torch.Generator().manual_seed(2)
    tl = torch.randn(2, 3, 5, 5, generator=g)
    tl_t = torch.randint(0, 3, (2, 5, 5), generator=g)
    v, v_t = torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 2, 5, 5, generator=g)
    mask = tl_t > 0
    expected = torch.nn.functional.cross_entropy(tl, tl_t) + ((v - v_t) ** 2).sum(1)[mask].mean()
    assert instance_loss(tl, tl_t, v, v_t, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert three_label_loss(tl, tl_t).item() == pytest.approx(
        torch.nn.functional.cross_entropy(tl, tl_t).item(), rel=1e-6
    )


def _batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "semantic": torch.randn(2, 4, 6, 6, generator=g, requires_grad=True),
        "three_label": torch.randn(2, 3, 6, 6, generator=g, requires_grad=True),
        "vectors": torch.randn(2, 2, 6, 6, generator=g, requires_grad=True),
    }
    three = torch.randint(0, 3, (2, 6, 6), generator=g)
    sem = torch.where(three > 0, torch.randint(1, 4, (2, 6, 6), generator=g), 0)
    targets = {
        "semantic": sem,
        "three_label": three,
        "vectors": torch.randn(2, 2, 6, 6, generator=g),
    }
    return outputs, targets


def test_total_loss_parts_and_unlabelled_samples() -> None:
    outputs, targets = _batch()
    parts = total_loss(outputs, targets)
    assert set(parts) == {"loss", "semantic", "three_label", "vector"}
    torch.testing.assert_close(
        parts["loss"], parts["semantic"] + parts["three_label"] + parts["vector"]
    )
    parts["loss"].backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in outputs.values())
    # Sample 1 without class labels: the semantic term equals the one of sample 0 alone.
    masked = total_loss(outputs, {**targets, "has_classes": torch.tensor([True, False])})
    alone = weighted_semantic_loss(outputs["semantic"][:1], targets["semantic"][:1])
    assert masked["semantic"].item() == pytest.approx(alone.item(), rel=1e-6)
    assert masked["three_label"].item() == pytest.approx(parts["three_label"].item())


def test_conic_loss_weighting_switch_and_prior_updates() -> None:
    outputs, targets = _batch(1)
    weighted = ConicLoss(4, gamma=0.9)
    w_parts = weighted(outputs, targets)
    assert bool(weighted.prior.initialised)
    expected_w = weighted.prior.weights()
    manual = weighted_semantic_loss(outputs["semantic"], targets["semantic"], expected_w)
    assert w_parts["semantic"].item() == pytest.approx(manual.item(), rel=1e-6)
    unweighted = ConicLoss(4, weighted=False)
    u_parts = unweighted(outputs, targets)
    plain = weighted_semantic_loss(outputs["semantic"], targets["semantic"], None)
    assert u_parts["semantic"].item() == pytest.approx(plain.item(), rel=1e-6)
    assert u_parts["semantic"].item() != pytest.approx(w_parts["semantic"].item())
    weighted.eval()
    frozen = weighted.prior.prior.clone()
    weighted(outputs, {**targets, "semantic": torch.zeros_like(targets["semantic"])})
    torch.testing.assert_close(weighted.prior.prior, frozen)
