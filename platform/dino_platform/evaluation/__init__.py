"""Distributed inference over evaluation shards and COCO AP (pycocotools)."""
