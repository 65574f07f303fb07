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

from ._checkpoint import load_checkpoint, load_tensors
from ._compare import OutputCheck, base_state_dict, compare_outputs, example_inputs, max_difference
from ._convert import conversion_plan, fuse, localify
from ._distributed import AllReduceBatchNorm, sync_batchnorm
from ._export import ExportError, OnnxExport, check_export_path, export_onnx
from ._grid import GridSpec
from ._io import check_save_path, load, read_recipe, save
from ._peft import TrainableReport, lora_targets, mark_trainable
from ._plan import Layout, MLPSite, Plan, SiteStatus, TokenLayout, find_mlps
from ._select import format_ranges, parse_layers
from ._sources import BuiltModel, ModelSource, build_model, create_model
from ._variants import LocalifyConfig, Variant, get_variant, register_variant, variant_names
from ._version import __version__
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
from .layers import LocalifyModule, LocalityLinear

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
    "check_save_path",
    "load",
    "load_checkpoint",
    "load_tensors",
    "read_recipe",
    "create_model",
    "build_model",
    "BuiltModel",
    "mark_trainable",
    "lora_targets",
    "TrainableReport",
    "export_onnx",
    "check_export_path",
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
    "UntrustedCodeError",
    "__version__",
]
