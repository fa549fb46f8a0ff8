"""A dense digits MLP compressed to butterflies (hierarchical factorization + fine-tuning).

``build_dense()`` trains 64 -> 256 -> 256 -> 10 (ReLU) on scikit-learn's bundled 8x8 digits;
``build()`` replaces its two hidden ``nn.Linear`` layers (``"0"``: 64->256, ``"2"``: 256x256) by
``ButterflyLinear`` approximations and fine-tunes, printing per-layer relative errors and the test
accuracy before, right after the replacement and after fine-tuning. The hooks ``finetune_data()``
(training split) and ``eval_data()`` (test split) let the CLI do the same:

    frugalrt compress examples/digits_compress.py:build_dense --layers 0 2 --finetune 10 --lr 1e-2 \
        --out digits_bfly.onnx

``python examples/digits_compress.py`` writes ``digits_compress.onnx``. About 10 s on 2 cores.
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from frugalrt.nn.compress import compress, finetune

HIDDEN, CLASSES, SEED, EPOCHS, FINETUNE_EPOCHS, FINETUNE_LR = 256, 10, 0, 20, 10, 1e-2
LAYERS = ("0", "2")


def _splits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    parts = train_test_split(x / 16.0, y, test_size=0.25, random_state=SEED, stratify=y)
    x_tr, x_te, y_tr, y_te = (torch.tensor(a, dtype=torch.float32 if i < 2 else torch.long) for i, a in enumerate(parts))
    return (x_tr, y_tr), (x_te, y_te)


def finetune_data():
    """Labelled training split (x in [0, 1], y) for fine-tuning."""
    return _splits()[0]


def eval_data():
    """Labelled test split, for the accuracies reported by ``frugalrt compress``."""
    return _splits()[1]


@contextlib.contextmanager
def one_thread():
    """Tiny matrices: one thread is faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_dense():
    """The trained dense MLP and example inputs ``(x_test[:7],)``."""
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, CLASSES))
    with one_thread():
        finetune(model, finetune_data(), EPOCHS, lr=3e-3, seed=SEED)
    return model, (eval_data()[0][:7],)


def build():
    """The butterfly-compressed, fine-tuned MLP and example inputs ``(x_test[:7],)``."""
    dense, inputs = build_dense()
    with one_thread():
        model, report = compress(dense, LAYERS, finetune_data=finetune_data(), epochs=FINETUNE_EPOCHS,
                                 lr=FINETUNE_LR, eval_data=eval_data(),
                                 progress=lambda line: print(line, file=sys.stderr))
    print(report.table(), file=sys.stderr)
    return model, inputs


if __name__ == "__main__":
    import frugalrt

    frugalrt.export(*build(), "digits_compress.onnx")
    print("wrote digits_compress.onnx", file=sys.stderr)
