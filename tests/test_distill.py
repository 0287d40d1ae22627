"""Distillation: the loss against a hand computation, and the teacher stays frozen."""

import math

import pytest
import torch
from torch import nn

from lightning_mk.experiments.distill import Distiller, Ensemble, kd_loss


def test_kd_loss_matches_a_hand_computation():
    student, teacher, target, T, alpha = [1.0, 0.0], [0.0, 1.0], 0, 2.0, 0.25

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    p_teacher = softmax([v / T for v in teacher])
    p_student = softmax([v / T for v in student])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student))
    ce = -math.log(softmax(student)[target])
    expected = alpha * T**2 * kl + (1 - alpha) * ce  # = 0.25 * 4 * 0.0624... + 0.75 * 0.3132...

    got = kd_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([target]), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a batch averages per sample ("batchmean")
    batch = kd_loss(torch.tensor([student, student]), torch.tensor([teacher, teacher]), torch.tensor([target, target]), T, alpha)
    assert batch.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_a_perfect_student_has_no_soft_loss():
    z = torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    assert torch.allclose(kd_loss(z, torch.randn(5, 4), y, 3.0, 0.0), nn.functional.cross_entropy(z, y))
    assert kd_loss(z, z.clone(), y, 3.0, 1.0).abs().item() < 1e-6


def test_teacher_is_frozen_in_eval_mode_and_not_optimised():
    teacher = Ensemble([nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)) for _ in range(2)])
    distiller = Distiller(nn.Linear(4, 3), teacher, num_classes=3)
    distiller.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimizer = distiller.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in distiller.net.parameters()}
    x = torch.randn(6, 4)
    torch.testing.assert_close(teacher(x), (teacher.members[0](x) + teacher.members[1](x)) / 2)


@pytest.mark.parametrize("temperature, alpha", [(0.0, 0.5), (2.0, 1.5)])
def test_bad_distillation_settings(temperature, alpha):
    with pytest.raises(ValueError, match="temperature > 0 and 0 <= alpha <= 1"):
        Distiller(nn.Linear(2, 2), nn.Linear(2, 2), 2, temperature, alpha)
