"""qdit: run quantized diffusion transformers fast."""

from qdit.api import inspect, load_transformer
from qdit.errors import BackendUnavailableError, CheckpointError, QditError, UnsupportedFormatError

__all__ = ["BackendUnavailableError", "CheckpointError", "QditError", "UnsupportedFormatError", "inspect",
           "load_transformer"]
__version__ = "0.1.0"
