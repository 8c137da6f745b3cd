"""The embedded default: a character-level tokenizer and a small Llama, built with no download.

Characters, not BPE merges: the suite's tasks reverse, count and uppercase random letter strings,
which a tiny model learns far more easily when every letter is its own token. The vocabulary
is every printable ASCII character plus newline and five special tokens, in a fixed order, so
the tokenizer is identical on every machine.

The chat template wraps assistant turns in ``{% generation %}`` so TRL's
``assistant_only_loss`` puts the SFT loss on responses only.

    python -c "from alignment.modeling.embedded import build_tokenizer; print(build_tokenizer()('hi'))"
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment.config import ModelConfig

PAD, EOS, UNK = "<|pad|>", "<|end|>", "<|unk|>"
SPECIAL_TOKENS = (PAD, EOS, UNK, "<|system|>", "<|user|>", "<|assistant|>")

# Each role starts with its marker; every turn ends with <|end|>, which is also the EOS token,
# so generation stops where an assistant turn would end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The project's character-level tokenizer, deterministic by construction."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A Llama initialised from ``cfg``'s architecture fields with a fixed seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    # A local generator would not reach the modules' own init calls; fork the global RNG so the
    # caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
