"""Worked examples and benchmark tasks built on jmerge (not part of the public merge API).

* :mod:`jmerge.examples.digits` — scikit-learn's bundled 8×8 digits as a merging benchmark:
  a shared backbone pretrained on one view and fine-tuned on fixed input transforms, per-task
  heads kept unmerged, normalized accuracy as the metric (DESIGN.md §4, "digits").
"""
