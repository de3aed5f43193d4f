"""Tiny members of ComfyUI's own model classes, built the way ComfyUI builds a loaded model (its model
config class from a unet config, ``get_model``, a ``ModelPatcher`` on its load and offload devices), with
small random weights, and ComfyUI's KSampler path to sample them. ComfyUI is imported on first use."""

from __future__ import annotations

from typing import Any

import torch

# unet configs as ComfyUI's model detection would give them, shrunk (hidden sizes 64-128, 2 layers).
CONFIGS: dict[str, dict[str, Any]] = {
    "flux": dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
        theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
    ),
    "wan": dict(
        image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=8, in_dim=16, dim=64,
        ffn_dim=128, freq_dim=32, text_dim=32, out_dim=16, num_heads=2, num_layers=2,
    ),
    "qwen_image": dict(
        image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
        attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
    ),
    "hunyuan_video": dict(
        image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
        hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
        theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
        use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False,
    ),
    "sd3": dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
        num_patches=64 * 64, pos_embed_max_size=64, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
    ),
}  # fmt: skip

# The ComfyUI model config class each config must select (as detection would).
CONFIG_CLASSES = {
    "flux": "Flux",
    "wan": "WAN21_T2V",
    "qwen_image": "QwenImage",
    "hunyuan_video": "HunyuanVideo",
    "sd3": "SD3",
}
LATENTS = {
    "flux": (1, 16, 8, 8),
    "sd3": (1, 16, 8, 8),
    "wan": (1, 16, 2, 8, 8),
    "hunyuan_video": (1, 16, 2, 8, 8),
    "qwen_image": (1, 16, 1, 8, 8),
}


def build(family: str, seed: int = 0) -> Any:
    """A ``ModelPatcher`` on a tiny model of ``family`` (weights from ``seed``)."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(CONFIGS[family]))
    assert type(config).__name__ == CONFIG_CLASSES[family], type(config).__name__
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # ComfyUI's ops leave weights uninitialised: fill them
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def conds(tokens: tuple[int, int] = (6, 6), seed: int = 1) -> tuple[list, list]:
    """(positive, negative) conditioning as text encoders give it: context, pooled output, Flux guidance.
    Token counts that cannot be padded to one length (5 and 6) make ComfyUI run cond and uncond apart."""
    generator = torch.Generator().manual_seed(seed)

    def one(n: int) -> list:
        extra = {"pooled_output": torch.randn(1, 32, generator=generator), "guidance": 3.5}
        return [[torch.randn(1, n, 32, generator=generator), extra]]

    return one(tokens[0]), one(tokens[1])


def sample(
    model: Any,
    family: str,
    *,
    steps: int = 4,
    cfg: float = 2.0,
    sampler: str = "euler",
    scheduler: str = "simple",
    seed: int = 0,
    tokens: tuple[int, int] = (6, 6),
) -> torch.Tensor:
    """The latent ComfyUI's KSampler node makes (``nodes.common_ksampler``: its sampler path, unmocked)."""
    import nodes

    positive, negative = conds(tokens)
    latent = {"samples": torch.zeros(LATENTS[family])}
    out = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out[0]["samples"]
