"""GGUF checkpoints (``model.gguf_file``): what transformers' GGUF loader leaves to be done.

transformers reads a GGUF file and dequantises its tensors to the requested dtype, but marks the
model as quantised "with gguf": Trainer then refuses to train it and ``save_pretrained`` refuses
to write it. The tensors are ordinary ones, so the mark goes (:func:`as_plain_model`), and every
stage checkpoint is plain safetensors.
"""

from __future__ import annotations

from transformers import PreTrainedModel


def as_plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` (loaded from GGUF) without the quantisation mark that blocks training and saving."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
