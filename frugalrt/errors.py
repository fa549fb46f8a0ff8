"""Errors that the CLI reports as one clear line (they name the file, op, shape or target)."""


class FrugalError(Exception):
    """Base of every user-facing frugalrt error."""


class ExportError(FrugalError):
    """A model or SOURCE cannot be exported."""


class UnsupportedOpError(FrugalError):
    """An ONNX node whose (domain, op_type, version) has no converter or kernel."""


class TargetError(FrugalError):
    """Unknown target, or a target whose toolchain is missing."""


class ArtifactError(FrugalError):
    """A compiled artifact is missing, corrupt or does not fit its inputs."""


class DeviceError(FrugalError):
    """A device (emulated or over RPC) cannot be reached or failed mid-run."""


class OutputError(FrugalError):
    """An output path that would replace something frugalrt did not write (or cannot be written)."""
