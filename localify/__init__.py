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

from ._compare import OutputCheck, base_state_dict, compare_outputs, example_inputs, max_difference
from ._convert import conversion_plan, fuse, localify
from ._distributed import AllReduceBatchNorm, sync_batchnorm
from ._export import ExportError, OnnxExport, export_onnx
from ._grid import GridSpec
from ._io import load, load_checkpoint, read_recipe, save
from ._peft import TrainableReport, lora_targets, mark_trainable
from ._plan import Layout, MLPSite, Plan, SiteStatus, TokenLayout, find_mlps
from ._select import format_ranges, parse_layers
from ._sources import BuiltModel, ModelSource, build_model, create_model
from ._variants import LocalifyConfig, Variant, get_variant, register_variant, variant_names
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
)
from .ffn import LocalViTFFN
from .layers import LocalifyModule, LocalityLinear

__version__ = "0.1.0"

__all__ = [
    "localify",
    "fuse",
    "conversion_plan",
    "compare_outputs",
    "OutputCheck",
    "max_difference",
    "example_inputs",
    "ExampleInputs",
    "base_state_dict",
    "find_mlps",
    "parse_layers",
    "format_ranges",
    "save",
    "load",
    "load_checkpoint",
    "read_recipe",
    "create_model",
    "build_model",
    "BuiltModel",
    "mark_trainable",
    "lora_targets",
    "TrainableReport",
    "export_onnx",
    "OnnxExport",
    "ExportError",
    "sync_batchnorm",
    "AllReduceBatchNorm",
    "ModelSource",
    "LocalifyConfig",
    "Variant",
    "register_variant",
    "get_variant",
    "variant_names",
    "SiteStatus",
    "Layout",
    "Plan",
    "MLPSite",
    "TokenLayout",
    "GridSpec",
    "LocalifyModule",
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
    "__version__",
]
