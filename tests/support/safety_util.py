"""A tiny image classifier built offline (transformers' ViT, random weights but a fixed head), standing in for
an NSFW ViT: it scores every image the same, ``p`` for its unsafe label, so thresholds are testable."""

from __future__ import annotations

import math
from pathlib import Path


def build_classifier(path: Path, p_unsafe: float, labels: tuple[str, str] = ("normal", "nsfw")) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():  # softmax([0, b]) gives the unsafe label p whatever the image
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, math.log(p_unsafe / (1 - p_unsafe))]))
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
