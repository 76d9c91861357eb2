"""Cluster memory checked by hand on 2-d tensors."""

import math

import numpy as np
import pytest
import torch

from common.models.cluster_memory import ClusterMemory


def test_loss_is_cross_entropy_over_centroids_at_temperature():
    memory = ClusterMemory(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), temperature=0.5, momentum=0.1)
    assert torch.allclose(memory.features, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # normalised
    loss = memory(torch.tensor([[3.0, 0.0]]), torch.tensor([0]))
    # f = (1, 0): logits (1/0.5, 0/0.5) = (2, 0); CE = log(1 + e^-2)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_update_moves_each_sample_s_centroid_in_batch_order():
    memory = ClusterMemory(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), temperature=0.05, momentum=0.1)
    memory(torch.tensor([[0.0, 1.0], [0.6, 0.8]]), torch.tensor([0, 0]))
    first = torch.tensor([0.1, 0.9]) / torch.tensor([0.1, 0.9]).norm()
    second = 0.1 * first + 0.9 * torch.tensor([0.6, 0.8])
    assert torch.allclose(memory.features[0], second / second.norm(), atol=1e-6)
    assert torch.equal(memory.features[1], torch.tensor([0.0, 1.0]))  # untouched cluster


def test_gradient_flows_to_features_not_to_the_memory():
    memory = ClusterMemory(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    f = torch.tensor([[1.0, 1.0]], requires_grad=True)
    memory(f, torch.tensor([1])).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert not memory.features.requires_grad
    # pulled towards centroid 1: the gradient step increases the second coordinate relative to the first
    assert (f.grad[0, 1] < 0) and (f.grad[0, 0] > 0)


def test_from_features_initialises_normalised_cluster_means_ignoring_outliers():
    features = torch.tensor([[2.0, 0.0], [0.0, 2.0], [4.0, 4.0], [0.0, 1.0]])
    memory = ClusterMemory.from_features(features, np.array([0, 1, -1, 1]), temperature=0.05, momentum=0.1)
    assert torch.allclose(memory.features, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_empty_memory_is_an_error():
    with pytest.raises(ValueError, match="C >= 1"):
        ClusterMemory(torch.zeros(0, 4))
