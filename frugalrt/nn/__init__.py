"""PyTorch layers that stay structured through export: butterfly and binarized layers."""
from frugalrt.nn.binary import BinaryConv2d, BinaryLinear, freeze, sign_ste
from frugalrt.nn.butterfly import ButterflyLinear

__all__ = ["ButterflyLinear", "BinaryLinear", "BinaryConv2d", "freeze", "sign_ste"]
