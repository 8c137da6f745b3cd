"""The private TRL and transformers internals this project leans on, named once, checked at start-up.

None of these is public API; each one buys a speed-up or keeps a ZeRO-3 path correct, and a
library upgrade can rename it. ``alignment.run`` calls :func:`missing` before the first stage and
logs a warning per internal that is gone, saying what is lost, instead of losing it silently.
The tested versions are the ranges in pyproject.toml.

- ``trl.trainer.utils._use_triton``: the per-call switch TRL's fused LM head reads to score only
  labelled positions (alignment/modeling/compact_head.py). Without it every position is scored.
- ``_fused_forward``: the name of the forward TRL's ``add_fused_lm_head`` installs, which is how
  compact_head finds the forward to wrap.
- ``transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref``: transformers partitions
  every model loaded while a ZeRO-3 TrainingArguments is alive; alignment/scale/distributed.py
  clears it around loads that must stay whole (models sampled from or evaluated).
- ``PretrainedConfig._attn_implementation``: which attention kernel a model runs, which decides
  how padding-free forwards express a shared prompt (alignment/modeling/packing.py).
- ``trainer._metrics``: where TRL's trainers count trained tokens (SFT's ``train_tokens`` metric).
- ``trl.models.utils.add_hooks/remove_hooks``: DeepSpeed's ZeRO-3 fetch hooks, removed while PPO
  samples from gathered weights.
- ``DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)``: overridden so
  that sampled pairs train on their own token ids (alignment/stages/dpo.py). Without it DPO
  cannot run on sampled pairs: a stop, not a slowdown.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional

from alignment.config import AlignmentConfig

FUSED_FORWARD_NAME = "_fused_forward"


def trl_use_triton_switch() -> Optional[object]:
    """``trl.trainer.utils`` when it has the ``_use_triton`` switch, else None."""
    try:
        utils = importlib.import_module("trl.trainer.utils")
    except ImportError:
        return None
    return utils if callable(getattr(utils, "_use_triton", None)) else None


def _fused_forward_named() -> bool:
    try:
        utils = importlib.import_module("trl.trainer.utils")
        source = inspect.getsource(utils.add_fused_lm_head)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return f"def {FUSED_FORWARD_NAME}(" in source


def _hf_deepspeed_weak_ref() -> bool:
    try:
        module = importlib.import_module("transformers.integrations.deepspeed")
    except ImportError:
        return False
    return all(hasattr(module, name) for name in ("_hf_deepspeed_config_weak_ref", "set_hf_deepspeed_config",
                                                   "unset_hf_deepspeed_config"))


def _attn_implementation() -> bool:
    from transformers import PretrainedConfig

    return hasattr(PretrainedConfig(), "_attn_implementation")


def _trainer_metrics() -> bool:
    try:
        from trl import SFTTrainer

        return "self._metrics" in inspect.getsource(SFTTrainer)
    except (ImportError, OSError, TypeError):
        return False


def _dpo_prepare_dataset() -> bool:
    try:
        from trl import DPOTrainer

        params = list(inspect.signature(DPOTrainer._prepare_dataset).parameters)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return params == ["self", "dataset", "processing_class", "args", "dataset_name"]


def _zero3_hooks() -> bool:
    try:
        utils = importlib.import_module("trl.models.utils")
    except ImportError:
        return False
    return callable(getattr(utils, "add_hooks", None)) and callable(getattr(utils, "remove_hooks", None))


# (what it is, which runs need it, what is lost without it, the check)
_CHECKS: tuple[tuple[str, Callable[[AlignmentConfig], bool], str, Callable[[], bool]], ...] = (
    ("trl.trainer.utils._use_triton", lambda cfg: bool({"sft", "dpo"} & set(cfg.stages)),
     "TRL's fused LM head scores every prompt and pad position (slower SFT/DPO steps)", lambda: trl_use_triton_switch() is not None),
    (f"TRL's fused forward named {FUSED_FORWARD_NAME}", lambda cfg: bool({"sft", "dpo"} & set(cfg.stages)),
     "the compact LM head cannot find TRL's fused forward (slower SFT/DPO steps)", _fused_forward_named),
    ("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", lambda cfg: cfg.deepspeed.zero_stage == 3,
     "models loaded during a ZeRO-3 stage for sampling or evaluation may come out partitioned", _hf_deepspeed_weak_ref),
    ("PretrainedConfig._attn_implementation", lambda cfg: cfg.model.padding_free,
     "padding-free forwards cannot tell the attention kernel", _attn_implementation),
    ("trainer._metrics (TRL)", lambda cfg: "sft" in cfg.stages, "SFT's train_tokens metric is not recorded", _trainer_metrics),
    ("trl.models.utils.add_hooks/remove_hooks", lambda cfg: cfg.deepspeed.zero_stage == 3 and "ppo" in cfg.stages,
     "PPO sampling under ZeRO-3 gathers every layer at every generated token", _zero3_hooks),
    ("DPOTrainer._prepare_dataset(dataset, processing_class, args, dataset_name)", lambda cfg: "dpo" in cfg.stages,
     "DPO on sampled pairs cannot keep their token ids (TRL would re-tokenize their text)", _dpo_prepare_dataset),
)


def missing(cfg: AlignmentConfig) -> list[str]:
    """One line per private internal this run would use that the installed libraries lack."""
    return [f"{name} is missing in the installed TRL/transformers: {lost}"
            for name, needed, lost, present in _CHECKS if needed(cfg) and not present()]
