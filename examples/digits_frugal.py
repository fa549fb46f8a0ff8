"""Digits classifier with a butterfly layer and binarized layers, exported to ONNX.

``build()`` trains (seeded, a few seconds on 2 cores) on scikit-learn's bundled 8x8 digits and
returns ``(model.eval(), (x_test[:7],))``; ``build_dense()`` trains the same architecture with
``nn.Linear`` everywhere (the dense baseline). ``python examples/digits_frugal.py`` exports
``digits_frugal.onnx``. Between the structured layers there are only simple standard ops
(BatchNormalization, Clip, Gemm), which every backend compiles.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from frugalrt.nn import BinaryLinear, ButterflyLinear

HIDDEN, CLASSES, SEED, EPOCHS, BATCH = 256, 10, 0, 20, 128


def make_model(dense: bool = False) -> nn.Sequential:
    """64 -> butterfly 256 -> BN -> binary 256x256 -> BN -> binary 256x256 -> BN -> linear 10."""
    butterfly = nn.Linear if dense else ButterflyLinear
    binary = nn.Linear if dense else BinaryLinear
    block = lambda layer: [layer, nn.BatchNorm1d(HIDDEN), nn.Hardtanh()]  # noqa: E731
    return nn.Sequential(*block(butterfly(64, HIDDEN)), *block(binary(HIDDEN, HIDDEN)),
                         *block(binary(HIDDEN, HIDDEN)), nn.Linear(HIDDEN, CLASSES))


def load_data():
    """Digits scaled to [0, 1], split 75/25 with a fixed seed (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.25, random_state=SEED, stratify=y)
    as_x, as_y = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.long))
    return as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = EPOCHS) -> nn.Module:
    """Adam with a cosine schedule, mini-batches of BATCH rows in a seeded order."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(BATCH):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def _build(dense: bool):
    torch.manual_seed(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention on a busy machine
    try:
        model = train(make_model(dense), x_tr, y_tr)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    print(f"digits ({'dense' if dense else 'frugal'}): test accuracy {accuracy:.2%} on {len(y_te)} images",
          file=sys.stderr)
    return model, (x_te[:7],)


def build():
    """The frugal model (butterfly + binary layers) and its example inputs ``(x_test[:7],)``."""
    return _build(dense=False)


def build_dense():
    """Same architecture with ``nn.Linear`` in place of every structured layer, trained the same way."""
    return _build(dense=True)


if __name__ == "__main__":
    import frugalrt

    frugalrt.export(*build(), "digits_frugal.onnx")
    print("wrote digits_frugal.onnx", file=sys.stderr)
