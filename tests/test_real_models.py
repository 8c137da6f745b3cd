"""The paths only real models take, on the real models in ../shared/data/models/:

- stories260K: a pretrained sentencepiece Llama with no pad token and no chat template (every
  fallback is hit);
- SmolLM2-135M-Instruct (GGUF): byte-level BPE, ChatML with a newline after each turn's EOS, pad
  equal to EOS, digits split one by one.

Each test fails on the code before the real-models issue (see its docstring for how).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from alignment.config import AlignmentConfig, LoraConfig, ModelConfig, PPOConfig
from alignment.modeling import lora, packing
from alignment.modeling.generation import Generation, as_rendered, render_prompts, render_reply, turn_tail
from alignment.modeling.loading import load_causal_lm, load_tokenizer
from alignment.modeling.scoring import pack, score_responses, sequence_scores
from alignment.modeling.rollout_engine import HFRollouts
from conftest import shared

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Add: 17 25"}]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    pytest.importorskip("gguf", reason="GGUF files need the gguf package: pip install '.[gguf]'")
    path = shared("models", GGUF)
    return load_tokenizer(str(path.parent), ModelConfig(), gguf_file=path.name)


@pytest.fixture(scope="module")
def stories():
    return shared("models", "stories260K")


def _tiny_scorer(tokenizer) -> LlamaForSequenceClassification:
    """A small sequence classifier over a real vocabulary, pooling as transformers does."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(config).eval()


def test_smollm2_tokenizer_facts(smollm2_tokenizer):
    """What the other tests rely on: pad == EOS == <|im_end|>, and ChatML writes a newline after it."""
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_tail(tok) == tok("\n", add_special_tokens=False)["input_ids"]


def test_reward_is_read_where_it_was_trained(smollm2_tokenizer):
    """TRL's RewardTrainer feeds the template's rendering of prompt + reply (ending in EOS and a
    newline) and the classifier pools at the last token that is not the pad token. Scoring a text
    reply, and a sampled reply's ids that ended at EOS, must read the same token: the same score.
    Before the fix, scores were read at the EOS itself (pad == EOS), on "reply + EOS" without the
    template's newline: another position, another score."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tok = smollm2_tokenizer
    model = _tiny_scorer(tok)
    whole = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "42"}], tokenize=True, return_dict=True)["input_ids"]
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)([{"chosen_ids": whole, "rejected_ids": whole[:-3]}])
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, 0]
    prompt_ids, reply_ids = render_reply(tok, PROMPT, "42")
    text = score_responses(model, [prompt_ids], [reply_ids], pad_token_id=tok.pad_token_id, batch_size=1)[0]
    sampled = Generation("42", tuple(tok("42", add_special_tokens=False)["input_ids"]) + (tok.eos_token_id,), ended=True)
    from_ids = score_responses(model, [prompt_ids], [as_rendered(sampled, turn_tail(tok))], pad_token_id=tok.pad_token_id,
                               batch_size=1)[0]
    assert torch.allclose(text, trained, atol=1e-6) and torch.allclose(from_ids, trained, atol=1e-6)
    at_eos = model.score(model.model(input_ids=torch.tensor([prompt_ids + reply_ids[:-1]])).last_hidden_state)[0, -1, 0]
    assert abs(float(at_eos - trained)) > 1e-4, "the EOS position scores differently: the check has teeth"


def test_sampled_reply_is_scored_on_the_ids_that_were_sampled(smollm2_tokenizer, monkeypatch):
    """A BPE sample need not be the canonical tokenization of its text ("Hel" + "lo" decodes to
    "Hello", which encodes as one token). The KL estimate must score the sampled ids; before the
    fix it decoded and re-encoded them (and added an EOS to replies cut at max_new_tokens)."""
    from alignment import evaluate
    from alignment.config import EvalConfig
    from alignment.data.stage_data import HeldOut

    tok = smollm2_tokenizer
    pieces = [tok.convert_tokens_to_ids("Hel"), tok.convert_tokens_to_ids("lo")]
    assert tok(tok.decode(pieces), add_special_tokens=False)["input_ids"] != pieces, "not canonical: the case this test is about"
    sampled = Generation(tok.decode(pieces), tuple(pieces), ended=False)  # cut at max_new_tokens: no EOS
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: [[sampled]])
    seen = []
    monkeypatch.setattr(evaluate, "response_logps", lambda model, prompts, replies, **k: seen.append(replies) or torch.zeros(1))
    evaluate.kl_to_reference(None, None, tok, HeldOut(prompts=[PROMPT]), cfg=EvalConfig(), seed=0)
    assert seen == [[pieces], [pieces]]


def test_fallback_template_ends_replies_with_the_tokenizers_eos(stories):
    """stories260K has no chat template. The fallback must close an assistant turn with the
    tokenizer's own EOS (</s>), inside the SFT loss mask, and generation must stop there. Before
    the fix it got the toy's template, whose turn ends with the text "<|end|>": plain characters in
    a real vocabulary, so SFT never taught the model to stop."""
    tok = load_tokenizer(str(stories), ModelConfig())
    assert tok.pad_token_id == tok.eos_token_id, "no pad token: pad with EOS"
    rendered = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "42"}], tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
    ids, mask = rendered["input_ids"], rendered["assistant_masks"]
    eos_at = ids.index(tok.eos_token_id)
    assert mask[eos_at] == 1 and tok.decode([i for i, m in zip(ids, mask) if m]).strip() == "42</s>"
    assert "<|end|>" not in tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": "42"}], tokenize=False)


@pytest.mark.integration
def test_sft_with_the_fallback_template_learns_to_stop(stories, run_recipe):
    """SFT of stories260K (a base model: 0 of its samples end with EOS) on the suite through the
    pipeline: afterwards its replies end with the tokenizer's EOS."""
    _, (sft,) = run_recipe("sft", "model=hf", f"model.name_or_path={stories}", "sft.max_steps=150", "sft.global_batch_size=32", "sft.per_device_batch_size=32",
                           "sft.learning_rate=3e-3", "sft.max_seq_tokens=128", "data.suite.n_eval=56", "eval.max_new_tokens=16",
                           "sft.logging_every_n_steps=50")
    assert sft.start_metrics["eos_rate"] < 0.2
    assert sft.metrics["eos_rate"] >= 0.9, sft.metrics


def _stories_engine(stories, tokenizer, *, dropout: float):
    """stories260K with LoRA, and ``dropout`` both in its attention (as models trained with
    dropout have) and in LoRA, whose B is moved off zero (as a continued adapter's is), so both
    dropouts change the outputs when they are on."""
    from alignment.stages.ppo.engine import PPOEngine

    cfg = AlignmentConfig()
    cfg.model.peft, cfg.model.lora = "lora", LoraConfig(r=4, alpha=8, dropout=dropout)
    base = load_causal_lm(str(stories), cfg.model, tokenizer, key="test")
    for module in base.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = dropout
    policy = lora.attach(base, cfg, task=lora.CAUSAL_LM, adapter=None)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    value = _tiny_scorer(tokenizer)
    ppo = PPOConfig(rollout_batch_size=8, mini_batch_size=8, ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3)
    return ppo, PPOEngine(ppo, SimpleNamespace(cfg=cfg), policy=policy, value_model=value)


def test_ppo_first_update_has_ratio_one_with_dropout_in_the_model(stories):
    """A LoRA policy with dropout (0.5 here; 0.05 by default): the first update's new log-probs
    are those of the rollout, so ratio 1, approx-KL 0 and nothing clipped. Before the fix the
    rollout ran in eval() and the update in train() mode: dropout made the ratio noise."""
    from alignment.stages.ppo import maths as pm
    from alignment.stages.ppo.loop import _optimise
    from alignment.stages.ppo.rollout import rollout

    tok = load_tokenizer(str(stories), ModelConfig())
    ppo, engine = _stories_engine(stories, tok, dropout=0.5)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in engine.policy.modules())
    torch.manual_seed(0)
    prompts = render_prompts(tok, [[{"role": "user", "content": f"Add: {i} {i + 1}"}] for i in range(8)])
    reward = _tiny_scorer(tok)
    batch, _ = rollout(ppo, engine=engine, sampler=HFRollouts(tok, temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens), reference=lora.ReferenceView(engine.policy), reward_model=reward, tokenizer=tok,
                       prompt_ids=prompts, examples=[None] * 8, moments=pm.RunningMoments(), kl_coef=0.05)
    stats = _optimise(ppo, batch, engine=engine, generator=torch.Generator().manual_seed(0), rollouts=8)
    assert abs(stats["ratio_mean"] - 1.0) < 1e-5 and stats["approx_kl"] < 1e-10 and stats["clipfrac"] == 0.0, stats


def test_ppo_changes_the_policy_weights(stories):
    """One PPO update moves a real policy (its LoRA weights) away from where it started."""
    from alignment.stages.ppo import maths as pm
    from alignment.stages.ppo.loop import _optimise
    from alignment.stages.ppo.rollout import rollout

    tok = load_tokenizer(str(stories), ModelConfig())
    ppo, engine = _stories_engine(stories, tok, dropout=0.05)
    before = {n: p.detach().clone() for n, p in engine.policy.named_parameters() if p.requires_grad}
    prompts = render_prompts(tok, [[{"role": "user", "content": f"Say {w}"}] for w in "abcdefgh"])
    torch.manual_seed(1)
    batch, _ = rollout(ppo, engine=engine, sampler=HFRollouts(tok, temperature=ppo.temperature, max_new_tokens=ppo.max_new_tokens), reference=lora.ReferenceView(engine.policy), reward_model=_tiny_scorer(tok), tokenizer=tok,
                       prompt_ids=prompts, examples=[None] * 8, moments=pm.RunningMoments(), kl_coef=0.05)
    _optimise(ppo, batch, engine=engine, generator=torch.Generator().manual_seed(0), rollouts=8)
    after = dict(engine.policy.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_a_real_model_needs_a_real_model_preset(stories):
    """Only model.name_or_path set: the toy's defaults (lr 1e-3, 128 tokens) are refused with the
    fix named, before anything loads; model=hf gives the defaults for a real model."""
    from alignment.errors import ConfigError
    from alignment.run import compose_config

    with pytest.raises(ConfigError, match="model=hf"):
        compose_config(["+recipe=sft", f"model.name_or_path={stories}"])
    cfg = compose_config(["+recipe=sft_then_dpo", "model=hf", f"model.name_or_path={stories}"])
    assert cfg.sft.learning_rate <= 1e-4 and cfg.sft.max_seq_tokens >= 1024 and cfg.dpo.learning_rate <= 1e-5
    assert cfg.dpo.pairs.max_new_tokens == cfg.dpo.pairs.max_new_tokens and cfg.eval.max_new_tokens >= 64


def test_smollm2_preset_holds_the_suite_whole(smollm2_tokenizer):
    """model=smollm2's lengths hold every rendered suite demonstration (system prompt included), so
    nothing is cut; pair sampling has its own generation settings, not the evaluation's."""
    from alignment.data.stage_data import load_suite, suite_demonstrations
    from alignment.run import compose_config

    cfg = compose_config(["+recipe=sft_rm_ppo", "model=smollm2"])
    rows, _ = suite_demonstrations(load_suite(cfg.data.suite), chatter_rate=cfg.data.suite.demo_chatter_rate, seed=0)
    longest = max(len(smollm2_tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                  for r in rows[:2000])
    assert longest <= cfg.sft.max_seq_tokens and longest <= cfg.reward.max_seq_tokens
    prompt = max(len(ids) for ids in render_prompts(smollm2_tokenizer, [r["messages"][:1] for r in rows[:2000]]))
    assert prompt + cfg.ppo.max_new_tokens <= cfg.reward.max_seq_tokens


@pytest.fixture(scope="module")
def smollm2_model(smollm2_tokenizer):
    path = shared("models", GGUF)
    return load_causal_lm(str(path.parent), ModelConfig(), smollm2_tokenizer, key="test", gguf_file=path.name)


@pytest.mark.integration
def test_gguf_loads_as_a_plain_model_that_trains_and_saves(smollm2_model, smollm2_tokenizer, tmp_path):
    """transformers dequantises the GGUF but marks the model quantised, so Trainer refuses it and
    save_pretrained fails; the loader lifts the mark. The weights are SmolLM2's: greedy "The
    capital of France is" goes on with " Paris"."""
    from transformers import AutoModelForCausalLM

    model = smollm2_model
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert smollm2_tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).startswith(" Paris")
    model.save_pretrained(tmp_path)  # refused while marked as quantised
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)


@pytest.mark.integration
def test_smollm2_with_lora_runs_padding_free(smollm2_model, smollm2_tokenizer, monkeypatch):
    """SmolLM2's hidden states reach ~44 after 30 layers, and its packed and padded layouts then
    differ by ~4e-4 in float32: the packing self-check, at an absolute 1e-4, turned padding-free
    forwards off for this model (a warning on every stage). Relative to the activations' scale it
    passes, packs, and the packed logits equal the padded ones."""
    model = lora.attach(copy.deepcopy(smollm2_model), AlignmentConfig(), task=lora.CAUSAL_LM, adapter=None)
    assert packing.enable(model)
    rows = [smollm2_tokenizer(text)["input_ids"] for text in ("Add: 17 25. The answer is 42.", "Reverse: abc", "Hi")]
    width = max(map(len, rows))
    ids = torch.tensor([r + [smollm2_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    plans = []
    monkeypatch.setattr(packing, "plan", lambda *a, real=packing.plan: plans.append(real(*a)) or plans[-1])
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask).logits
        assert plans and plans[0].rows == 1, "the batch went through packed, as one row"
        # Explicit position ids are never repacked: this is the plain padded forward.
        padded = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(width).expand(3, width)).logits
    assert len(plans) == 1
    real = mask.bool()
    assert torch.allclose(packed[real], padded[real], atol=5e-3, rtol=1e-3)


@pytest.mark.integration
def test_smollm2_gguf_through_a_lora_sft_stage(run_recipe, tmp_path):
    """The real-model preset from the GGUF file: one LoRA SFT step, the adapter merged into the
    GGUF base (loaded again for the merge) and a plain safetensors checkpoint written."""
    from transformers import AutoModelForCausalLM

    path = shared("models", GGUF)
    _, (sft,) = run_recipe("sft", "model=smollm2", f"model.name_or_path={path.parent}", f"model.gguf_file={path.name}",
                           "sft.max_steps=1", "sft.global_batch_size=2", "eval.enabled=false")
    assert sft.parent_checkpoint == str(path.parent.resolve()) and sft.inputs["peft"]["base_gguf_file"] == path.name
    merged = AutoModelForCausalLM.from_pretrained(sft.checkpoint)
    assert merged.config.vocab_size == 49152 and (Path(sft.checkpoint) / "model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stages_sample_and_score_on_the_gpu(stories, run_recipe, monkeypatch):
    """On a GPU node every model a stage samples from or scores with is on the GPU: pair sampling,
    evaluations, and all four PPO models with their rollout tensors."""
    from alignment.modeling import generation

    devices = []
    real = generation.generate_ids
    monkeypatch.setattr(generation, "generate_ids", lambda model, *a, **k: devices.append(next(model.parameters()).device.type)
                        or real(model, *a, **k))
    run_recipe("sft_rm_ppo", "model=hf", f"model.name_or_path={stories}", "reward.max_steps=2", "reward.pairs.n_prompts=16",
               "ppo.num_rollouts=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.n_prompts=32",
               "sft.max_seq_tokens=128", "reward.max_seq_tokens=128")
    assert devices and set(devices) == {"cuda"}
