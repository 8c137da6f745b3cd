"""Padding-free forward passes: the transformer runs on real tokens only.

TRL's collators pad every batch to its longest sequence; on the task suite a third of the
positions are padding, and every layer pays for them. ``enable(model)`` hooks the model's
backbone (``model.base_model``: the decoder stack under the LM or score head) so that a right-
padded batch ``[B, L]`` is repacked, before the stack runs, into fewer rows of whole sequences
``[R, L]`` (first fit, longest first), with ``position_ids`` that restart at 0 for each sequence
and no attention mask. From those position ids transformers builds a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``; flash-attention kernels take them as varlen
boundaries), so no token attends across sequences. The output hidden states are scattered back
to ``[B, L, H]`` (zero at pads), so the heads, TRL's loss code and its metrics see the padded
layout they expect. The same sequences form the same batch: the loss is the padded one.

Nothing changes for calls that are not plain full-sequence forwards: generation (a KV cache),
explicit ``position_ids``, left padding, ``inputs_embeds``, or a request for per-layer states
all run the stack as it was. A model whose attention does not honour packed position ids would
mix sequences: ``enable`` runs a tiny forward both ways first and leaves the model as it was if
the two differ (the warning says so).

    python -m alignment.run +recipe=sft_then_dpo model.padding_free=false   # to compare
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

_HOOKED = "_alignment_padding_free"
_SHARES = "_alignment_share_prefixes"
_PLAN = "_alignment_pack_plan"
# A pair shares its prefix only from this many tokens: shorter ones save less than the 4D
# attention mask they need costs to build.
MIN_SHARED_TOKENS = 8
# Packed rows are this many times the batch's longest unit while that is short: sequences of
# about half the longest then pair up in a row. Wider rows waste less on the tail but cost more
# in dense (SDPA-mask) attention, which grows with rows x width^2 and dominates long rows;
# varlen flash attention does not care.
ROW_WIDTH_FACTOR = 2
WIDE_ROWS_UP_TO = 512  # tokens
# Attention implementations that take a custom 4D mask (a shared prefix needs one).
_MASKABLE = ("sdpa", "eager")
# Packed and padded outputs of the self-check agree to this (float32; bf16 needs the looser one).
_CHECK_ATOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class PackPlan:
    """Where each real token of a padded ``[B, L]`` batch sits in the packed ``[R, W]`` one.

    Packing copies one padded position into each used packed slot (``pack_*``); unpacking
    reads a packed slot for every real padded position (``unpack_*``), so a shared prefix is
    read by both rows of its pair (and its gradient is the sum of both).
    """

    batch: int
    length: int
    rows: int
    width: int
    pack_src: torch.Tensor  # flat positions in [B*L]...
    pack_dst: torch.Tensor  # ...copied to these flat slots of [R*W]
    unpack_src: torch.Tensor  # flat slots of [R*W]...
    unpack_dst: torch.Tensor  # ...read back into these flat positions of [B*L]
    position_ids: torch.Tensor  # [R, W]: 0.. per sequence; a row's tail is one more "sequence"
    attend: torch.Tensor | None  # [R, 1, W, W] bool, only when prefixes are shared


def _shared_prefixes(input_ids: torch.Tensor, mask: torch.Tensor, lengths: list[int]) -> list[int]:
    """Per row i of the first half, the tokens it shares with row i + B/2 from the start
    (TRL's pair collators put chosen rows first, rejected second); 0 below MIN_SHARED_TOKENS."""
    half = input_ids.shape[0] // 2
    same = (input_ids[:half] == input_ids[half:]) & mask[:half].bool() & mask[half:].bool()
    shared = same.int().cumprod(dim=1).sum(dim=1).tolist()
    return [n if n >= MIN_SHARED_TOKENS else 0 for n in shared]


def plan(attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None) -> PackPlan | None:
    """How to pack a right-padded batch into fewer rows; None if that saves nothing (no padding
    and no shared prefix) or the mask is not right padding (left padding, holes).

    With ``input_ids`` (and an even batch), row i and row i + B/2 that start with the same
    MIN_SHARED_TOKENS or more tokens are laid out once as [prefix | rest of i | rest of i + B/2],
    the second rest attending to the prefix but not to the first (``attend``).
    """
    batch, length = attention_mask.shape
    lengths_t = attention_mask.sum(dim=1)
    positions = torch.arange(length, device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths_t[:, None]):
        return None
    lengths = lengths_t.tolist()
    shared = [0] * batch
    if input_ids is not None and batch % 2 == 0:
        shared[: batch // 2] = _shared_prefixes(input_ids, attention_mask, lengths)
    # Units: one sequence, or a pair sharing a prefix: (first row, second row or None, shared).
    half = batch // 2
    units = [(i, None, 0) for i in range(batch) if not (shared[i] or (i >= half and shared[i - half]))]
    units += [(i, i + half, shared[i]) for i in range(half) if shared[i]]
    size = [lengths[a] + (lengths[b] - n if b is not None else 0) for a, b, n in units]
    longest = max([length, *size])
    width = longest * (ROW_WIDTH_FACTOR if longest <= WIDE_ROWS_UP_TO else 1)
    rows: list[list[int]] = []  # unit ids per row
    free: list[int] = []
    for u in sorted(range(len(units)), key=lambda u: -size[u]):  # first fit, longest first
        for r, space in enumerate(free):
            if size[u] <= space:
                rows[r].append(u)
                free[r] -= size[u]
                break
        else:
            rows.append([u])
            free.append(width - size[u])
    if len(rows) * width >= batch * length and not any(shared):  # no position saved
        return None
    # Pieces: contiguous runs of tokens, (first slot, count, source row or -1 for a row's tail,
    # first position, second reader: the pair's second row for a shared prefix, else -1).
    pieces = []
    blocks = []  # per unit and tail: (row, first slot, end slot, hidden) in row-local slots; hidden:
    # the (second rest, first rest) rectangle a pair's second row must not see
    for r, unit_ids in enumerate(rows):
        at = r * width
        for u in unit_ids:
            a, b, n = units[u]
            runs = [(a, 0, lengths[a], -1)] if b is None else [(a, 0, n, b), (a, n, lengths[a], -1), (b, n, lengths[b], -1)]
            start = at
            for row, lo, hi, second in runs:
                pieces.append((at, hi - lo, row, lo, second))
                at += hi - lo
            rest = None if b is None else (start + lengths[a] - r * width, at - r * width, start + n - r * width)
            blocks.append((r, start - r * width, at - r * width, rest))
        pieces.append((at, (r + 1) * width - at, -1, 0, -1))
        blocks.append((r, at - r * width, width, None))
    device = attention_mask.device
    slot, count, row, first, second = (torch.tensor(c, dtype=torch.long) for c in zip(*pieces))
    real, shared_prefix = row >= 0, second >= 0
    pack_src = _ranges(row[real] * length + first[real], count[real])
    pack_dst = _ranges(slot[real], count[real])
    unpack_src = torch.cat([pack_dst, _ranges(slot[shared_prefix], count[shared_prefix])])
    unpack_dst = torch.cat([pack_src, _ranges(second[shared_prefix] * length + first[shared_prefix], count[shared_prefix])])
    every_slot = _ranges(slot, count)
    position_ids = torch.empty(len(rows) * width, dtype=torch.long)
    position_ids[every_slot] = _ranges(first, count)
    attend = None
    if any(shared):  # causal blocks per unit (and per tail), less each pair's hidden rectangle
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        attend = torch.zeros(len(rows), 1, width, width, dtype=torch.bool, device=device)
        for r, lo, hi, rest in blocks:
            attend[r, 0, lo:hi, lo:hi] = causal[: hi - lo, : hi - lo]
            if rest is not None:  # rows of the second rest, columns of the first rest
                first_rest_end, second_rest_end, first_rest_start = rest
                attend[r, 0, first_rest_end:second_rest_end, first_rest_start:first_rest_end] = False
    return PackPlan(batch, length, len(rows), width, pack_src.to(device), pack_dst.to(device), unpack_src.to(device),
                    unpack_dst.to(device), position_ids.view(len(rows), width).to(device), attend)


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``cat([arange(s, s + c) for s, c in zip(starts, counts)])``, without the Python loop."""
    if counts.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    offsets = starts - (counts.cumsum(0) - counts)
    return torch.repeat_interleave(offsets, counts) + torch.arange(int(counts.sum()))


def pack(values: torch.Tensor, p: PackPlan, *, fill: int | float = 0) -> torch.Tensor:
    """``[B, L, ...]`` -> ``[R, W, ...]`` following the plan; slots no token takes hold ``fill``."""
    flat = values.reshape(p.batch * p.length, *values.shape[2:])
    out = flat.new_full((p.rows * p.width, *values.shape[2:]), fill)
    out = out.index_copy(0, p.pack_dst, flat.index_select(0, p.pack_src))
    return out.view(p.rows, p.width, *values.shape[2:])


def unpack(values: torch.Tensor, p: PackPlan) -> torch.Tensor:
    """``[R, W, ...]`` -> ``[B, L, ...]``, zeros at the pads (differentiable; a shared prefix's
    gradient is summed over the rows that read it)."""
    flat = values.reshape(p.rows * p.width, *values.shape[2:])
    out = flat.new_zeros((p.batch * p.length, *values.shape[2:]))
    out = out.index_copy(0, p.unpack_dst, flat.index_select(0, p.unpack_src))
    return out.view(p.batch, p.length, *values.shape[2:])


def attention_mask_for(p: PackPlan, stack: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The 4D mask a shared-prefix plan needs, in the form the attention implementation takes
    (SDPA: boolean; eager: additive); None for a plain plan (position ids are enough)."""
    if p.attend is None:
        return None
    if stack.config._attn_implementation == "eager":
        return torch.zeros(p.attend.shape, dtype=dtype, device=p.attend.device).masked_fill(~p.attend, torch.finfo(dtype).min)
    return p.attend


def _before(module: nn.Module, args: tuple, kwargs: dict):
    setattr(module, _PLAN, None)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    if (input_ids is None or mask is None or input_ids.dim() != 2 or len(args) > 1 or kwargs.get("use_cache")
            or any(kwargs.get(k) is not None for k in ("position_ids", "past_key_values", "inputs_embeds"))
            or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")):
        return None
    p = plan(mask, input_ids if getattr(module, _SHARES, False) else None)
    if p is None:
        return None
    setattr(module, _PLAN, p)
    pad_id = getattr(module.config, "pad_token_id", None) or 0
    dtype = next(module.parameters()).dtype
    kwargs = {**kwargs, "input_ids": pack(input_ids, p, fill=pad_id), "attention_mask": attention_mask_for(p, module, dtype),
              "position_ids": p.position_ids, "use_cache": False}
    return (), kwargs


def _after(module: nn.Module, args: tuple, kwargs: dict, output):
    p = getattr(module, _PLAN, None)
    if p is None:
        return None
    setattr(module, _PLAN, None)
    output.last_hidden_state = unpack(output.last_hidden_state, p)
    return output


def backbone(model: nn.Module) -> nn.Module | None:
    """The decoder stack under the heads (through a peft wrapper), or None if there is none."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    stack = getattr(inner, "base_model", None)
    return stack if isinstance(stack, nn.Module) and stack is not inner else None


def enable(model: nn.Module, *, check: bool = True) -> bool:
    """Hook ``model``'s backbone for padding-free forwards; True if it now packs.

    With ``check``, two short sequences are run padded and packed first (and a pair sharing a
    prefix, for attention that takes a 4D mask): a model whose outputs differ (attention that
    ignores packed position ids) is left as it was, and one whose shared-prefix outputs differ
    packs without sharing.
    """
    stack = backbone(model)
    if stack is None or getattr(stack, _HOOKED, False):
        return stack is not None
    partitioned = any(hasattr(p, "ds_id") for p in stack.parameters())  # ZeRO-3 shards: no forward outside the engine
    if check and not partitioned and not _packs_correctly(stack, share=False):
        log.warning("padding-free forwards off for %s: its attention does not separate packed sequences "
                    "(set model.attn_implementation=sdpa or flash_attention_2, or model.padding_free=false)",
                    type(model).__name__)
        return False
    share = stack.config._attn_implementation in _MASKABLE
    if share and check and not partitioned:
        share = _packs_correctly(stack, share=True)
    stack.register_forward_pre_hook(_before, with_kwargs=True)
    stack.register_forward_hook(_after, with_kwargs=True)
    setattr(stack, _HOOKED, True)
    setattr(stack, _SHARES, share)
    return True


def is_enabled(model: nn.Module) -> bool:
    stack = backbone(model)
    return stack is not None and getattr(stack, _HOOKED, False)


@torch.no_grad()
def _packs_correctly(stack: nn.Module, *, share: bool) -> bool:
    """The same hidden states padded and packed? Rows of 12, 5 and 3 tokens (packed into one
    row), or with ``share`` two rows that begin with the same MIN_SHARED_TOKENS tokens."""
    param = next(stack.parameters())
    vocab = getattr(stack.config, "vocab_size", 2)
    n = MIN_SHARED_TOKENS + 4
    ids = torch.randint(1, max(2, vocab), (3, n), generator=torch.Generator().manual_seed(0)).to(param.device)
    if share:
        ids = ids[:2]
        ids[1, :MIN_SHARED_TOKENS] = ids[0, :MIN_SHARED_TOKENS]
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
    else:
        mask = (torch.arange(n, device=param.device)[None] < torch.tensor([[n], [5], [3]], device=param.device)).long()
    p = plan(mask, ids if share else None)
    if p is None:
        return False
    was_training = stack.training
    stack.eval()
    try:
        padded = stack(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        packed = stack(input_ids=pack(ids, p), attention_mask=attention_mask_for(p, stack, param.dtype),
                       position_ids=p.position_ids, use_cache=False).last_hidden_state
    finally:
        stack.train(was_training)
    real = mask.bool()
    # Relative to the largest activation: a deep real model's hidden states reach tens (SmolLM2-135M:
    # 44, with a 4e-4 float32 difference between the two layouts), while attention that crosses
    # sequences differs by the same order as the activations themselves.
    atol = _CHECK_ATOL.get(padded.dtype, 1e-3)
    padded, packed = padded[real].float(), unpack(packed, p)[real].float()
    tolerance = atol * max(1.0, padded.abs().max().item())
    return bool((packed - padded).abs().max() <= tolerance)
