"""The seed document's functions, re-implemented here as the tests' oracle.

Written from ../shared/seed/region-proposal-network.md as the seed writes them,
with only the ``.cuda()`` call removed (the tests run on the CPU). The library
must agree with these apart from its documented fixes.
"""

import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.ops import nms

SEED_PRINTED_ANCHOR_BASE = np.array([
    [-45.254833, -90.50967, 45.254833, 90.50967],
    [-90.50967, -181.01933, 90.50967, 181.01933],
    [-181.01933, -362.03867, 181.01933, 362.03867],
    [-64.0, -64.0, 64.0, 64.0],
    [-128.0, -128.0, 128.0, 128.0],
    [-256.0, -256.0, 256.0, 256.0],
    [-90.50967, -45.254833, 90.50967, 45.254833],
    [-181.01933, -90.50967, 181.01933, 90.50967],
    [-362.03867, -181.01933, 362.03867, 181.01933],
], dtype=np.float32)


def generate_anchor_base(base_size=16, ratios=(0.5, 1, 2), anchor_scales=(8, 16, 32)):
    anchor_base = np.zeros((len(ratios) * len(anchor_scales), 4), dtype=np.float32)
    for i in range(len(ratios)):
        for j in range(len(anchor_scales)):
            h = base_size * anchor_scales[j] * np.sqrt(ratios[i])
            w = base_size * anchor_scales[j] * np.sqrt(1.0 / ratios[i])
            index = i * len(anchor_scales) + j
            anchor_base[index, 0] = -h / 2.0
            anchor_base[index, 1] = -w / 2.0
            anchor_base[index, 2] = h / 2.0
            anchor_base[index, 3] = w / 2.0
    return anchor_base


def enumerate_shifted_anchor(anchor_base, feat_stride, height, width):
    shift_x = np.arange(0, width * feat_stride, feat_stride)
    shift_y = np.arange(0, height * feat_stride, feat_stride)
    shift_x, shift_y = np.meshgrid(shift_x, shift_y)
    shift = np.stack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel()), axis=1)
    a = anchor_base.shape[0]
    k = shift.shape[0]
    anchor = anchor_base.reshape((1, a, 4)) + shift.reshape((k, 1, 4))
    return anchor.reshape((k * a, 4)).astype(np.float32)


def loc2bbox(src_bbox, loc):
    if src_bbox.size()[0] == 0:
        return torch.zeros((0, 4), dtype=loc.dtype)
    src_width = torch.unsqueeze(src_bbox[:, 2] - src_bbox[:, 0], -1)
    src_height = torch.unsqueeze(src_bbox[:, 3] - src_bbox[:, 1], -1)
    src_ctr_x = torch.unsqueeze(src_bbox[:, 0], -1) + 0.5 * src_width
    src_ctr_y = torch.unsqueeze(src_bbox[:, 1], -1) + 0.5 * src_height
    dx = loc[:, 0::4]
    dy = loc[:, 1::4]
    dw = loc[:, 2::4]
    dh = loc[:, 3::4]
    ctr_x = dx * src_width + src_ctr_x
    ctr_y = dy * src_height + src_ctr_y
    w = torch.exp(dw) * src_width
    h = torch.exp(dh) * src_height
    dst_bbox = torch.zeros_like(loc)
    dst_bbox[:, 0::4] = ctr_x - 0.5 * w
    dst_bbox[:, 1::4] = ctr_y - 0.5 * h
    dst_bbox[:, 2::4] = ctr_x + 0.5 * w
    dst_bbox[:, 3::4] = ctr_y + 0.5 * h
    return dst_bbox


def seed_proposal_layer(loc, score, anchor, img_size, n_pre_nms=3000, n_post_nms=300, nms_iou=0.7,
                        min_size=16, scale=1.0):
    """ProposalCreator.__call__ in test mode; returns (rois, their scores)."""
    anchor = torch.from_numpy(anchor)
    roi = loc2bbox(anchor, loc)
    roi[:, [0, 2]] = torch.clamp(roi[:, [0, 2]], min=0, max=img_size[1])
    roi[:, [1, 3]] = torch.clamp(roi[:, [1, 3]], min=0, max=img_size[0])
    min_size = min_size * scale
    keep = torch.where(((roi[:, 2] - roi[:, 0]) >= min_size) & ((roi[:, 3] - roi[:, 1]) >= min_size))[0]
    roi = roi[keep, :]
    score = score[keep]
    order = torch.argsort(score, descending=True)
    if n_pre_nms > 0:
        order = order[:n_pre_nms]
    roi = roi[order, :]
    score = score[order]
    keep = nms(roi, score, nms_iou)
    keep = keep[:n_post_nms]
    return roi[keep], score[keep]


def seed_scores_and_locs(score_map, loc_map):
    """The seed's forward after the head: (n, 2A, H, W), (n, 4A, H, W) -> fg scores (n, HWA), locs (n, HWA, 4)."""
    n = score_map.shape[0]
    rpn_locs = loc_map.permute(0, 2, 3, 1).contiguous().view(n, -1, 4)
    rpn_scores = score_map.permute(0, 2, 3, 1).contiguous().view(n, -1, 2)
    fg = torch.softmax(rpn_scores, dim=-1)[:, :, 1].contiguous().view(n, -1)
    return fg, rpn_locs


def seed_extractor() -> nn.Sequential:
    """The seed project's ResNet-50 C4, built from its description in the notes (random weights)."""
    resnet = models.resnet50(weights=None)
    for layer in (resnet.layer2, resnet.layer3):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    resnet.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2, resnet.layer3)


class SeedHead(nn.Module):
    """The seed's RPN head: conv1, score (2A), loc (4A), N(0, 0.01) init."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1024, 512, 3, 1, 1)
        self.score = nn.Conv2d(512, 18, 1, 1, 0)
        self.loc = nn.Conv2d(512, 36, 1, 1, 0)
        for layer in (self.conv1, self.score, self.loc):
            nn.init.normal_(layer.weight, 0, 0.01)
            nn.init.zeros_(layer.bias)


def seed_rpn_proposals(image, extractor, rpn):
    """The seed project's test-time path for one PIL image: shorter side to 600 (bicubic), RGB / 255,
    extractor, head, softmax, anchors, proposal layer. Returns (rois, scores, (resized_w, resized_h))
    with rois in the resized image's pixels."""
    from PIL import Image

    short, long = min(image.size), max(image.size)
    size = (int(600 * long / short), 600) if image.width >= image.height else (600, int(600 * long / short))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, np.float32) / 255.0).permute(2, 0, 1)[None]
    x = x.to(next(extractor.parameters()).dtype)
    with torch.no_grad():
        features = extractor(x)
        hidden = torch.relu(rpn.conv1(features))
        fg, locs = seed_scores_and_locs(rpn.score(hidden), rpn.loc(hidden))
        anchors = enumerate_shifted_anchor(generate_anchor_base(), 16, features.shape[2], features.shape[3])
        rois, scores = seed_proposal_layer(locs[0], fg[0], anchors, (size[1], size[0]))
    return rois, scores, size
