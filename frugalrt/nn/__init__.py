"""PyTorch layers that stay structured through export: butterfly and binarized layers."""
from frugalrt.nn.binary import BinaryConv2d, BinaryLinear, freeze, sign_ste
from frugalrt.nn.butterfly import ButterflyLinear
from frugalrt.nn.certify import Certificate
from frugalrt.nn.factorize import FactorizationResult, factorize  # noqa: F811  (the function shadows its module)
from frugalrt.nn.compress import CompressionReport, compress  # noqa: F811
from frugalrt.nn.pacbayes import (BinaryActivatedConvNet, BinaryActivatedNet, GaussianBinaryConv2d, certify, deploy,
                                  deterministic_certificate, fit)

__all__ = ["ButterflyLinear", "BinaryLinear", "BinaryConv2d", "freeze", "sign_ste",
           "factorize", "FactorizationResult", "compress", "CompressionReport",
           "BinaryActivatedNet", "BinaryActivatedConvNet", "GaussianBinaryConv2d", "fit", "certify", "deploy",
           "deterministic_certificate", "Certificate"]
