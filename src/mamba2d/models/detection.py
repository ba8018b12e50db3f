"""Mask R-CNN over any timm backbone with `features_only`: torchvision's MaskRCNN and FeaturePyramidNetwork.

`TimmFPNBackbone` turns the four stage maps (strides 4/8/16/32) into the five FPN levels torchvision's detection
heads expect: keys "0".."3" at strides 4..32 and "pool" (stride 64, max-pooled from the last level), each with
`out_channels` channels. `build_mask_rcnn` puts it under torchvision's `MaskRCNN`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .normalization import input_normalization

__all__ = ["TimmFPNBackbone", "build_mask_rcnn"]

class TimmFPNBackbone(nn.Module):
    """A timm feature model (four stages) followed by an FPN with an extra max-pooled level: five maps.

    Args:
        backbone: A timm model name that supports `features_only` with four stages.
        pretrained: Load the backbone's pretrained weights (timm's route, zoo tags included).
        backbone_kwargs: Extra arguments to `timm.create_model` for the backbone.
        out_channels: Channels of every FPN level (256, as Mask R-CNN's FPN).

    Raises:
        ValueError: The backbone does not give four feature maps.
    """

    def __init__(
        self,
        backbone: str = "vmamba2d_tiny",
        pretrained: bool = False,
        backbone_kwargs: dict | None = None,
        out_channels: int = 256,
    ):
        super().__init__()
        self.body = timm.create_model(
            backbone, pretrained=pretrained, features_only=True, out_indices=(0, 1, 2, 3), **(backbone_kwargs or {})
        )
        in_channels = self.body.feature_info.channels()
        if len(in_channels) != 4:
            raise ValueError(f"TimmFPNBackbone: backbone {backbone!r} must give 4 feature maps, got {len(in_channels)}")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        for conv in self.fpn.modules():  # mmdetection's FPN init (xavier uniform), which VMamba's detector uses
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.out_channels = out_channels  # read by torchvision's detection heads

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def build_mask_rcnn(
    backbone: str = "vmamba2d_tiny",
    num_classes: int = 80,
    pretrained: bool = False,
    backbone_kwargs: dict | None = None,
    fpn_channels: int = 256,
    min_size: int = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    **maskrcnn_kwargs,
) -> MaskRCNN:
    """torchvision MaskRCNN on `TimmFPNBackbone`. `num_classes` counts object classes; background is added here.

    Images ([0, 1]) are resized inside the model so that the shorter side is `min_size` (longer side at most
    `max_size`) and normalised with the backbone's pretrained cfg (`input_normalization`); outputs are mapped back to
    the input image size. Defaults are the COCO setup of Mask R-CNN as VMamba's detector configures it
    (mmdetection's): 80 classes, 800 x 1333 resizing, anchors 32-512 with ratios 0.5, 1, 2.

    Args:
        backbone: A timm model name that supports `features_only` with four stages.
        num_classes: Object classes, background not counted.
        pretrained: Load the backbone's pretrained weights.
        backbone_kwargs: Extra arguments to `timm.create_model` for the backbone.
        fpn_channels: Channels of every FPN level.
        min_size: Shorter image side after resizing.
        max_size: Longest image side allowed after resizing.
        anchor_sizes: Anchor size of each of the five FPN levels.
        aspect_ratios: Anchor aspect ratios, the same at every level.
        **maskrcnn_kwargs: Passed to torchvision's `MaskRCNN` (e.g. box_detections_per_img).

    Raises:
        ValueError: `anchor_sizes` does not give one size per FPN level.
    """
    if len(anchor_sizes) != 5:
        raise ValueError(f"build_mask_rcnn: anchor_sizes needs one size per FPN level (5), got {list(anchor_sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    body = TimmFPNBackbone(backbone, pretrained, backbone_kwargs, fpn_channels)
    mean, std = input_normalization(body.body)
    return MaskRCNN(
        body,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(mean),
        image_std=list(std),
        rpn_anchor_generator=anchors,
        **maskrcnn_kwargs,
    )
