"""L2: vision-language. A ViT built from the LM's blocks, CLIP, a LLaVA-style VLM, image data
(generated shapes, sklearn digits, LLaVA JSONL folders) and metrics. Imports common and model only.

    clip = CLIP(ClipConfig(...)); loss = info_nce(clip(pixels, ids, mask))
    vlm = VisionLanguageModel(VlmConfig(vision, text, image_token_id))
    inputs = prepare_chat(vlm, tokenizer, messages_with_images)   # decoded by lmforge.infer.decode
"""

from .chat import image_question, image_turn, pixels_for, prepare_chat, render_ids, split_images
from .clip import CLIP, ClipConfig, info_nce, same_text_targets
from .data import load_digits, load_examples, load_image, read_jsonl_folder, to_pixels
from .io import is_multimodal, load_hf_vision, load_multimodal, save_hf_vision, save_multimodal
from .metrics import bleu, cider_d, recall_at_k, zero_shot_accuracy
from .shapes import Example, class_names, make_shapes
from .vit import VisionConfig, VisionTransformer, hf_to_lmforge, lmforge_to_hf
from .vlm import Projector, VisionLanguageModel, VlmConfig, expand_image_tokens, splice

__all__ = [
    "CLIP",
    "ClipConfig",
    "Example",
    "Projector",
    "VisionConfig",
    "VisionLanguageModel",
    "VisionTransformer",
    "VlmConfig",
    "bleu",
    "cider_d",
    "class_names",
    "expand_image_tokens",
    "hf_to_lmforge",
    "image_question",
    "image_turn",
    "info_nce",
    "is_multimodal",
    "lmforge_to_hf",
    "load_digits",
    "load_examples",
    "load_hf_vision",
    "load_image",
    "load_multimodal",
    "make_shapes",
    "pixels_for",
    "prepare_chat",
    "read_jsonl_folder",
    "recall_at_k",
    "render_ids",
    "same_text_targets",
    "save_hf_vision",
    "save_multimodal",
    "splice",
    "split_images",
    "to_pixels",
    "zero_shot_accuracy",
]
