"""Box arithmetic on `[x0, y0, x1, y1]` boxes, shared by the data builder, the bench and the world's
evaluator. Free of torch, so that the command line's `--help` stays instant."""

from __future__ import annotations


def box_area(box) -> float:
    """Area of an `[x0, y0, x1, y1]` box (0 for an empty or inverted one)."""
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_iou(a, b) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes (0 when either is empty)."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0
