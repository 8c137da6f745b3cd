"""The one command: compose a recipe's config, check it, run its stages.

    python -m alignment.run +recipe=sft_then_dpo                  # embedded model and task suite
    python -m alignment.run +recipe=sft_then_dpo dpo.beta=0.2 run_name=beta02
    python -m alignment.run +recipe=sft_then_dpo --cfg job        # print the composed config
    python -m alignment.run +recipe=sft_then_dpo --multirun dpo.beta=0.05,0.1
    python -m alignment.run +recipe=sft_then_dpo launcher.nproc_per_node=2 deepspeed=zero2
    python -m alignment.run +recipe=sft_then_dpo launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8

Recipes are the YAML files in ``recipes/``; config groups and their options live in ``conf/``
and their typed schemas in ``alignment/config/``. An unknown key, a wrong type or an unknown
recipe fails while Hydra composes the config, before anything is loaded.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from alignment import compat
from alignment.config import AlignmentConfig, register_schemas, shipped_dir
from alignment.config_checks import batch_plan, check_config
from alignment.errors import ConfigError, DataError, UserError
from alignment.scale import distributed, preemption
from alignment.scale.launch import launch, needs_launch
from alignment.tracking.redaction import install_log_filter, override_secret_values, redact_output, scrub_text_file, scrub_yaml_files, secret_values

log = logging.getLogger("alignment")
RECIPE_PACKAGE = "alignment.recipes"
_DATA_OPTIONS = ("suite", "file")
_STARTED = {"task": False}
# The exit code of a config or data error (as argparse and most CLIs use for bad usage); other
# errors a user can fix (a checkpoint, the disk) exit 1, a preempted stage PREEMPTED_EXIT.
USAGE_EXIT = 2


CONFIG_DIR = str(shipped_dir("alignment.conf", "conf"))


def register_recipes() -> list[str]:
    """Put every recipes/*.yaml into the ``recipe`` group, merged at the config's root."""
    cs = ConfigStore.instance()
    names = []
    for entry in sorted(shipped_dir(RECIPE_PACKAGE, "recipes").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            name = entry.name[: -len(".yaml")]
            cs.store(group="recipe", name=name, node=OmegaConf.create(entry.read_text(encoding="utf-8")), package="_global_")
            names.append(name)
    return names


def rewrite_data_shorthand(argv: list[str]) -> list[str]:
    """``data=/path/to/file.jsonl`` means ``data=file data.path=/path/to/file.jsonl``."""
    out = []
    for arg in argv:
        if arg.startswith("data=") and arg[len("data=") :] not in _DATA_OPTIONS:
            out += ["data=file", f"data.path={arg[len('data='):]}"]
        else:
            out.append(arg)
    return out


def typed_config(raw: DictConfig) -> AlignmentConfig:
    """The composed config as dataclasses, with the run name and recipe filled in."""
    if "hydra" in raw:
        without_hydra = OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"])
        raw = OmegaConf.merge(OmegaConf.structured(AlignmentConfig), without_hydra)  # type: ignore[assignment]
    try:
        cfg: AlignmentConfig = OmegaConf.to_object(raw)  # type: ignore[assignment]
    except MissingMandatoryValue as err:
        key = err.full_key
        raise ConfigError(f"config key '{key}' must be set (recipe {_recipe_choice()!r}): pass {key}=<value>") from None
    cfg.recipe = _recipe_choice()
    if cfg.run_name is None:
        cfg.run_name = _default_run_name(cfg.recipe)
    return cfg


def _recipe_choice() -> str | None:
    return HydraConfig.get().runtime.choices.get("recipe")


def _default_run_name(recipe: str | None) -> str:
    """The recipe's name; under --multirun, plus this job's values of the swept keys."""
    hydra_cfg = HydraConfig.get()
    name = recipe or "run"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        swept = _swept_keys(sys.argv[1:])
        values = [o for o in hydra_cfg.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
        name = f"{name}-" + (",".join(values).replace("/", "_") or str(hydra_cfg.job.num))
    return name


def _swept_keys(argv: list[str]) -> set[str]:
    """Keys the command line sweeps over: ``k=a,b`` or ``k=range(...)``/``choice(...)``/``glob(...)``."""
    keys = set()
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        top_level = value.split("[", 1)[0]  # a list value [a,b] is not a sweep
        if "," in top_level or value.startswith(("range(", "choice(", "glob(")):
            keys.add(key.lstrip("+~"))
    return keys


def set_threads(requested: int) -> int:
    """Torch threads for this process: two processes with two threads each on two cores can
    run a hundred times slower than one, so the default splits the cores between local ranks."""
    import torch

    requested = threads_per_process(requested, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(requested)
    return requested


def threads_per_process(requested: int, local_processes: int) -> int:
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_processes))


def register_all() -> list[str]:
    """Schemas, recipes and resolvers: everything Hydra must know before composing."""
    register_schemas()
    if not OmegaConf.has_resolver("alignment_run_name"):
        # Hydra's log directory sits inside the run directory: run_name, else the recipe.
        OmegaConf.register_new_resolver("alignment_run_name", lambda run_name, recipe: run_name or recipe)
    return register_recipes()


def compose_config(overrides: list[str]) -> AlignmentConfig:
    """The typed, validated config a command line would give, without running anything
    (for tests and notebooks): ``compose_config(["+recipe=sft_then_dpo", "dpo.beta=0.2"])``."""
    from hydra import compose, initialize_config_dir

    register_all()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("config", overrides=rewrite_data_shorthand(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(raw)
        cfg = typed_config(raw)
    check_config(cfg)
    return cfg


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(raw: DictConfig) -> None:
    _STARTED["task"] = True
    scrub_hydra_output(raw)  # first: Hydra has just written the command line and config to disk
    try:
        cfg = typed_config(raw)
        check_config(cfg)
        if "RANK" not in os.environ:  # the command itself, not each rank it starts
            log.info("batch sizes: %s", "; ".join(batch_plan(cfg)))
        if cfg.launcher.name == "slurm":
            from alignment.scale.slurm import submit

            submit(cfg, argv=sys.argv[1:])
            return
        if needs_launch(cfg.launcher):
            code = launch(cfg.launcher, sys.argv[1:], threads_per_rank=threads_per_process(cfg.num_threads, cfg.launcher.nproc_per_node))
            if code:
                raise SystemExit(code)
            return
        _run_this_rank(cfg)
    except UserError as err:
        print(f"alignment: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_EXIT if isinstance(err, (ConfigError, DataError)) else 1) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SystemExit(f"alignment: error: the disk is full ({err}); checkpoints are committed only once complete, so the "
                         f"previous ones are intact. Free space or set output_dir elsewhere, then rerun to resume") from None


def scrub_hydra_output(raw: DictConfig) -> None:
    """Hydra writes the config, the overrides and its own config (the command line included) to
    ``.hydra/`` before the task starts: rewrite them with secrets redacted, and redact secret
    values from every log line from now on (console and ``alignment.log``)."""
    hydra_cfg = HydraConfig.get()
    config = OmegaConf.to_container(raw, resolve=False)
    values = secret_values(config) | override_secret_values(hydra_cfg.overrides.task)
    install_log_filter(values)
    out = Path(hydra_cfg.runtime.output_dir)
    files = [out / hydra_cfg.output_subdir / name for name in ("config.yaml", "overrides.yaml", "hydra.yaml")] if hydra_cfg.output_subdir else []
    if hydra_cfg.mode == RunMode.MULTIRUN:
        files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    scrub_yaml_files(files, values=values)
    for log_file in out.glob("*.log"):
        scrub_text_file(log_file, values=values)


def _run_this_rank(cfg: AlignmentConfig) -> None:
    """One rank (or the only process): join the group, catch stop signals, run the pipeline."""
    from alignment.pipeline import run_pipeline

    distributed.init()
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one rank speaks
        os.environ["TQDM_DISABLE"] = "1"
    preemption.install()
    for problem in compat.missing(cfg):
        log.warning("%s", problem)
    threads = set_threads(cfg.num_threads)
    log.info("recipe %s, run %s, stages %s, %d process(es), %d torch threads each", cfg.recipe, cfg.run_name, cfg.stages,
             distributed.world_size(), threads)
    try:
        run_pipeline(cfg)
    except preemption.Preempted as stop:
        log.warning("%s", stop)
        raise SystemExit(preemption.PREEMPTED_EXIT) from None


def main() -> None:
    # transformers renamed gradient_checkpointing; TRL still calls the old names every step.
    warnings.filterwarnings("ignore", message=".*activation_checkpointing.*", category=FutureWarning)
    redact_output(sys.argv[1:])  # before Hydra, which prints the command line when the job fails
    recipes = register_all()
    sys.argv = [sys.argv[0]] + rewrite_data_shorthand(sys.argv[1:])
    recipe = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(("+recipe=", "recipe="))), None)
    try:
        _hydra_main()
    except SystemExit as exit_:
        if exit_.code not in (0, None) and not _STARTED["task"]:
            print(
                f"alignment: the config was rejected before anything was loaded (recipe {recipe!r}; "
                f"recipes: {', '.join(recipes)}). See the error above.",
                file=sys.stderr,
            )
            raise SystemExit(USAGE_EXIT) from None
        raise


if __name__ == "__main__":
    main()
