"""Inference: KV-cache contexts, the rectified-flow sampler with guidance, text decoding and the
plan -> draft -> reflect -> refine (MCoT) loop."""

from ftkit.infer.context import Context, GuidanceContexts, forward_blocks, image_to_tensor, prefill_texts
from ftkit.infer.mcot import (
    Round,
    SamplerSettings,
    TextSettings,
    Trace,
    contact_sheet,
    run_mcot,
    text_to_image,
)
from ftkit.infer.sampler import (
    GeneratedText,
    decode_image,
    decode_latent,
    generate_image,
    generate_images,
    generate_text,
    guide,
    to_pil,
    velocities,
    velocity,
)

__all__ = ["Context", "GeneratedText", "GuidanceContexts", "Round", "SamplerSettings", "TextSettings", "Trace",
           "contact_sheet", "decode_image", "decode_latent", "forward_blocks", "generate_image", "generate_images",
           "generate_text", "guide", "image_to_tensor", "prefill_texts", "run_mcot", "text_to_image", "to_pil",
           "velocities", "velocity"]
