"""localify: turn any Vision Transformer into a LocalViT.

A torch.export graph pass finds the transformer MLPs of a model (timm, Hugging Face or your own), infers
the token grid and prefix tokens each one sees, and splices a depth-wise convolution between the two
point-wise layers, initialised so that the model computes exactly what it computed before.

Example::

    import timm, localify
    model = timm.create_model("deit_tiny_patch16_224")
    print(localify.find_mlps(model))               # dry run: every MLP, its tokens, convertible or why not
    model = localify.localify(model, layers="1-4") # the same object back, converted
"""

from ._checkpoint import load_checkpoint
from ._convert import LocalifyConfig, fuse, localify
from ._distributed import AllReduceBatchNorm, sync_batchnorm
from ._export import ExportError, OnnxExport, export_onnx
from ._grid import GridSpec
from ._io import load, read_recipe, save
from ._locate import MLPSite, Plan, TokenLayout, find_mlps
from ._peft import TrainableReport, mark_trainable
from ._select import parse_layers
from ._sources import ModelSource, create_model
from .errors import (
    AlreadyLocalifiedError,
    CheckpointError,
    ConfigError,
    ExampleInputError,
    FuseError,
    LayerSpecError,
    LocalifyError,
    ModelSourceError,
    NoMLPFoundError,
    NotLocalifiableError,
    SavedModelError,
    TraceError,
    UntrustedCodeError,
)
from .ffn import LocalViTFFN
from .layers import LocalityLinear

__version__ = "0.1.0"

__all__ = [
    "localify",
    "fuse",
    "find_mlps",
    "parse_layers",
    "save",
    "load",
    "load_checkpoint",
    "read_recipe",
    "create_model",
    "mark_trainable",
    "TrainableReport",
    "export_onnx",
    "OnnxExport",
    "ExportError",
    "sync_batchnorm",
    "AllReduceBatchNorm",
    "ModelSource",
    "LocalifyConfig",
    "Plan",
    "MLPSite",
    "TokenLayout",
    "GridSpec",
    "LocalityLinear",
    "LocalViTFFN",
    "LocalifyError",
    "TraceError",
    "ExampleInputError",
    "NoMLPFoundError",
    "LayerSpecError",
    "NotLocalifiableError",
    "AlreadyLocalifiedError",
    "ConfigError",
    "FuseError",
    "ModelSourceError",
    "CheckpointError",
    "SavedModelError",
    "UntrustedCodeError",
    "__version__",
]
