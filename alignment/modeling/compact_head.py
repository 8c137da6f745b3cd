"""TRL's fused LM head, scoring only the positions that have a label on every device.

TRL's SFT and DPO trainers replace the model's ``forward`` with a fused head
(``trl.trainer.utils.add_fused_lm_head``) that computes per-token log-probabilities in tiles
instead of materialising the logits. On CUDA it scores only positions whose label is not -100;
elsewhere it scores every position (prompt and padding included) and zeroes the ignored ones,
to keep tile shapes fixed for compilers that recompile per shape. Our runs are eager, so on CPU
that is pure waste: in DPO on the task suite about nine positions in ten are prompt or padding.

``score_labelled_only(trainer)`` wraps the forwards TRL patched (policy and reference) so that
each call takes TRL's own compact branch: same kernel, same outputs, fewer rows. This leans on two
TRL internals (alignment/compat.py checks them at start-up); without them the model is left alone
and the log says so. The stage skeleton calls it right after building the trainer
(alignment/stages/common.py), where a reader of a stage sees it.
"""

from __future__ import annotations

import functools
import logging

from torch import nn

from alignment.compat import FUSED_FORWARD_NAME, trl_use_triton_switch

log = logging.getLogger(__name__)
# The switch TRL's fused forward reads, per call, to choose its compact branch (None: absent).
_trl_utils = trl_use_triton_switch()

_WRAPPED = "_alignment_compact_head"


def _always_compact(device) -> bool:
    return True


def _compact_forward(fused):
    @functools.wraps(fused)
    def forward(*args, **kwargs):
        if not kwargs.get("fused_lm_head"):
            return fused(*args, **kwargs)
        saved = _trl_utils._use_triton
        _trl_utils._use_triton = _always_compact
        try:
            return fused(*args, **kwargs)
        finally:
            _trl_utils._use_triton = saved

    return forward


def _fused_owner(model: nn.Module | None) -> nn.Module | None:
    """The module whose ``forward`` TRL replaced (the base model under a peft wrapper)."""
    if model is None:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = vars(inner).get("forward")
    code = getattr(getattr(fused, "__func__", fused), "__code__", None)  # TRL's wrapper keeps the model's forward's name
    return inner if code is not None and code.co_name == FUSED_FORWARD_NAME else None


def score_labelled_only(trainer) -> int:
    """Make the trainer's fused LM heads (model and reference) score labelled positions only;
    returns how many it wrapped."""
    if _trl_utils is None:
        log.info("fused LM head left as it is: this TRL has no trl.trainer.utils._use_triton")
        return 0
    wrapped = 0
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        owner = _fused_owner(model)
        if owner is None or getattr(owner, _WRAPPED, False):
            continue
        owner.forward = _compact_forward(vars(owner)["forward"])
        setattr(owner, _WRAPPED, True)
        wrapped += 1
    return wrapped
