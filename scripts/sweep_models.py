"""Which models the registry sweep (``scripts/sweep.py``) builds, and how it shrinks them.

Everything here is data: per-family variant choices, constructor-kwarg overrides and exclusions for timm, and
config overrides for Hugging Face model types. Every entry says why it is there. The generic rules (pick the
smallest variant by name, shrink ``depth``/``depths``/``embed_dim(s)``/``num_heads``, tiny HF configs) live in
``sweep.py``; this table only holds the exceptions.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------------------------------- timm
# Size words in model names, smallest first. A name's rank is the smallest rank among its tokens; a name with
# none of them ranks between "small" and "base".
SIZE_WORDS: tuple[tuple[str, ...], ...] = (
    ("test",),
    ("atto", "xxxs"),
    ("femto",),
    ("pico", "xxs", "xxtiny"),
    ("nano", "xs", "xtiny", "xsmall", "mini", "lite", "b0", "s0", "m0", "t0", "t", "s1", "m1", "l1"),
    ("tiny", "t1", "b1", "small_rw"),
    ("small", "s", "s2", "b2", "ti"),
)

# timm family (the module under ``timm.models``) -> the variant to build, where the name heuristic picks one
# that is slow, needs extra inputs or is not representative.
TIMM_VARIANT: dict[str, str] = {
    # a ViT with a class token and 16x16 patches: the reference layout the paper converts
    "vision_transformer": "vit_tiny_patch16_224",
    # deit3 is a separate layout check (no distillation token); the family pick is the distilled DeiT-Tiny,
    # the only timm model with two prefix tokens (class + distillation)
    "deit": "deit_tiny_distilled_patch16_224",
    # eva02_tiny: rotary embeddings and SwiGLU MLPs
    "eva": "eva02_tiny_patch14_224",
    # the ``_rw`` SAM-style windowed ViT is the only timm variant; default 1024 px input is shrunk below
    "vision_transformer_sam": "samvit_base_patch16",
    # the smallest hybrid (ResNet stem + ViT) that builds without a pretrained backbone download
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",
    # relative-position ViT: the timm test model is tiny already
    "vision_transformer_relpos": "test_vit_relpos",
    # smallest CrossViT; both branches run their own class token
    "crossvit": "crossvit_tiny_240",
    "hiera": "hiera_tiny_224",
    "hieradet_sam2": "sam2_hiera_tiny",
    "nest": "nest_tiny",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    "swin_transformer_v2": "swinv2_tiny_window8_256",
    "swin_transformer_v2_cr": "swinv2_cr_tiny_224",
    "maxxvit": "maxvit_nano_rw_256",
    "convnext": "convnext_atto",
    "naflexvit": "naflexvit_base_patch16_gap",
    "gemma4_vit": "gemma4_vit_167m",
    "qwen3_vit": "qwen3_vit_88m",
    "deepseek_vit": "deepseek_vit_412m",
    "mobilenetv5": "mobilenetv5_300m",
    "tnt": "tnt_s_patch16_224",
    "twins": "twins_svt_small",
    "xcit": "xcit_nano_12_p16_224",
    "levit": "levit_128s",
    "mvitv2": "mvitv2_tiny",
    "volo": "volo_d1_224",
    "pit": "pit_ti_224",
    "cait": "cait_xxs24_224",
    "gcvit": "gcvit_xxtiny",
    "davit": "davit_tiny",
    "focalnet": "focalnet_tiny_srf",
    "beit": "beit_base_patch16_224",
    "vitamin": "vitamin_small_224",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "metaformer": "caformer_s18",
    "mlp_mixer": "mixer_s32_224",
    "tiny_vit": "tiny_vit_5m_224",
    "coat": "coat_lite_tiny",
    "fastvit": "fastvit_t8",
    "edgenext": "edgenext_xx_small",
    "mobilevit": "mobilevit_xxs",
    "efficientvit_mit": "efficientvit_b0",
    "efficientvit_msra": "efficientvit_m0",
    "nextvit": "nextvit_small",
    "sequencer": "sequencer2d_s",
    "convit": "convit_tiny",
    "visformer": "visformer_tiny",
    "pvt_v2": "pvt_v2_b0",
    "rdnet": "rdnet_tiny",
    "shvit": "shvit_s1",
    "swiftformer": "swiftformer_xs",
    "iformer": "iformer_t",
    "inception_next": "inception_next_atto",
    "mambaout": "test_mambaout",
    "starnet": "starnet_s050",
    "lowformer": "lowformer_b0",
    "efficientvim": "efficientvim_m1",
    "csatv2": "csatv2",
    "cpubone": "cpubone_b0_bfrobust",
    "fasternet": "fasternet_t0",
    "hgnet": "hgnetv2_b0",
    "repvit": "repvit_m0_9",
    "ghostnet": "ghostnet_050",
    "repghost": "repghostnet_050",
    "lcnetv2": "lcnetv2_small",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "test_efficientnet",
    "byobnet": "test_byobnet",
    "nfnet": "test_nfnet",
    "resnet": "test_resnet",
    "regnet": "regnetx_002",
    "densenet": "densenet121",
    "dla": "dla46_c",
    "dpn": "dpn48b",
    "vgg": "vgg11",
    "resnetv2": "resnetv2_18",
    "res2net": "res2net50_14w_8s",
    "resnest": "resnest14d",
    "rexnet": "rexnet_100",
    "selecsls": "selecsls42",
    "senet": "legacy_seresnet18",
    "sknet": "skresnet18",
    "tresnet": "tresnet_m",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception_aligned": "xception41",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "hrnet": "hrnet_w18_small",
    "byoanet": "botnet26t_256",
    "hardcorenas": "hardcorenas_a",
    "convmixer": "convmixer_768_32",
}

# Extra variants (name -> the token layout it shows that its family's pick does not). Their family is their
# module, as for every other model.
TIMM_EXTRA: dict[str, str] = {
    "vit_little_patch16_reg4_gap_256": "4 register tokens, no class token, average pool",
    "vit_pwee_patch16_reg1_gap_256": "parallel block: q, k, v and fc1 in one Linear (ParallelScalingBlock)",
    "vit_small_patch16_18x2_224": "two MLPs side by side in one block (ParallelThingsBlock)",
    "vit_base_patch16_clip_quickgelu_224": "QuickGELU written out (x * sigmoid(1.702 x))",
    "vit_base_patch16_siglip_224": "no class token, attention-pool head (an MLP on the pooled token)",
    "vit_small_patch14_reg4_dinov2": "class token + 4 registers, 14 px patches",
    "aimv2_large_patch14_224": "SwiGLU MLPs, no class token",
    "beit3_base_patch16_224": "multiway (vision) FFN",
    "flexivit_small": "patch-size flexible embedding",
    "test_vit": "timm's own tiny ViT",
    "deit3_small_patch16_224": "DeiT-III: class token, layer scale, no distillation token",
    "vit_medium_patch16_rope_reg1_gap_256": "2-D rotary embeddings with a register token",
    "vit_pe_core_tiny_patch16_384": "Perception Encoder: rotary 2-D, class token, attention pool",
    "vit_small_patch16_dinov3": "DINOv3: class token + 4 registers, rotary 2-D",
    "coatnet_nano_rw_224": "CoAtNet: conv stages then transformer stages on (B, N, C)",
    "maxxvitv2_nano_rw_256": "MaxxViT-v2: block + grid attention, ConvNeXt blocks",
    "test_maxvit": "timm's own tiny MaxViT",
    "poolformer_s12": "PoolFormer: MLPs as 1x1 convs on NCHW maps (no Linear)",
    "convformer_s18": "ConvFormer: MLPs on channels-last maps",
    "resmlp_12_224": "ResMLP: token-mixing Linear across patches plus a channel MLP",
    "gmlp_ti16_224": "gMLP: spatial gating unit",
    "gmixer_12_224": "gMixer: SwiGLU channel MLP and token-mixing MLP",
    "convnextv2_atto": "ConvNeXt-V2: GRN between the activation and fc2",
    "beitv2_base_patch16_224": "BEiT-v2: relative position bias, class token",
    "mobilevitv2_050": "MobileViT-v2: linear attention on unfolded patches (1x1 conv MLPs)",
    "efficientvit_l1": "EfficientViT-L: multi-scale linear attention",
    "hgnet_tiny": "HGNet v1 (the family pick is v2)",
    "eva02_small_patch14_224": "EVA-02 small: SwiGLU, rotary, class token",
}

# timm family -> constructor kwargs tried before the generic shrink (then the generic shrink, then the
# variant's own kwargs). Every entry says why the generic rule does not fit.
TIMM_KWARGS: dict[str, dict | None] = {
    # default input is 1024x1024 with a 64x64 grid: 256 px keeps the windowed + global attention layout
    "vision_transformer_sam": {"img_size": 256, "depth": 2, "embed_dim": 64, "num_heads": 2,
                               "global_attn_indexes": (1,), "window_size": 4},
    # the hybrid's ResNet stem is fixed; only the transformer part shrinks
    "vision_transformer_hybrid": {"depth": 2},
    # crossvit: two branches with their own dims / depths given per stage as nested lists
    "crossvit": {"depth": [[1, 1, 0]], "embed_dim": [32, 64], "num_heads": [2, 2]},
    # CaiT: ``depth`` self-attention blocks then ``depth_token_only`` class-attention blocks
    "cait": {"depth": 2, "depth_token_only": 1, "embed_dim": 64, "num_heads": 2},
    # TNT has inner (pixel) and outer (patch) dims, tied to each other
    "tnt": {"depth": 2},
    # XCiT: the class-attention layers have their own depth knob
    "xcit": {"depth": 2, "embed_dim": 64, "num_heads": 2, "cls_attn_layers": 1},
    # ConViT: ``local_up_to_layer`` must stay below ``depth``
    "convit": {"depth": 2, "local_up_to_layer": 1, "embed_dim": 64, "num_heads": 2},
}

# timm families or model names left out of the sweep, with the reason.
TIMM_SKIP: dict[str, str] = {
    # legacy NASNet-style cells: the smallest variant is 331 px and 85M parameters with no transformer MLP
    "nasnet": "NASNet-A Large (331 px, 85M params, no transformer MLP) takes minutes to trace",
    "pnasnet": "PNASNet-5 Large (331 px, 86M params, no transformer MLP) takes minutes to trace",
    # block-args constructor (no depth / width kwargs): the smallest variant stays at 294M parameters
    "mobilenetv5": "MobileNetV5-300M cannot be shrunk through kwargs (block args) and has 294M parameters",
}

# ----------------------------------------------------------------------------------------------------- HF
# model type -> config overrides applied after the generic tiny overrides (``None`` at a key removes the
# generic override; ``backbone_config`` holds overrides of the backbone's config). Every entry says why.
HF_OVERRIDES: dict[str, dict] = {
    # hierarchical models take per-stage lists
    "swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "swinv2": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "donut-swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "maskformer-swin": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "hiera": {"embed_dim": 32, "num_heads": [1, 2, 4, 8], "depths": [1, 1, 1, 1]},
    "dinat": {"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]},
    "focalnet": {"embed_dim": 32, "depths": [1, 1, 1, 1]},
    "pvt": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
    "pvt_v2": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
               "num_attention_heads": [1, 1, 2, 2]},
    "segformer": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                  "num_attention_heads": [1, 1, 2, 2], "decoder_hidden_size": 32},
    "convnext": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "convnextv2": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "dinov3_convnext": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "poolformer": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]},
    "cvt": {"embed_dim": [16, 32, 64], "depth": [1, 1, 1], "num_heads": [1, 2, 2]},
    "mobilevit": {"hidden_sizes": [32, 48, 64], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]},
    "levit": {"hidden_sizes": [32, 48, 64], "num_attention_heads": [1, 2, 2], "depths": [1, 1, 1],
              "key_dim": [8, 8, 8]},
    # video models: few frames keep the clip small (the token count is frames x patches)
    "timesformer": {"num_frames": 2},
    "vivit": {"num_frames": 4, "tubelet_size": [2, 16, 16]},
    "videomae": {"num_frames": 4},
    "videoprism_vision_model": {"num_frames": 2},
    # EoMT adds its queries in the last ``num_blocks`` layers: with 2 layers that must be at most 2
    "eomt": {"num_blocks": 1},
    "eomt_dinov3": {"num_blocks": 1},
    # 600 px EfficientNet inputs: the network is convolutional, 224 px only makes it cheaper
    "align_vision_model": {"image_size": 224},
    "efficientnet": {"image_size": 224},
    # 1024 px inputs with a 64x64 grid: 256 px is the same layout, 16x cheaper
    "pixtral": {"image_size": 256},
    # SAM2's Hiera: widths and depths are per-stage lists; the vision model's FPN reads the stage widths
    "sam2_hiera_det_model": {"embed_dim_per_stage": [32, 64, 128, 256], "blocks_per_stage": [1, 1, 1, 1],
                             "num_attention_heads_per_stage": [1, 1, 2, 2], "hidden_size": 32},
    "sam2_vision_model": {"backbone_channel_list": [256, 128, 64, 32], "fpn_hidden_size": 32,
                          "backbone_config": {"embed_dim_per_stage": [32, 64, 128, 256],
                                              "blocks_per_stage": [1, 1, 1, 1],
                                              "num_attention_heads_per_stage": [1, 1, 2, 2],
                                              "hidden_size": 32}},
    # V-JEPA 2: the predictor is a second 12-layer transformer; one small layer is enough
    "vjepa2": {"frames_per_clip": 4, "pred_num_hidden_layers": 1, "pred_hidden_size": 32,
               "pred_num_attention_heads": 2, "num_pooler_layers": 1},
    # DPT-style depth heads on 518 px DINOv2 / 384 px BEiT backbones: the conv neck at that size dominates;
    # 224 px keeps the layout
    # (Depth Anything's neck reads the backbone width from ``reassemble_hidden_size``)
    "depth_anything": {"reassemble_hidden_size": 32, "backbone_config": {"image_size": 224}},
    "prompt_depth_anything": {"reassemble_hidden_size": 32, "backbone_config": {"image_size": 224}},
    "zoedepth": {"backbone_config": {"image_size": 224}},
    "chmv2": {"backbone_config": {"image_size": 224}},
    "tipsv2_dpt": {"backbone_config": {"image_size": 224}},
    # SAM3's ViT runs at 1008 px (a 72x72 grid): 336 px keeps the layout at a ninth of the cost
    "sam3_vision_model": {"backbone_config": {"image_size": 336}},
}

# HF model types left out, with the reason.
HF_SKIP: dict[str, str] = {
    # wrappers whose config names a timm model: the timm side of the sweep covers those architectures
    "timm_wrapper": "wraps a timm model (covered by the timm sweep)",
    "timm_backbone": "wraps a timm model (covered by the timm sweep)",
    # an encoder-decoder shell with no default encoder
    "vision-encoder-decoder": "needs an encoder and a decoder config",
    # not image models, though their configs carry a patch_size / num_channels
    "blt": "byte-level text model (patch_size counts bytes)",
    "neomme": "text/document embedding model (patch_size of its text patches)",
    "dia_decoder": "audio codec decoder (num_channels are codebooks)",
}

# HF model type suffixes left out, with the reason.
HF_SKIP_SUFFIX: dict[str, str] = {
    # SAM-style prompt encoders embed points, boxes and masks, not pixels; their image encoders are swept
    "_prompt_encoder": "a SAM-style prompt encoder (points / boxes, no pixels); the image encoder is swept",
}
