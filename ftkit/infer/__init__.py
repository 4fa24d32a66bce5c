"""Inference: loading a model folder (+ adapter), KV-cache contexts, the rectified-flow sampler with guidance,
text decoding, the plan -> draft -> reflect -> refine (MCoT) loop and generation over a list of prompts."""

from ftkit.infer.context import Context, GuidanceContexts, forward_blocks, image_to_tensor, prefill_texts
from ftkit.infer.generate import generate_prompts, read_prompts
from ftkit.infer.load import check_finite, load_for_inference
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
           "check_finite", "contact_sheet", "decode_image", "decode_latent", "forward_blocks", "generate_image",
           "generate_images", "generate_prompts", "generate_text", "guide", "image_to_tensor", "load_for_inference",
           "prefill_texts", "read_prompts", "run_mcot", "text_to_image", "to_pil", "velocities", "velocity"]
