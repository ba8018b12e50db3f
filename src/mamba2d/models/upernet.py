"""UperNet for semantic segmentation over any timm backbone with `features_only` (strides 4/8/16/32).

UperNet (Xiao et al., ECCV 2018) as used for ADE20K by Swin, VMamba and 2DMamba: a pyramid pooling module (PPM) on the
stride-32 map, an FPN top-down path over all four stages, and a fusion of the four FPN outputs at stride 4; plus an
optional auxiliary FCN head on stage 3 (stride 16) whose loss is added with weight 0.4 during training.

Written here rather than taken from segmentation-models-pytorch: that package is not a dependency of this project,
its UPerNet has no auxiliary head, and it builds its own encoder wrapper instead of taking a timm feature model.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvBNReLU", "PyramidPooling", "UperNetHead", "FCNHead", "UperNet"]


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule as mmseg builds it for UperNet: a convolution without bias, BatchNorm2d (eps 1e-5,
    momentum 0.1, PyTorch's defaults and mmseg's) and ReLU; the convolution initialised as ConvModule does
    (Kaiming normal, fan_out, for ReLU).

    Args:
        in_chs: Input channels.
        out_chs: Output channels.
        kernel_size: Square kernel size ('same' padding).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3):
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 classifier of an mmseg decode head (conv_seg), initialised as mmseg does: normal, std 0.01, bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module as UperNet uses it: average-pool the map to each of `pool_scales` bins,
    project, upsample back, concatenate with the input and fuse with a 3x3 conv block.

    Args:
        in_chs: Channels of the input map.
        channels: Channels of each pooled branch and of the output.
        pool_scales: Output sizes of the adaptive average pools (mmseg's (1, 2, 3, 6)).
    """

    def __init__(self, in_chs: int, channels: int, pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_chs, channels, 1)) for scale in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_chs + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """PPM on the last map, FPN top-down over the others, fuse all levels at the finest stride, classify.

    Defaults are mmseg's UperNet decode head as Swin, VMamba and 2DMamba configure it for ADE20K.

    Args:
        in_channels: Channels of each backbone stage, finest first.
        num_classes: Classes of the segmentation.
        channels: Channels of every level inside the head.
        pool_scales: Bins of the pyramid pooling module.
        dropout: Dropout2d before the classifier.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.lateral = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = [lateral(f) for lateral, f in zip(self.lateral, features[:-1])] + [self.ppm(features[-1])]
        for i in range(len(levels) - 1, 0, -1):  # top-down: add each coarser level into the next finer one
            levels[i - 1] = levels[i - 1] + F.interpolate(
                levels[i], size=levels[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [smooth(level) for smooth, level in zip(self.smooth, levels[:-1])] + [levels[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, dim=1))))


class FCNHead(nn.Sequential):
    """Auxiliary head: one 3x3 conv block and a classifier on a single feature map (mmseg's FCNHead with one
    convolution, as UperNet's ADE20K configs use it).

    Args:
        in_chs: Channels of the feature map.
        num_classes: Classes of the segmentation.
        channels: Channels of the conv block.
        dropout: Dropout2d before the classifier.
    """

    def __init__(self, in_chs: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__(ConvBNReLU(in_chs, channels, 3), nn.Dropout2d(dropout), _classifier(channels, num_classes))


class UperNet(nn.Module):
    """Backbone (timm `features_only`, four stages) + UperNet head (+ auxiliary FCN head on stage `aux_index`).

    `forward(x)` returns {"out": logits} at the input resolution, plus {"aux": logits} when the auxiliary head
    exists and the module is training (the layout of torchvision's segmentation models). Defaults are the ADE20K
    setup of Swin, VMamba and 2DMamba (150 classes, head channels 512, auxiliary head of 256 channels on stage 3).

    Args:
        backbone: A timm model name that supports `features_only` with four stages.
        num_classes: Classes of the segmentation.
        pretrained: Load the backbone's pretrained weights (timm's route, zoo tags included).
        backbone_kwargs: Extra arguments to `timm.create_model` for the backbone.
        channels: Channels inside the UperNet head.
        pool_scales: Bins of the pyramid pooling module.
        dropout: Dropout2d before each classifier.
        aux_channels: Channels of the auxiliary head's conv block.
        aux_index: Backbone stage (0-3) the auxiliary head reads; None for no auxiliary head.

    Raises:
        ValueError: `num_classes` < 1, or the backbone does not give four feature maps.
    """

    def __init__(
        self,
        backbone: str = "vmamba2d_tiny",
        num_classes: int = 150,
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux_channels: int = 256,
        aux_index: int | None = 2,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"UperNet: num_classes must be >= 1, got {num_classes}")
        self.backbone = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=(0, 1, 2, 3), **(backbone_kwargs or {})
        )
        in_channels = self.backbone.feature_info.channels()
        if len(in_channels) != 4:
            raise ValueError(f"UperNet: backbone {backbone!r} must give 4 feature maps, got {len(in_channels)}")
        self.num_classes = num_classes
        self.decode_head = UperNetHead(in_channels, num_classes, channels, pool_scales, dropout)
        self.aux_index = aux_index
        self.aux_head = (
            FCNHead(in_channels[aux_index], num_classes, aux_channels, dropout) if aux_index is not None else None
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = {"out": F.interpolate(self.decode_head(features), size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None and self.training:
            aux = self.aux_head(features[self.aux_index])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out
