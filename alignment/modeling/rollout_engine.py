"""Where the online stages sample their training replies: HF ``generate``, or vLLM on a GPU.

GRPO and RLOO hand ``use_vllm`` to TRL's trainers, which then sample through
``trl.generation.vllm_generation.VLLMGeneration`` in colocate mode: one vLLM engine per process
on that process's GPU, its weights replaced by the policy's after every update. PPO's rollouts go
through the same class (:class:`VLLMRollouts`), so one installed engine speeds up every online
stage and a fix in TRL's weight sync (LoRA merge, ZeRO-3 gather) reaches PPO too. Without vLLM,
PPO samples with :func:`alignment.modeling.generation.generate_ids`, the path evaluation and pair
sampling use.

VLLMGeneration asks an ``accelerate.Accelerator`` for the process layout; PPO runs its own loop
without one, so :class:`_ProcessLayout` answers those few questions from the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE). ZeRO-3's gather happens around the sync, in
``engine.sampling_policy()``, so TRL sees whole weights and gathers nothing itself.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from alignment.modeling.generation import cut_after_eos, generate_ids
from alignment.scale import distributed


class RolloutEngine(Protocol):
    def sample(self, engine, prompt_ids: list[list[int]]) -> list[list[int]]:
        """One reply's token ids per prompt from ``engine``'s current policy, cut after the first EOS."""


class HFRollouts:
    """``model.generate`` on the policy itself (its weights gathered under ZeRO-3)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, temperature: float, max_new_tokens: int):
        self.tokenizer, self.temperature, self.max_new_tokens = tokenizer, temperature, max_new_tokens

    def sample(self, engine, prompt_ids: list[list[int]]) -> list[list[int]]:
        with engine.sampling_policy() as policy:
            device = next(policy.parameters()).device
            return generate_ids(policy, self.tokenizer, prompt_ids, temperature=self.temperature,
                                max_new_tokens=self.max_new_tokens, device=device)


class _ProcessLayout:
    """What VLLMGeneration reads from an Accelerator, for a loop that has none."""

    state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None)  # gathering is done by the caller

    def __init__(self):
        self.process_index = distributed.rank()
        self.num_processes = distributed.world_size()
        self.local_process_index = distributed.device().index or 0
        self.is_main_process = distributed.is_main()
        self.device = distributed.device()

    def wait_for_everyone(self) -> None:
        distributed.barrier()


class VLLMRollouts:
    """vLLM colocated on this process's GPU, through TRL's VLLMGeneration. It starts from the
    policy's ``name_or_path`` (the stage's starting checkpoint) and takes the policy's current
    weights (LoRA merged, by TRL) before every rollout."""

    def __init__(self, policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, temperature: float, max_new_tokens: int,
                 max_model_tokens: int, gpu_memory_utilization: float):
        from trl.generation.vllm_generation import VLLMGeneration

        self.eos = tokenizer.eos_token_id
        self.vllm = VLLMGeneration(policy, _ProcessLayout(), tokenizer, mode="colocate", temperature=temperature, top_p=1.0, top_k=0,
                                   max_completion_length=max_new_tokens, max_model_length=max_model_tokens,
                                   gpu_memory_utilization=gpu_memory_utilization, logprobs=None)

    def sample(self, engine, prompt_ids: list[list[int]]) -> list[list[int]]:
        with engine.sampling_policy():
            self.vllm.sync_weights()
        _, completions, _, _ = self.vllm.generate(prompt_ids, images=None, num_generations=1)
        return [cut_after_eos(c, self.eos) for c in completions]


def rollout_engine(policy: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, use_vllm: bool, temperature: float,
                   max_new_tokens: int, max_model_tokens: int, gpu_memory_utilization: float) -> RolloutEngine:
    if use_vllm:
        return VLLMRollouts(policy, tokenizer, temperature=temperature, max_new_tokens=max_new_tokens,
                            max_model_tokens=max_model_tokens, gpu_memory_utilization=gpu_memory_utilization)
    return HFRollouts(tokenizer, temperature=temperature, max_new_tokens=max_new_tokens)
