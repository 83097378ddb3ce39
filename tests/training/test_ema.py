import pytest
import torch

from segflow.training.ema import mean_teacher


def _net():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_mean_teacher_copies_first_then_follows_with_a_decay_rising_to_its_setting():
    torch.manual_seed(0)
    model = _net()
    ema = mean_teacher(model, decay=0.9)
    weight = model[0].weight
    expected = weight.detach().clone()
    ema.update_parameters(model)  # first update: a copy
    torch.testing.assert_close(ema.module[0].weight, expected)
    for update in range(1, 6):
        with torch.no_grad():
            weight.add_(1.0)
        ema.update_parameters(model)
        decay = min(0.9, 1 - 1 / (update + 1))  # Mean Teacher's warm-up: 0.5, 0.667, 0.75, 0.8, 0.9
        expected = decay * expected + (1 - decay) * weight.detach()
        torch.testing.assert_close(ema.module[0].weight, expected)
    assert not torch.equal(ema.module[0].weight, weight)


def test_mean_teacher_averages_batch_norm_statistics_and_copies_the_batch_count():
    torch.manual_seed(0)
    model = _net().train()
    ema = mean_teacher(model, decay=0.5)
    ema.update_parameters(model)
    before = ema.module[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8) + 4)
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module[1].running_mean, 0.5 * before + 0.5 * model[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == model[1].num_batches_tracked.item() == 1


def test_mean_teacher_is_a_separate_copy():
    model = _net()
    ema = mean_teacher(model, decay=0.99)
    assert ema.module is not model
    with torch.no_grad():
        model[0].weight.zero_()
    assert ema.module[0].weight.abs().sum() > 0
    assert pytest.approx(0.0) == model[0].weight.abs().sum().item()
