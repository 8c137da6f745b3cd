"""PPO's rollouts through vLLM, by the class TRL's GRPO and RLOO use (trl.generation.VLLMGeneration).

vLLM needs a GPU, so here ``vllm.LLM`` is replaced by :class:`FakeLLM`: the part of vLLM's API
that VLLMGeneration calls (the constructor, ``generate``, ``load_weights`` under
``llm_engine.model_executor.driver_worker.model_runner.model``, ``reset_prefix_cache``), backed
by an HF model loaded from the same path. Everything else is the real code: TRL's weight sync
(LoRA merge, parameter names), our process layout and the PPO stage. What this cannot show is
vLLM itself; on a GPU, ``ppo.use_vllm=true`` runs the real engine.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import trl.generation.vllm_generation as trl_vllm
from alignment.config import AlignmentConfig, ModelConfig
from alignment.modeling import lora
from alignment.modeling.embedded import build_model, build_tokenizer
from alignment.modeling.generation import render_prompts
from alignment.modeling.rollout_engine import VLLMRollouts
from conftest import TINY
from test_pipeline import PPO, RM


class FakeLLM:
    """vllm.LLM as VLLMGeneration drives it, generating with an HF copy of the model."""

    instances: list["FakeLLM"] = []

    def __init__(self, *, model: str, **kwargs):
        self.kwargs, self.calls, self.syncs, self.generated_tokens = kwargs, [], 0, 0
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.eos = self.model.config.eos_token_id
        runner = SimpleNamespace(model=SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))
        FakeLLM.instances.append(self)

    def _load_weights(self, weights):
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if name not in params:  # vLLM's loader would fail on a name it does not know, too
                raise KeyError(f"vLLM has no parameter {name!r}")
            params[name].data.copy_(tensor)
            self.syncs += 1

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, *, sampling_params, use_tqdm):
        self.calls.append([p["prompt_token_ids"] for p in prompts])
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                          temperature=sampling_params.temperature, max_new_tokens=sampling_params.max_tokens,
                                          pad_token_id=self.eos, eos_token_id=self.eos)
            completion = out[0, ids.size(1):].tolist()
            self.generated_tokens += len(completion[: completion.index(self.eos) + 1] if self.eos in completion else completion)
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"],
                                           outputs=[SimpleNamespace(token_ids=completion, logprobs=None)]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.instances = []
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # VLLMGeneration sets them
        monkeypatch.setenv(name, "0")  # remembered as unset, restored so after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(trl_vllm, "is_vllm_available", lambda: True)
    monkeypatch.setattr(trl_vllm, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(trl_vllm, "SamplingParams", lambda **kw: SimpleNamespace(**kw), raising=False)
    return FakeLLM


class _Engine:
    """What VLLMRollouts needs of PPO's engine: the policy's weights, whole, around the sync."""

    def __init__(self, policy):
        self.policy = policy

    @contextlib.contextmanager
    def sampling_policy(self):
        yield self.policy


def _saved_policy(tmp_path):
    tok = build_tokenizer()
    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    model.save_pretrained(tmp_path / "start")
    tok.save_pretrained(tmp_path / "start")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "start"), tok


@pytest.mark.parametrize("peft", [False, True])
def test_every_rollout_samples_from_the_policys_current_weights(tmp_path, fake_vllm, peft):
    """After the policy changes, the next rollout's engine holds exactly its weights (with LoRA:
    base plus merged adapter, the adapter itself left unmerged in the policy), and replies come
    back cut after their first EOS."""
    policy, tok = _saved_policy(tmp_path)
    if peft:
        policy = lora.attach(policy, AlignmentConfig(model=ModelConfig(peft="lora")), task=lora.CAUSAL_LM, adapter=None)
    sampler = VLLMRollouts(policy, tok, temperature=1.0, max_new_tokens=6, max_model_tokens=64, gpu_memory_utilization=0.3)
    llm = fake_vllm.instances[-1]
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["max_model_len"] == 64
    prompts = render_prompts(tok, [[{"role": "user", "content": q}] for q in ("Add: 2 3", "Reverse: ab")])
    for _ in range(2):
        with torch.no_grad():
            for p in policy.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)  # a training step
        replies = sampler.sample(_Engine(policy), prompts)
        expected = copy.deepcopy(policy).merge_and_unload() if peft else policy
        engine_state = dict(llm.model.named_parameters())
        for name, value in expected.named_parameters():
            assert torch.equal(engine_state[name], value), name
        assert llm.calls[-1] == prompts
        assert len(replies) == 2 and all(tok.eos_token_id not in r[:-1] for r in replies)


def test_ppo_trains_on_the_vllm_engines_rollouts(run_recipe, fake_vllm, monkeypatch):
    """``ppo.use_vllm=true`` through the whole stage: one engine, synced before each of the
    rollouts, and every token PPO counts as generated came from it. The config check that
    asks for a GPU is the one thing switched off."""
    import alignment.config_checks

    monkeypatch.setattr(alignment.config_checks, "_check_vllm", lambda stage_cfg, stage: None)
    _, (_, _, ppo) = run_recipe("sft_rm_ppo", *RM, *PPO, "ppo.use_vllm=true", "ppo.max_new_tokens=8")
    (llm,) = fake_vllm.instances
    assert len(llm.calls) == 2 and all(len(c) == 16 for c in llm.calls)  # two rollouts of 16 prompts
    assert llm.syncs >= 2 * len(list(AutoModelForCausalLM.from_pretrained(ppo.checkpoint).parameters()))
    assert sum(h["tokens/generated"] for h in ppo.metrics["history"]) == llm.generated_tokens


def test_ppo_use_vllm_on_cpu_says_what_it_needs():
    from alignment.errors import StageError
    from alignment.run import compose_config

    if torch.cuda.is_available():
        pytest.skip("the message without a GPU")
    with pytest.raises(StageError, match=r"ppo\.use_vllm=true needs a CUDA GPU"):
        compose_config(["+recipe=sft_rm_ppo", *TINY, "ppo.use_vllm=true"])
