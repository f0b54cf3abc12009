"""Scoring proposals against ground truth: average recall as COCO computes it."""
