"""Several processes, one pipeline: rank helpers, the DeepSpeed config, gathered ZeRO-3 weights.

The launcher (alignment/scale/launch.py, or srun under Slurm) starts one process per device with the
usual torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
Every rank runs the whole pipeline: the same skip decisions, sampled pairs, pre-flight and
evaluations (rank 0 decides or computes them and broadcasts: :func:`on_rank_zero`), the same
trainer steps on its shard of each batch. Only rank 0 writes records and checkpoints.

The process group is gloo on CPU and nccl on GPUs; transformers' Trainer and DeepSpeed find it
already initialised and use it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from alignment.config import DeepSpeedConfig

T = TypeVar("T")
_alone = {"now": False}  # rank 0 inside on_rank_zero: no collective may be entered


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when launched with several processes (no-op for one)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def device() -> torch.device:
    """The device this process trains and samples on: its GPU (``LOCAL_RANK``) when there is one,
    else the CPU. Every model a stage samples from or scores with is placed here."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where tensors for a collective must live: NCCL only reduces GPU tensors, gloo CPU ones."""
    return device() if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone, its result (or its exception) given to every rank.

    For sampling and evaluation: every rank must hold the same pairs and metrics, and sampling is
    not bit-identical across devices, so ranks that each sampled for themselves could disagree
    on a dataset's length and hang the trainer's first collective. Only for work with no
    collective inside: a model partitioned under ZeRO-3 is made whole first (:func:`gathered`).
    """
    if not dist.is_initialized():
        return compute()
    outcome: tuple[Any, Optional[BaseException]] = (None, None)
    if is_main():
        _alone["now"] = True  # any_rank inside (a stop check between sampling batches) asks no other rank
        try:
            outcome = (compute(), None)
        except Exception as err:  # every rank raises it, instead of the others waiting forever
            outcome = (None, err)
        finally:
            _alone["now"] = False
    result, error = broadcast(outcome)
    if error is not None:
        raise error
    return result


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: call it on all).
    Inside :func:`on_rank_zero`'s work, where rank 0 is alone, it is rank 0's own flag."""
    if not dist.is_initialized() or _alone["now"]:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def deepspeed_config(ds: DeepSpeedConfig) -> Optional[dict[str, Any]]:
    """The DeepSpeed JSON for a stage, or None without ZeRO.

    Batch sizes, clipping and precision stay "auto": transformers fills them in from the stage's
    TrainConfig (PPO resolves them itself), so there is no second place to keep in sync.
    """
    if ds.zero_stage == 0:
        return None
    cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": cuda if ds.overlap_comm is None else ds.overlap_comm,
                            "contiguous_gradients": True, "reduce_bucket_size": ds.reduce_bucket_size,
                            "allgather_bucket_size": ds.allgather_bucket_size}
    if ds.zero_stage == 3:
        # Full weights on rank 0 at save time: stage boundaries write ordinary HF checkpoints.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero.update(stage3_max_live_parameters=ds.max_live_parameters, stage3_max_reuse_distance=ds.max_reuse_distance)
    pin = torch.cuda.is_available()
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    out = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # Without CPU Adam, torch's AdamW (the Trainer's) steps the offloaded states.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    if uses_cpu_adam(ds):
        # DeepSpeed builds the optimizer (DeepSpeedCPUAdam, as the states are on the CPU); the
        # Trainer fills the "auto" values from the stage's config, PPO from its own.
        out["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return out


def uses_cpu_adam(ds: DeepSpeedConfig) -> bool:
    """DeepSpeed's CPU Adam steps the offloaded optimizer states (``deepspeed.cpu_adam``)."""
    return ds.zero_stage > 0 and ds.offload_optimizer and ds.cpu_adam


def is_zero3(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def zero3_init_config(ds: DeepSpeedConfig, *, dtype: str) -> Optional[dict[str, Any]]:
    """The DeepSpeed JSON that models are created partitioned with under ZeRO-3 (``deepspeed.zero.Init``), or None
    without ZeRO-3. Only its ZeRO section and precision matter there; the Trainer's "auto" batch
    values are not known yet (the trainer builds its engine from its own JSON later), so they get
    placeholders that DeepSpeed's parser accepts."""
    if ds.zero_stage != 3:
        return None
    out = deepspeed_config(ds)
    out.pop("optimizer", None)
    del out["train_batch_size"]  # DeepSpeed derives it (micro batch x accumulation x world)
    out.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=1.0,
               bf16={"enabled": dtype == "bfloat16"}, fp16={"enabled": dtype == "float16"})
    return out


@contextlib.contextmanager
def model_creation(zero3: Optional[dict[str, Any]]) -> Iterator[None]:
    """Inside, ``from_pretrained`` creates models partitioned over the ranks with the ZeRO-3 JSON
    ``zero3`` (:func:`zero3_init_config`): transformers runs the model's construction under
    ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig`` is alive, then loads the checkpoint one
    module at a time (that module's weights gathered, rank 0 copies the checkpoint's tensors in,
    DeepSpeed partitions them again), so no rank ever holds the whole model. With ``zero3``
    None, :func:`whole_loading`."""
    if zero3 is None:
        with whole_loading():
            yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    config = hf_deepspeed.HfDeepSpeedConfig(zero3)  # registers itself (a global weak reference)
    try:
        yield
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)
        del config


def partition(model: torch.nn.Module, zero3: Optional[dict[str, Any]]) -> torch.nn.Module:
    """``model`` (built whole) partitioned over the ranks as if it had been created under
    ``deepspeed.zero.Init`` with ``zero3``; unchanged when ``zero3`` is None."""
    if zero3 is not None and not is_zero3(model):
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=zero3)
    return model


def frozen_engine(model: torch.nn.Module, zero3: dict[str, Any]) -> torch.nn.Module:
    """A model that is never trained (PPO's reference and reward models) as a DeepSpeed ZeRO-3
    inference engine, as TRL's PPOTrainer prepared them: each rank keeps 1/world of the
    parameters and every forward gathers a layer's weights just before it runs, so every rank
    must run the same forwards (the rollout's scoring does). No optimizer, no gradients."""
    import deepspeed

    config = copy.deepcopy(zero3)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model.requires_grad_(False), config=config)
    engine.eval()  # DeepSpeed's eval() returns None, not the engine
    return engine


@contextlib.contextmanager
def gathered(*models: Optional[torch.nn.Module]) -> Iterator[None]:
    """Whole weights, on every rank, for each ZeRO-3-partitioned model of ``models`` (others, and
    None, pass as they are): for work that rank 0 runs alone (:func:`on_rank_zero`), which
    cannot take part in a per-layer gather. A collective: every rank enters it. A DeepSpeed
    engine's per-layer fetch hooks are removed meanwhile (they would release the gathered weights
    after each layer and gather them again, a collective rank 0 alone would wait on forever)."""
    partitioned = [m for m in models if m is not None and is_zero3(m)]
    if not partitioned:
        yield
        return
    import deepspeed

    params = list({id(p): p for m in partitioned for p in m.parameters()}.values())
    engines = [m for m in partitioned if isinstance(m, deepspeed.DeepSpeedEngine)]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        restores = [_lift_fetch_hooks(engine) for engine in engines]
        try:
            yield
        finally:
            for restore in restores:
                restore()


def _lift_fetch_hooks(engine) -> Callable[[], None]:
    """Remove a ZeRO-3 engine's forward hooks; returns the function that puts them back.

    TRL's ``remove_hooks`` lifts the per-module fetch and release hooks but leaves the root
    module's start-of-forward hook, which (until DeepSpeed has recorded a complete trace) checks
    that every rank ran the same modules: a collective in every forward. A rank running forwards
    alone, or ranks generating different numbers of tokens, would wait in it forever, so it is
    lifted too (DeepSpeed's ``fwd_pre_hook`` handle, a private attribute; re-registered first in
    line, where DeepSpeed registered it)."""
    from trl.models.utils import add_hooks, remove_hooks

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    root_hook = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]
    offload.fwd_pre_hook.remove()
    remove_hooks(engine)

    def restore() -> None:
        add_hooks(engine)
        offload.fwd_pre_hook = offload.module.register_forward_pre_hook(root_hook, prepend=True)

    return restore


@contextlib.contextmanager
def whole_loading() -> Iterator[None]:
    """``from_pretrained`` inside loads whole models even while a ZeRO-3 trainer exists.

    transformers partitions every model loaded while a ZeRO-3 TrainingArguments is alive (a
    global weak reference). The models loaded whole are those used on rank 0 alone or never
    trained: evaluation copies, pair labellers, a LoRA merge's base. The models a stage trains are
    created partitioned instead (:func:`model_creation`).
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    active = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if active is not None:
            hf_deepspeed.set_hf_deepspeed_config(active)


def unsharded(model: torch.nn.Module, path: str, *, loader) -> torch.nn.Module:
    """A whole copy of ``model`` for evaluation after training: under ZeRO-3 the weights are
    partitioned, so the committed checkpoint ``path`` is loaded back with ``loader`` (an Auto
    class); otherwise ``model`` itself."""
    if not is_zero3(model):
        return model
    with whole_loading():
        return loader.from_pretrained(path).eval()


def all_gather_cat(values: torch.Tensor) -> torch.Tensor:
    """Every rank's ``values`` (same shape on each), concatenated in rank order."""
    if not dist.is_initialized():
        return values
    moved = values.to(collective_device()).contiguous()
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(values.device)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over every rank (itself without a process group)."""
    if not dist.is_initialized():
        return values
    moved = values.to(collective_device()).clone()
    dist.all_reduce(moved)
    return moved.to(values.device)


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each float statistic averaged over ranks (same keys on every rank), so that logs, the KL
    controller and the health check see the whole batch and take the same decisions."""
    if not dist.is_initialized():
        return stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, float))
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(values)
    return {**stats, **{k: float(v) / dist.get_world_size() for k, v in zip(keys, values.tolist())}}


@contextlib.contextmanager
def generation_weights(engine, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Whole weights for sampling from a model being trained under ZeRO-3: gathered once for the
    whole generation, with DeepSpeed's per-layer fetch hooks removed meanwhile (as TRL does),
    which would otherwise gather and release every layer at every generated token."""
    if engine is None or not is_zero3(model):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        restore = _lift_fetch_hooks(engine)
        try:
            yield model
        finally:
            restore()
