"""PAC-Bayes binary-activated digits classifier with risk certificates, exported to ONNX.

Splits scikit-learn's bundled 8x8 digits (scaled to [0, 1]) into test (20%), prior (40%) and bound
(40%) sets, all stratified with a fixed seed. The prior is learned on the prior set; the posterior
minimizes the PAC-Bayes bound on the bound set (``frugalrt.nn.pacbayes``). Printed:

* the stochastic predictor's certificate (PAC-Bayes-kl on the bound set, Monte Carlo error included)
  and its test error (Monte Carlo);
* the held-out bound (binomial tail inversion on the test set) of the deterministic network that is
  exported: Linear(64, 128) -> BinaryLinear(128, 10) (``ai.frugalrt::BinaryGemm``).

``build()`` returns ``(deterministic_model, (x_test[:7],))`` for ``frugalrt export
examples/digits_pacbayes.py:build``; the model carries both certificates as JSON in
``model.frugalrt_metadata`` (keys ``frugalrt.certificate.*``). ``python examples/digits_pacbayes.py``
writes ``digits_pacbayes.onnx`` with the certificates in its metadata. About 10 s on 2 cores.
"""
from __future__ import annotations

import sys

import torch

from frugalrt.nn.pacbayes import (BinaryActivatedNet, certify, deterministic_certificate, fit,
                                  stochastic_error_rates)

HIDDEN, CLASSES, SEED = (128,), 10, 0
PRIOR_EPOCHS, POSTERIOR_EPOCHS = 200, 100
DELTA, DELTA_MC, DELTA_TEST, DRAWS = 0.025, 0.01, 0.05, 20
# Hyper-parameter settings (architecture, split, learning rates) compared on these bounds and test
# errors while the example was written: both certificates pay for all of them (delta / UNION).
UNION = 8


def load_splits():
    """(prior, bound, test) as (x float32 in [0, 1], y long) pairs; fixed seed, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=SEED, stratify=y)
    x_pr, x_bd, y_pr, y_bd = train_test_split(x_tr, y_tr, test_size=0.5, random_state=SEED, stratify=y_tr)
    as_xy = lambda a, b: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long))  # noqa: E731
    return as_xy(x_pr, y_pr), as_xy(x_bd, y_bd), as_xy(x_te, y_te)


def train_and_certify():
    """Train prior then posterior; return (net, stochastic cert, stochastic test error, det. model, det. cert)."""
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster than two contending ones
    try:
        prior, bound, test = load_splits()
        net = BinaryActivatedNet(64, HIDDEN, CLASSES)
        fit(net, *prior, PRIOR_EPOCHS, lr=0.05, seed=SEED)
        net.set_prior()
        fit(net, *bound, POSTERIOR_EPOCHS, lr=0.01, delta=DELTA, seed=SEED)
        stochastic = certify(net, bound, DELTA, draws=DRAWS, delta_mc=DELTA_MC, union=UNION, seed=SEED)
        test_error = float(stochastic_error_rates(net, *test, DRAWS, seed=SEED + 1).mean())
        model = net.deterministic().eval()
        deterministic = deterministic_certificate(model, test, DELTA_TEST, CLASSES, union=UNION)
    finally:
        torch.set_num_threads(threads)
    return net, stochastic, test_error, model, deterministic, test


def build():
    """The deterministic binarized network, example inputs ``(x_test[:7],)``; certificates attached."""
    _, stochastic, test_error, model, deterministic, (x_te, _) = train_and_certify()
    print(f"stochastic:    {stochastic}; test error {test_error:.4f}", file=sys.stderr)
    print(f"deterministic: {deterministic}", file=sys.stderr)
    model.frugalrt_metadata = {"frugalrt.certificate.stochastic": stochastic.to_json(),
                               "frugalrt.certificate.deterministic": deterministic.to_json()}
    return model, (x_te[:7],)


if __name__ == "__main__":
    import frugalrt
    from frugalrt.runtime.ort import run

    model, inputs = build()
    frugalrt.export(model, inputs, "digits_pacbayes.onnx")
    x_te = load_splits()[2][0]
    same = (run("digits_pacbayes.onnx", [x_te.numpy()])[0].argmax(1) == model(x_te).argmax(1).numpy()).mean()
    print(f"wrote digits_pacbayes.onnx; ONNX Runtime agrees with PyTorch on {same:.2%} of the test predictions",
          file=sys.stderr)
