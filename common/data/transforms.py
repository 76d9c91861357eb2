"""Train / test image transforms of the strong ReID baseline (Luo et al., *Bag of Tricks and A
Strong Baseline for Deep Person Re-identification*, CVPRW 2019, https://arxiv.org/abs/1903.07071): flip 0.5,
pad 10 + random crop, random erasing 0.5."""

from __future__ import annotations

import torchvision.transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(height: int, width: int, train: bool, flip_prob: float = 0.5, pad: int = 10,
                     random_erasing: float = 0.5) -> T.Compose:
    """PIL image → float tensor (3, height, width), ImageNet-normalised."""
    steps: list = [T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC)]
    if train:
        steps += [T.RandomHorizontalFlip(flip_prob)]
        if pad > 0:
            steps += [T.Pad(pad), T.RandomCrop((height, width))]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and random_erasing > 0:
        steps += [T.RandomErasing(p=random_erasing, value="random")]
    return T.Compose(steps)
