"""dino_tiny overfits two synthetic images: the loss falls and the top detections land on the targets."""
import time

import torch

import dino_core
from dino_core.box_ops import box_cxcywh_to_xyxy, box_iou


def _two_images():
    """Two 128x128 images with solid rectangles; targets in the model's format."""
    images = torch.full((2, 3, 128, 128), -1.0)
    boxes_px = [[(20, 30, 70, 90, 1)], [(60, 10, 120, 50, 2), (10, 70, 50, 120, 1)]]  # x0, y0, x1, y1, label
    colours = {1: torch.tensor([2.0, -1.0, -1.0]), 2: torch.tensor([-1.0, 2.0, 0.5])}
    targets = []
    for i, objs in enumerate(boxes_px):
        labels, boxes = [], []
        for x0, y0, x1, y1, label in objs:
            images[i, :, y0:y1, x0:x1] = colours[label][:, None, None]
            labels.append(label)
            boxes.append([(x0 + x1) / 256, (y0 + y1) / 256, (x1 - x0) / 128, (y1 - y0) / 128])
        targets.append({"labels": torch.tensor(labels), "boxes": torch.tensor(boxes)})
    return images, targets


def test_tiny_overfits_two_images():
    torch.manual_seed(0)
    model, criterion, post = dino_core.build_model("dino_tiny", num_classes=3)
    images, targets = _two_images()
    mask = torch.zeros(2, 128, 128, dtype=torch.bool)
    opt = torch.optim.AdamW(dino_core.param_groups(model, lr=1e-3, lr_backbone=1e-3), weight_decay=1e-4)
    model.train()
    history = []
    start = time.time()
    for step in range(200):
        losses = criterion(model(images, mask, targets), targets)
        total = criterion.total_loss(losses)
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        history.append(total.item())
    elapsed = time.time() - start
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.5 * first, f"loss did not fall enough: {first:.2f} -> {last:.2f}"

    model.eval()
    with torch.no_grad():
        results = post(model(images, mask), [[128, 128], [128, 128]])
    for res, tgt in zip(results, targets):
        gt_xyxy = box_cxcywh_to_xyxy(tgt["boxes"]) * 128
        for gt_box, gt_label in zip(gt_xyxy, tgt["labels"]):
            keep = res["labels"] == gt_label
            best = res["boxes"][keep][: 3]  # the three highest-scoring detections of that class
            iou = box_iou(best, gt_box[None])[0].max().item()
            assert iou > 0.5, f"class {int(gt_label)}: best IoU {iou:.2f} (trained {elapsed:.0f}s)"
