"""COCO instances (detection + instance segmentation): dataset and DataModule over torchvision's CocoDetection.

Layout (COCO 2017): `<root>/annotations/instances_{train,val}2017.json` and `<root>/{train,val}2017/*.jpg`; any
annotation file + image folder pair in the COCO format works. Targets are built by torchvision's
`wrap_dataset_for_transforms_v2` (boxes XYXY, per-instance masks from polygons or RLE) and then:

- category ids are mapped to contiguous labels 1..K in ascending id order (0 is the detector's background);
  `category_ids[k - 1]` is the COCO id of label k;
- crowd regions (`iscrowd=1`) are dropped from training targets (Mask R-CNN is not trained on them) and kept with
  `iscrowd` in evaluation targets, where COCO evaluation ignores detections matched to them;
- images without annotations are dropped from training (they have no positive sample; the count is reported) and
  kept for evaluation and prediction (false positives on them count);
- boxes under 1 pixel wide or high after the transforms are dropped from training targets (Mask R-CNN rejects them).

Annotations that name unknown image or category ids are errors, reported with the file and the ids.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .base import BaseDataModule, class_palette, panels_figure, to_uint8_image

__all__ = ["COCOInstances", "COCODataModule", "check_coco_annotations", "load_coco_json"]

TARGET_KEYS = ("image_id", "boxes", "labels", "masks", "iscrowd")


def load_coco_json(annotation_file: str | Path) -> dict:
    """A COCO annotation file's content; an error names a missing or malformed file.

    Args:
        annotation_file: The JSON file.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def check_coco_annotations(data: dict, annotation_file: str | Path) -> None:
    """Check that a parsed COCO instances file is complete and that its annotations name known images/categories.

    Args:
        data: The loaded JSON.
        annotation_file: Its path (named in errors).
    """
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"{annotation_file}: missing the '{key}' list of a COCO instances file")
    if not data["categories"]:
        raise ValueError(f"{annotation_file}: the 'categories' list is empty")
    annotations = data.get("annotations", [])
    unknown_images = sorted({a["image_id"] for a in annotations} - {image["id"] for image in data["images"]})
    if unknown_images:
        raise ValueError(
            f"{annotation_file}: {len(unknown_images)} annotated image id(s) are not in 'images': {unknown_images[:10]}"
        )
    known_categories = {category["id"] for category in data["categories"]}
    unknown_categories = sorted({a["category_id"] for a in annotations} - known_categories)
    if unknown_categories:
        raise ValueError(
            f"{annotation_file}: annotations use category id(s) not in 'categories': {unknown_categories[:10]}"
        )


class COCOInstances(Dataset):
    """One COCO split as (image float [0, 1] (3, H, W), target dict) pairs for torchvision's detection models.

    Target: "boxes" (N, 4) XYXY float, "labels" (N,) int64 in 1..K, "masks" (N, H, W) uint8, "iscrowd" (N,) int64,
    "image_id" int. `train=True` drops crowd regions, degenerate boxes and (`drop_empty`) images without objects.

    Args:
        images: The image folder.
        annotation_file: The instances JSON.
        train: Training targets (crowd regions dropped) instead of evaluation targets.
        transform: Joint (image, target) transform, or None.
        drop_empty: Leave training images without annotations out.
    """

    def __init__(self, images: str | Path, annotation_file: str | Path, train: bool = False, transform=None,
                 drop_empty: bool = True):
        if not Path(annotation_file).is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        if not Path(images).is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {images}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = CocoDetection(str(images), str(annotation_file))
        data = coco.coco.dataset  # parsed once, by pycocotools (COCO train is ~450 MB of JSON)
        check_coco_annotations(data, annotation_file)
        self.coco = wrap_dataset_for_transforms_v2(coco, target_keys=TARGET_KEYS)
        self.category_ids = sorted(c["id"] for c in data["categories"])
        self.category_names = {c["id"]: c["name"] for c in data["categories"]}
        # COCO id -> contiguous label (1..K); ids are arbitrary integers, so a lookup table sized by the largest id.
        self.label_of = torch.zeros(max(self.category_ids) + 1, dtype=torch.int64)
        self.label_of[self.category_ids] = torch.arange(1, len(self.category_ids) + 1)
        self.train, self.transform = train, transform
        self.indices = list(range(len(coco.ids)))
        if train:
            if not data.get("annotations"):
                raise ValueError(f"{annotation_file}: no annotations: nothing to train on")
            with_objects = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)}
            if drop_empty:
                self.indices = [i for i, image_id in enumerate(coco.ids) if image_id in with_objects]
                dropped = len(coco.ids) - len(self.indices)
                if dropped:
                    rank_zero_info(f"{annotation_file}: {dropped} of {len(coco.ids)} training images have no "
                                   "(non-crowd) annotation and are left out of training")
            if not self.indices:
                raise ValueError(f"{annotation_file}: no image has a non-crowd annotation: nothing to train on")

    @property
    def num_classes(self) -> int:
        """Object categories (labels 1..num_classes; 0 is the background)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, target = self.coco[self.indices[index]]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(image)) if not isinstance(image, torch.Tensor) else image
        height, width = image.shape[-2:]
        if "boxes" not in target:  # the torchvision wrapper returns only the image id for an image without objects
            target["boxes"] = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
            target["labels"] = torch.zeros(0, dtype=torch.int64)
            target["masks"] = tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8))
            target["iscrowd"] = torch.zeros(0, dtype=torch.int64)
        target["labels"] = self.label_of[torch.as_tensor(target["labels"], dtype=torch.int64)]
        target["iscrowd"] = torch.as_tensor(target["iscrowd"], dtype=torch.int64)
        if self.train:
            keep = target["iscrowd"] == 0
            target = {
                "image_id": target["image_id"],
                "boxes": tv_tensors.wrap(target["boxes"][keep], like=target["boxes"]),
                "labels": target["labels"][keep],
                "masks": tv_tensors.Mask(target["masks"][keep]),
                "iscrowd": target["iscrowd"][keep],
            }
        if self.transform is not None:
            image, target = self.transform(image, target)
        return v2.functional.to_dtype(image, torch.float32, scale=True), target


def _labels_and_crowd(sample: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return sample[1]["labels"], sample[1]["iscrowd"]


def train_transform(flip_prob: float) -> v2.Compose:
    """Training transform: random horizontal flip, then boxes under a pixel dropped.

    Args:
        flip_prob: Horizontal flip probability.
    """
    return v2.Compose([v2.RandomHorizontalFlip(flip_prob), v2.SanitizeBoundingBoxes(labels_getter=_labels_and_crowd)])


def collate_detection(batch: list) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection images differ in size and object count: lists, as torchvision's detection models take them.

    Args:
        batch: (image, target) items.
    """
    images, targets = zip(*batch)
    return list(images), list(targets)


class COCODataModule(BaseDataModule):
    """COCO instances from `root` with paths relative to it. Images are resized inside the model (Mask R-CNN's
    transform: shorter side `min_size`), so the data pipeline only flips (training) and converts.

    `predict_annotations` may be an image-info file without annotations (as COCO test-dev ships); by default `predict`
    runs on the validation split; test runs on the validation split too.

    Args:
        root: The COCO folder; the paths below are relative to it.
        train_images: Training image folder.
        train_annotations: Training instances JSON.
        val_images: Validation image folder.
        val_annotations: Validation instances JSON.
        predict_images: Image folder that `predict` runs on (None: the validation images).
        predict_annotations: Its JSON (image info suffices; None: the validation annotations).
        flip_prob: Horizontal flip probability of training.
        drop_empty_train_images: Leave training images without annotations out.
        batch_size: Training images per batch.
        eval_batch_size: Validation, test and predict images per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_images: str = "train2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_images: str = "val2017",
        val_annotations: str = "annotations/instances_val2017.json",
        predict_images: str | None = None,
        predict_annotations: str | None = None,
        flip_prob: float = 0.5,
        drop_empty_train_images: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 2,
        num_workers: int = 4,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        # Read the categories now: the model's num_classes is checked against them and predictions need them.
        source = self.root / (val_annotations if predict_annotations is None else predict_annotations)
        data = load_coco_json(source)
        check_coco_annotations(data, source)
        self.category_ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.class_names = [names[i] for i in self.category_ids]  # label k is class_names[k - 1]

    @property
    def num_classes(self) -> int:
        """Object categories (labels 1..num_classes; 0 is the background)."""
        return len(self.category_ids)

    def _split(self, images: str, annotations: str, train: bool) -> COCOInstances:
        transform = train_transform(self.hparams.flip_prob) if train else None
        dataset = COCOInstances(self.root / images, self.root / annotations, train, transform,
                                self.hparams.drop_empty_train_images)
        if dataset.category_ids != self.category_ids:
            raise ValueError(
                f"{self.root / annotations}: categories {dataset.category_ids} differ from those of the other split "
                f"{self.category_ids}"
            )
        return dataset

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "fit":
            self.train_set = self._split(hp.train_images, hp.train_annotations, train=True)
        if stage in ("fit", "validate", "test"):
            self.val_set = self._split(hp.val_images, hp.val_annotations, train=False)
        if stage == "predict":
            self.predict_set = self._split(hp.predict_images or hp.val_images,
                                           hp.predict_annotations or hp.val_annotations, train=False)

    def dataset(self, split: str) -> Dataset:
        """The split's dataset; test uses the validation split.

        Args:
            split: One of train, val, test, predict.
        """
        return super().dataset("val" if split == "test" else split)

    def collate_fn(self, split: str):
        """Lists of images and targets, as torchvision's detection models take them.

        Args:
            split: One of train, val, test, predict.
        """
        return collate_detection

    def draw_instances(self, image: torch.Tensor, instances: dict, score_threshold: float = 0.5) -> torch.Tensor:
        """An image with instance masks and labelled boxes drawn over it (torchvision's drawing utilities).

        Args:
            image: (3, H, W) float image.
            instances: "boxes" (N, 4) XYXY, "labels" (N,) in 1..K, optional "masks" (N, H, W), optional "scores".
            score_threshold: Instances scored below this are not drawn.

        Returns:
            (3, H, W) uint8.
        """
        keep = torch.ones(len(instances["labels"]), dtype=torch.bool)
        if "scores" in instances:
            keep = instances["scores"].detach().cpu() >= score_threshold
        labels = instances["labels"].detach().cpu()[keep]
        palette = class_palette(len(self.class_names) + 1)
        colours = [tuple(int(c) for c in palette[int(k)]) for k in labels]
        canvas = to_uint8_image(image)
        if "masks" in instances and len(labels):
            canvas = draw_segmentation_masks(canvas, instances["masks"].detach().cpu()[keep].bool(), alpha=0.4,
                                             colors=colours)
        names = [self.class_names[int(k) - 1] for k in labels]
        if "scores" in instances:
            names = [f"{n} {s:.2f}" for n, s in zip(names, instances["scores"].detach().cpu()[keep].tolist())]
        boxes = instances["boxes"].detach().cpu().as_subclass(torch.Tensor)[keep]
        return draw_bounding_boxes(canvas, boxes, labels=names, colors=colours, width=2) if len(labels) else canvas

    def plot(self, sample, prediction=None, max_images: int = 4) -> Figure:
        """One row per image: its annotated instances and (if given) the detections scored 0.5 or more.

        Args:
            sample: A batch (list of images, list of target dicts).
            prediction: `InstanceDetector` detections (one dict per image) or its predict output (a dict with
                "detections"), or None.
            max_images: At most this many images are drawn.
        """
        if isinstance(prediction, dict):
            prediction = prediction["detections"]
        images, targets = sample
        rows = []
        for index, (image, target) in enumerate(list(zip(images, targets))[:max_images]):
            row = [(f"image {int(target['image_id'])}: annotation", self.draw_instances(image, target))]
            if prediction is not None:
                row.append(("detections", self.draw_instances(image, prediction[index])))
            rows.append([(title, picture.permute(1, 2, 0).numpy()) for title, picture in row])
        return panels_figure(rows)
