"""qdit: run quantized diffusion transformers fast."""

from qdit.api import inspect, load_transformer
from qdit.config import QditConfig
from qdit.cuda_graph import enable_cuda_graphs
from qdit.pipelines.load import generate, load_pipeline
from qdit.errors import BackendUnavailableError, CheckpointError, QditError, UnsupportedFormatError
from qdit.formats.nunchaku import convert_nunchaku_tensors

__all__ = ["BackendUnavailableError", "CheckpointError", "QditConfig", "QditError", "UnsupportedFormatError",
           "convert_nunchaku_tensors", "enable_cuda_graphs", "generate", "inspect", "load_pipeline", "load_transformer"]
__version__ = "0.1.0"
