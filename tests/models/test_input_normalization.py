"""Input normalisation comes from the backbone's pretrained cfg, in one place (`mamba2d.models.input_normalization`),
and every consumer that knows its backbone uses it: the classifier, the segmenter, Mask R-CNN, the slide extractor."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from mamba2d.models import input_normalization
from mamba2d.models.detection import build_mask_rcnn
from mamba2d.tasks.classification import ImageClassifier
from mamba2d.tasks.segmentation import SemanticSegmenter
from mamba2d.wsi.extract import load_backbone

# VMamba's published models take ImageNet statistics (its data pipeline, and our pretrained cfg).
VMAMBA = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Values no model or library uses: a consumer that shows them read the cfg it was given.
ODD = ((0.11, 0.22, 0.33), (0.44, 0.55, 0.66))


def consumers(backbone: str, **backbone_kwargs) -> dict[str, tuple[tuple[float, ...], tuple[float, ...]]]:
    """The (mean, std) each consumer normalises with, for one backbone."""
    def flat(mean: torch.Tensor, std: torch.Tensor):
        return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())

    classifier = ImageClassifier(backbone=backbone, num_classes=3, backbone_kwargs=backbone_kwargs)
    segmenter = SemanticSegmenter(backbone=backbone, num_classes=3, backbone_kwargs=backbone_kwargs, aux_weight=0)
    detector = build_mask_rcnn(backbone, num_classes=2, backbone_kwargs=backbone_kwargs)
    embedder = load_backbone(backbone, device="cpu", **backbone_kwargs)
    return {
        "classifier": flat(classifier.mean, classifier.std),
        "segmenter": flat(segmenter.mean, segmenter.std),
        "detector": flat(torch.tensor(detector.transform.image_mean), torch.tensor(detector.transform.image_std)),
        "extractor": flat(torch.tensor(embedder.mean), torch.tensor(embedder.std)),
    }


def close(a, b) -> bool:
    return all(torch.allclose(torch.tensor(x), torch.tensor(y)) for x, y in zip(a, b))


def test_consumers_agree_with_the_pretrained_cfg_of_vmamba2d_tiny():
    assert input_normalization("vmamba2d_tiny") == VMAMBA
    assert input_normalization(timm.create_model("vmamba2d_tiny")) == VMAMBA
    used = consumers("vmamba2d_tiny")
    assert all(close(value, VMAMBA) for value in used.values()), used


@pytest.mark.parametrize("backbone", ["vmamba2d_nano", "resnet18"])
def test_changing_the_pretrained_cfg_changes_every_consumer(backbone):
    assert not close(input_normalization(backbone), ODD)
    overlay = {"pretrained_cfg_overlay": {"mean": ODD[0], "std": ODD[1]}}
    used = consumers(backbone, **overlay)
    assert all(close(value, ODD) for value in used.values()), used


def test_names_and_models_resolve_like_timm_create_model():
    # A bare architecture takes its default tag's cfg; a tag its own; any timm family works.
    names = ("vmamba2d_nano", "vmamba2d_nano.digits", "vmamba_nano", "resnet18", "vit_tiny_patch16_224.augreg_in21k")
    for name in names:
        assert input_normalization(name) == input_normalization(timm.create_model(name)), name
    assert input_normalization("vmamba2d_nano.digits") == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization("vit_tiny_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization("resnet18") == VMAMBA


def test_a_cfg_without_statistics_is_an_error_not_a_library_default():
    with pytest.raises(ValueError, match="pretrained cfg of Linear .* has no mean and std"):
        input_normalization(nn.Linear(2, 2))
    model = timm.create_model("vmamba2d_nano", pretrained_cfg_overlay={"std": None})
    with pytest.raises(ValueError, match="has no std"):
        input_normalization(model)
    with pytest.raises(ValueError, match="timm model 'not_a_model' has no mean and std"):
        input_normalization("not_a_model")


def test_classifier_normalises_its_batches_on_the_device_side():
    task = ImageClassifier(backbone="vmamba2d_nano", num_classes=3,
                           backbone_kwargs={"pretrained_cfg_overlay": {"mean": ODD[0], "std": ODD[1]}}).eval()
    images = torch.rand(2, 3, 32, 32)
    expected = (images - torch.tensor(ODD[0]).view(1, 3, 1, 1)) / torch.tensor(ODD[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(task(images), task.model(expected), rtol=0, atol=0)


@pytest.mark.parametrize("re_prob", [0.0, 1.0])
def test_classifier_erases_boxes_after_normalising(re_prob):
    # timm's order (its prefetcher): normalise, then erase with zeros, i.e. the mean colour, in normalised space.
    task = ImageClassifier(backbone="vmamba2d_nano", num_classes=3, re_prob=re_prob,
                           backbone_kwargs={"pretrained_cfg_overlay": {"mean": ODD[0], "std": ODD[1]}})
    task.log = task.log_dict = lambda *args, **kwargs: None
    seen = []
    task.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    images = torch.ones(4, 3, 32, 32)
    task.training_step((images, torch.zeros(4, dtype=torch.long)), 0)
    normalised = (images - torch.tensor(ODD[0]).view(1, 3, 1, 1)) / torch.tensor(ODD[1]).view(1, 3, 1, 1)
    erased = seen[0] == 0
    assert torch.equal(seen[0][~erased], normalised[~erased])
    assert all(bool(erased[i].any()) == (re_prob == 1.0) for i in range(4))
