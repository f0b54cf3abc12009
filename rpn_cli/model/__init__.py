"""The network and everything it is made of: its description, backbones, anchors, boxes, the
proposal layer and NMS. Pure tensor functions and modules; nothing here reads or writes files.

Layers of the package, each importing only those below it (and :mod:`rpn_cli.errors`):
``model`` < ``io`` < ``inference`` < ``evaluation`` < ``training`` < ``cli``.

Shapes, as the docstrings of this package name them:

- N: images in a batch; H, W: the padded batch's height and width in pixels (the resized images,
  zero-padded at the bottom and right to a multiple of ``size_divisible``).
- L: feature levels (strides such as 8, 16, 32), finest first; Hl, Wl: level l's feature map.
- A: anchors per location (the same at every level); M_l = Hl * Wl * A anchors of level l, ordered
  row-major over (y, x) and then by anchor, as the head's channels are; M = sum of M_l.
- logits: (N, A, Hl, Wl) per level from the head (one sigmoid logit per anchor, or A * 2 channels
  for the seed's softmax pairs); deltas: (N, 4A, Hl, Wl), (dx, dy, dw, dh) per anchor.
- boxes: (K, 4) float32 x1, y1, x2, y2 (x right, y down), in the resized image's pixels inside the
  network and the proposal layer, in the original image's pixels once returned to a caller.
- K: proposals kept for an image (at most ``post_nms_top_n``, possibly 0); scores: (K,) in [0, 1].
"""
