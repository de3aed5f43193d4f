"""Tiny real diffusers pipelines assembled from local components (nothing downloaded).

Each builder returns a genuine diffusers pipeline class (``PixArtAlphaPipeline``,
``StableDiffusion3Pipeline``, ``WanPipeline``, ``FluxPipeline``; Wan 2.2's two-expert
``WanPipeline`` and ``WanImageToVideoPipeline`` with ``expand_timesteps``) whose every component
is built from a config with random weights: a transformer two blocks deep and a few channels wide
and a one-level VAE (both from :mod:`stepcache.integrations.models`, the one module of tiny models),
the pipeline's own scheduler class, tiny text encoders (T5 / CLIP / UMT5 from ``transformers``
configs) and a word-level tokenizer made with ``tokenizers`` and wrapped in
``PreTrainedTokenizerFast`` (no vocabulary file, no hub). Random weights make the outputs
meaningless but the mechanics real: the pipelines tokenize, encode, batch or split
classifier-free guidance and step their schedulers exactly as they do for the released
checkpoints.

A :class:`PipelineCase` bundles a builder with the call arguments that keep a generation tiny (a few
latent pixels, a short text length, ``output_type="latent"`` so nothing is decoded) and with what a
test needs to know: the transformer calls per denoising step (guidance batched in one call, or
split in two) and the component types discovery finds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stepcache.integrations.models import tiny_vae, transformer

PROMPTS = ("a red cat", "a blue dog on grass", "two small birds", "an old house at night")
# Every word the prompts use; anything else maps to <unk>.
_WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"a", "photo", "of", "the"})


def tiny_tokenizer(*, bos: str | None = None, eos: str = "</s>", model_max_length: int = 8) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over the prompts' words, built in memory.

    Ids: ``<pad>`` 0, the eos token 1, ``<unk>`` 2, the bos token 3 when given (CLIP style), then
    the words. Every encoding ends with the eos token (and starts with the bos token if any), the
    way T5 and CLIP tokenizers add their special tokens.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", eos, "<unk>"] + ([bos] if bos else [])
    vocab = {tok: i for i, tok in enumerate(specials + _WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    marks = [(eos, vocab[eos])] + ([(bos, vocab[bos])] if bos else [])
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=marks)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token=eos,
        unk_token="<unk>",
        bos_token=bos,
        model_max_length=model_max_length,
    )


def vocab_size() -> int:
    """Embedding rows the text encoders need (specials + words), with room to spare."""
    return len(_WORDS) + 8


def _seeded(seed: int) -> Callable[[Callable[[], Any]], Any]:
    """Run a factory under a fixed seed without disturbing the caller's RNG stream."""

    def run(factory: Callable[[], Any]) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return factory()

    return run


def _t5_encoder(d_model: int, *, umt5: bool = False) -> Any:
    """A one-layer T5 encoder (UMT5 for Wan)."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size(),
        d_model=d_model,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return model_cls(config)


def _finish(pipe: Any) -> Any:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- PixArt-alpha
def pixart_pipeline(seed: int = 0) -> Any:
    """``PixArtAlphaPipeline``: T5 text encoder, batched guidance (uncond and cond in one call)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    def make() -> Any:
        dit = transformer("pixart")
        return PixArtAlphaPipeline(
            tokenizer=tiny_tokenizer(),
            text_encoder=_t5_encoder(12),
            vae=tiny_vae(4),
            transformer=dit,
            scheduler=DPMSolverMultistepScheduler(),
        )

    return _finish(_seeded(seed)(make))


# ---------------------------------------------------------------- Stable Diffusion 3
def _clip_encoder(hidden: int, projection: int | None = None, *, layers: int = 2) -> Any:
    """A CLIP text encoder; with ``projection``, the one with a text projection (SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        **({"projection_dim": projection} if projection else {}),
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def sd3_pipeline(seed: int = 0) -> Any:
    """``StableDiffusion3Pipeline``: two CLIP encoders, no T5 (zeros), joint blocks, batched guidance.

    ``text_encoder_3=None`` is supported by the pipeline: the T5 part of the text stream is zeros.
    The transformer's text width takes both CLIP widths side by side (8 + 4 <= 12) and its pooled
    width their two projections (6 + 4).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    def make() -> Any:
        return StableDiffusion3Pipeline(
            transformer=transformer("sd3"),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(4),
            text_encoder=_clip_encoder(8, 6),
            tokenizer=tiny_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>"),
            text_encoder_2=_clip_encoder(4, 4),
            tokenizer_2=tiny_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>"),
            text_encoder_3=None,
            tokenizer_3=None,
        )

    return _finish(_seeded(seed)(make))


# ---------------------------------------------------------------- Wan 2.1
def wan_pipeline(seed: int = 0) -> Any:
    """``WanPipeline``: UMT5 text encoder, ``AutoencoderKLWan``, split guidance (two calls a step)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    def make() -> Any:
        dit = transformer("wan")
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1],
            num_res_blocks=1,
            temperal_downsample=[True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
            scale_factor_temporal=2,
            scale_factor_spatial=2,
        )
        encoder = _t5_encoder(12, umt5=True)
        return WanPipeline(
            tokenizer=tiny_tokenizer(),
            text_encoder=encoder,
            vae=vae,
            transformer=dit,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        )

    return _finish(_seeded(seed)(make))


# ---------------------------------------------------------------- Flux.1
def flux_pipeline(seed: int = 0) -> Any:
    """``FluxPipeline``: CLIP + T5 encoders, double and single blocks, timesteps as t / 1000.

    With ``true_cfg_scale > 1`` and a negative prompt the pipeline runs true classifier-free guidance
    as two calls per step inside ``cache_context("cond" / "uncond")``, like Wan.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    def make() -> Any:
        dit = transformer("flux", joint_attention_dim=12, pooled_projection_dim=8, guidance_embeds=True)
        clip = _clip_encoder(8, layers=1)
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(4),
            text_encoder=clip,
            tokenizer=tiny_tokenizer(bos="<|startoftext|>", eos="<|endoftext|>"),
            text_encoder_2=_t5_encoder(12),
            tokenizer_2=tiny_tokenizer(),
            transformer=dit,
        )

    return _finish(_seeded(seed)(make))


# ---------------------------------------------------------------- cases
@dataclass(frozen=True)
class PipelineCase:
    """One pipeline and how to drive it tiny.

    Attributes:
        name: test id.
        build: ``(seed=0) -> pipeline``, the same weights for the same seed.
        call: keyword arguments for every call besides the prompt, generator and step count.
        calls_per_step: transformer calls per denoising step (2 for split guidance).
        types: component types default discovery finds, with how many of each.
    """

    name: str
    build: Callable[..., Any]
    call: dict[str, Any] = field(default_factory=dict)
    calls_per_step: int = 1
    types: dict[str, int] = field(default_factory=dict)

    def inputs(self, prompt: str, seed: int) -> dict[str, Any]:
        """Call kwargs for one generation (a fresh generator each time)."""
        return {"prompt": prompt, "generator": torch.Generator().manual_seed(seed), **self.call}


CASES = (
    PipelineCase(
        "pixart_alpha",
        pixart_pipeline,
        call={
            "height": 8,
            "width": 8,
            "guidance_scale": 4.5,
            "max_sequence_length": 8,
            "clean_caption": False,
            "use_resolution_binning": False,
            "output_type": "latent",
        },
        calls_per_step=1,
        types={"attn": 2, "cross_attn": 2, "ff": 2},
    ),
    PipelineCase(
        "sd3",
        sd3_pipeline,
        call={
            "height": 8,
            "width": 8,
            "guidance_scale": 5.0,
            "max_sequence_length": 8,
            "output_type": "latent",
        },
        calls_per_step=1,
        # two joint blocks: attn each, ff each, ff_context only in the first (the last is context_pre_only)
        types={"attn": 2, "ff": 3},
    ),
    PipelineCase(
        "wan",
        wan_pipeline,
        call={
            "height": 16,  # the pipeline wants multiples of 16; latents are 8 x 8 (scale factor 2)
            "width": 16,
            "num_frames": 3,  # (3 - 1) / 2 + 1 = 2 latent frames
            "guidance_scale": 5.0,
            "max_sequence_length": 8,
            "output_type": "latent",
        },
        calls_per_step=2,
        types={"attn": 2, "cross_attn": 2, "ff": 2},
    ),
    PipelineCase(
        "flux_true_cfg",
        flux_pipeline,
        call={
            "height": 8,  # latents 8 x 8, packed into 4 x 4 tokens
            "width": 8,
            "negative_prompt": "a photo",
            "true_cfg_scale": 2.0,  # with a negative prompt: two calls per step
            "guidance_scale": 3.5,
            "max_sequence_length": 8,
            "output_type": "latent",
        },
        calls_per_step=2,
        # two double blocks (attn, ff, ff_context) and two single blocks (attn, proj_mlp)
        types={"attn": 4, "ff": 6},
    ),
)


# ---------------------------------------------------------------- Wan 2.2 variants
def wan22_two_stage_pipeline(seed: int = 0) -> Any:
    """Wan 2.2 A14B layout: ``WanPipeline`` with ``transformer_2`` and ``boundary_ratio``.

    The first transformer denoises the high-noise steps (``t >= boundary_ratio * 1000``), the second
    the rest; both with split guidance.
    """
    from diffusers import WanPipeline

    base = wan_pipeline(seed)
    pipe = WanPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        transformer=base.transformer,
        transformer_2=wan_pipeline(seed + 1).transformer,
        boundary_ratio=0.5,
        scheduler=base.scheduler,
    )
    return _finish(pipe)


def wan22_ti2v_pipeline(seed: int = 0) -> Any:
    """Wan 2.2 TI2V-5B layout: ``WanImageToVideoPipeline`` with ``expand_timesteps=True``.

    No image encoder (the transformer has no ``image_dim``): the first latent frame is the encoded
    image, and the transformer gets a per-token timestep of shape (batch, tokens) that is 0 on the
    first frame's tokens and ``t`` on the others.
    """
    from diffusers import WanImageToVideoPipeline

    base = wan_pipeline(seed)
    pipe = WanImageToVideoPipeline(
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        vae=base.vae,
        transformer=base.transformer,
        scheduler=base.scheduler,
        image_encoder=None,
        image_processor=None,
        expand_timesteps=True,
    )
    return _finish(pipe)


def wan22_ti2v_inputs(pipe: Any, prompt: str, seed: int) -> dict[str, Any]:
    """Call kwargs for one TI2V generation: a 16 x 16 image, and the prompt already encoded.

    The prompt is encoded here (same tokenizer and encoder, through ``WanPipeline.encode_prompt``)
    because ``WanImageToVideoPipeline``'s own prompt cleaning calls ``ftfy`` without checking that it
    is installed (diffusers 0.42.1), and ftfy is not a dependency here.
    """
    from diffusers import WanPipeline
    from PIL import Image

    parts = {k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    embeds, negative = WanPipeline(**parts).encode_prompt(prompt, "", max_sequence_length=8)
    wan = next(c for c in CASES if c.name == "wan")
    call = {k: v for k, v in wan.call.items() if k != "max_sequence_length"}
    return {
        "image": Image.new("RGB", (16, 16), (40 * seed % 256, 120, 200)),
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "generator": torch.Generator().manual_seed(seed),
        **call,
    }
