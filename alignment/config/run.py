"""How a run is evaluated, launched and tracked: the ``eval``, ``deepspeed``, ``launcher`` and ``logger`` groups.

Part of the typed schema of alignment/config/ (whose __init__ registers and re-exports them); kept apart
because nothing here depends on the stages' configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class EvalConfig:
    """Evaluation after every stage on the held-out prompts."""

    enabled: bool = True
    n_prompts: Optional[int] = None  # None: every held-out prompt
    samples_per_prompt: int = 4  # sampled accuracy uses this many samples at `temperature`
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64  # sequences per generate() call
    eval_start_model: bool = True  # also evaluate the model the first stage starts from
    # General ability after every stage: perplexity per token on plain text (.txt, or .json/.jsonl
    # rows with a "text" field; alignment/data/plain_text.py), one figure per source and overall.
    # Use text no stage trains on. Each source is cut to its first lm_text_max_tokens tokens, in
    # windows of lm_text_window_tokens (the first token of a window is context, not scored).
    lm_text: List[str] = field(default_factory=list)
    lm_text_window_tokens: int = 256
    lm_text_max_tokens: int = 20000


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO for every stage (conf/deepspeed/: none, zero1, zero2, zero3, zero3_offload).

    Stage 1 shards optimizer states, 2 also gradients, 3 also the parameters; offload moves
    optimizer states (and with ``offload_params`` the parameters) to CPU memory. The DeepSpeed
    JSON is built from this and the stage's TrainConfig (alignment/scale/distributed.py), so batch
    sizes, learning rate and clipping are said once, here.
    """

    zero_stage: int = 0  # 0: no DeepSpeed (plain data parallel when there are several processes)
    offload_optimizer: bool = False
    offload_params: bool = False  # stage 3 only
    # With offload_optimizer: DeepSpeed's CPU Adam steps the offloaded states (a compiled extension,
    # built on first use unless DeepSpeed was installed with DS_BUILD_CPU_ADAM=1; faster than torch's
    # AdamW on CPU tensors). Off by default: no run here has used it yet (the build did not finish on
    # the 2-core test machine), so torch's AdamW steps the offloaded states unless asked.
    cpu_adam: bool = False
    # Overlap gradient reduction with the backward pass. None: on with CUDA (NCCL streams), off on
    # CPU (gloo has no separate stream to overlap on).
    overlap_comm: Optional[bool] = None
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction (DeepSpeed's default)
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather (ZeRO 1-2)
    # ZeRO-3: gathered parameters a rank keeps alive (elements), and how soon (in elements fetched)
    # a parameter must be reused to stay gathered. DeepSpeed's defaults (1e9 each) keep a model
    # under a billion parameters gathered whole through each step; lower both (e.g. to the largest
    # layer's size) when per-rank memory matters more than re-gathering.
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000


@dataclass
class LauncherConfig:
    """How the run is started (conf/launcher/: local, slurm).

    ``local`` runs ``nproc_per_node`` processes on this machine (one when 1), or one node of a
    multi-node run with ``nnodes``/``node_rank`` and the rendezvous ``master_addr:master_port``.
    ``slurm`` writes an sbatch script from slurm/job.sbatch into the run directory and submits it.
    """

    name: str = "local"  # local | slurm
    nproc_per_node: int = 1  # processes on this node (one per GPU)
    nnodes: int = 1
    node_rank: Optional[int] = None  # None: $SLURM_NODEID inside a Slurm job, else 0
    master_addr: str = "127.0.0.1"  # rank 0's host, reachable from every node
    master_port: int = 29500
    # Slurm (launcher=slurm): one launcher per node, gpus_per_node processes each.
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job with cpu_procs_per_node processes per node
    cpu_procs_per_node: int = 1
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # e.g. 200G
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "24:00:00"
    constraint: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)  # extra "#SBATCH" lines, e.g. ["--qos=high"]
    signal_seconds: int = 300  # Slurm sends USR1 this long before the time limit
    requeue: bool = True  # on the signal: checkpoint, then requeue the job
    dry_run: bool = False  # only write and print the script
    template: Optional[str] = None  # an sbatch template of your own; None: the shipped one


@dataclass
class WandbConfig:
    """Weights & Biases (logger=wandb, or logger=auto, the default): one W&B run per stage.

    The API key comes from WANDB_API_KEY or ~/.netrc (``wandb login``). With neither, or when
    the W&B host does not answer within ``probe_timeout_seconds``, the run records offline under
    ``<run dir>/wandb/`` and ``wandb sync <dir>`` uploads it later.
    """

    project: str = "alignment"
    entity: Optional[str] = None  # None: the API key's default entity
    # offline or disabled: that mode. online or None: online when an API key is configured and
    # the host answers, else offline (with None, WANDB_MODE=offline|disabled is honoured).
    mode: Optional[str] = None
    base_url: Optional[str] = None  # None: WANDB_BASE_URL, else https://api.wandb.ai
    # Discouraged: a key here can end up in shell history and process listings. Prefer
    # WANDB_API_KEY. It is redacted from every file the run writes.
    api_key: Optional[str] = None
    # Checkpoints are logged as artifacts by reference (file:// paths and checksums, no upload);
    # true uploads the weights as well.
    upload_checkpoints: bool = False
    dir: Optional[str] = None  # where W&B's files go (it adds wandb/); None: the run directory
    probe_timeout_seconds: float = 3.0  # reachability check before going online
    init_timeout_seconds: float = 60.0  # wandb.init's own limit; on timeout the stage goes offline


@dataclass
class LoggerConfig:
    """Experiment tracking for every stage (conf/logger/: auto, wandb, tensorboard, none).

    ``auto`` (the default) is W&B: online when an API key is configured, otherwise offline
    files in the run directory, never a prompt. ``tensorboard`` writes event files to
    ``<run dir>/tensorboard/<stage>/`` (pip install 'alignment[tensorboard]'); ``none`` logs
    nothing. See alignment/tracking/metric_names.py for the metric names.
    """

    name: str = "auto"  # auto | wandb | tensorboard | none
    tags: List[str] = field(default_factory=list)  # added to the recipe, model and data tags
    wandb: WandbConfig = field(default_factory=WandbConfig)
