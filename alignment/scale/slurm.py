"""Submit a run to Slurm (``launcher=slurm``): write an sbatch script, run ``sbatch``.

    python -m alignment.run +recipe=sft_then_dpo launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 \\
        launcher.partition=gpu launcher.time=12:00:00 'launcher.extra_sbatch=["--qos=high"]'
    python -m alignment.run +recipe=sft launcher=slurm launcher.dry_run=true   # only write and print it

The script is rendered from ``slurm/job.sbatch`` (or ``launcher.template``) into
``<output_dir>/<run_name>/slurm/job.sbatch``; the job's log is ``<run dir>/slurm/<jobid>.out``.
Inside the job, ``srun`` starts one launcher per node running the same recipe and overrides
with ``launcher=local`` and the job's shape (nodes, processes per node, rank 0's host); the
node rank comes from ``$SLURM_NODEID``. The output directory is made absolute and the run name
fixed at submission, so every attempt of the job writes to the same run directory.

Preemption: Slurm sends USR1 ``launcher.signal_seconds`` before the time limit; the ranks
checkpoint and exit 75 (alignment/scale/preemption.py), and the script requeues the job (same job id,
log appended) when ``launcher.requeue`` is true. The requeued attempt skips finished stages and
resumes the interrupted one. Slurm's own preemption (PreemptMode=REQUEUE) and ``scontrol requeue``
send TERM instead: the ranks checkpoint the same way within KillWait and Slurm requeues the job.
``scancel`` still cancels: the script does not requeue on TERM. When a node fails, the job's log
ends naming it and its ranks; ``sbatch <run dir>/slurm/job.sbatch`` resumes. All of this runs on
two real Slurm nodes in tests/test_slurm_nodes.py (slurm/local_cluster.sh).
"""

from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path

from alignment.config import AlignmentConfig, LauncherConfig, shipped_dir
from alignment.errors import ConfigError

SCRIPT_NAME = "job.sbatch"
# Overrides the job command sets itself, besides every launcher.* key (the job runs
# launcher=local with the job's shape): the run directory, fixed at submission.
_REPLACED_KEYS = ("output_dir", "run_name")


class JobTemplate(string.Template):
    """``$name`` placeholders in lowercase only, so the script's UPPERCASE shell variables
    (``$SLURM_JOB_ID``, ``$MASTER_ADDR``) pass through untouched."""

    idpattern = r"[a-z][a-z0-9_]*"
    flags = re.ASCII  # not IGNORECASE (string.Template's default)


def template_path(launcher: LauncherConfig) -> Path:
    if launcher.template:
        path = Path(launcher.template).expanduser()
        if not path.is_file():
            raise ConfigError(f"launcher.template={launcher.template}: no such file; unset it to use the shipped slurm/{SCRIPT_NAME}")
        return path
    return shipped_dir("alignment.slurm_files", "slurm") / SCRIPT_NAME


def run_dir_of(cfg: AlignmentConfig) -> Path:
    return Path(cfg.output_dir).expanduser().resolve() / str(cfg.run_name)


def procs_per_node(launcher: LauncherConfig) -> int:
    return launcher.gpus_per_node if launcher.gpus_per_node > 0 else launcher.cpu_procs_per_node


def user_overrides(argv: list[str]) -> list[str]:
    """The command line's overrides; under --multirun, this job's own values of the swept keys."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return list(HydraConfig.get().overrides.task)
    return [arg for arg in argv if not arg.startswith("-")]  # --multirun and other Hydra flags


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def inner_command(cfg: AlignmentConfig, *, argv: list[str]) -> str:
    """The command each node runs: this recipe and these overrides, on ``launcher=local``.

    ``$MASTER_ADDR`` and ``$THREADS_PER_RANK`` are left for the job script to expand.
    """
    launcher = cfg.launcher
    set_threads = cfg.num_threads == 0
    kept = []
    for arg in user_overrides(argv):
        key = _key(arg)
        if key == "launcher" or key.startswith("launcher.") or key in _REPLACED_KEYS or (set_threads and key == "num_threads"):
            continue
        kept.append(arg)
    fixed = [
        f"output_dir={run_dir_of(cfg).parent}",
        f"run_name={cfg.run_name}",
        "launcher=local",
        f"launcher.nnodes={launcher.nodes}",
        f"launcher.nproc_per_node={procs_per_node(launcher)}",
    ]
    lines = [f"{shlex.quote(sys.executable)} -m alignment.run", *(shlex.quote(w) for w in kept + fixed)]
    lines += ['launcher.master_addr="$MASTER_ADDR"', f"launcher.master_port={launcher.master_port}"]
    if set_threads:
        lines.append('num_threads="$THREADS_PER_RANK"')
    return " \\\n    ".join(lines)


def sbatch_lines(cfg: AlignmentConfig) -> list[str]:
    """The optional ``#SBATCH`` lines: only what the config sets."""
    launcher = cfg.launcher
    options = []
    if launcher.gpus_per_node > 0:
        options.append(f"--gpus-per-node={launcher.gpus_per_node}")
    if launcher.requeue:
        options.append("--requeue")
    for name in ("partition", "account", "time", "constraint", "mem"):
        value = getattr(launcher, name)
        if value:
            options.append(f"--{name}={value}")
    if launcher.cpus_per_task:
        options.append(f"--cpus-per-task={launcher.cpus_per_task}")
    for line in launcher.extra_sbatch:
        line = line.strip()
        if line.startswith("#SBATCH"):
            line = line[len("#SBATCH"):].strip()
        options.append(line)
    return [f"#SBATCH {option}" for option in options]


def render(cfg: AlignmentConfig, *, argv: list[str]) -> str:
    """The job script for ``cfg`` (launcher=slurm) and the command line ``argv``."""
    launcher = cfg.launcher
    if launcher.gpus_per_node < 0 or launcher.signal_seconds < 0:
        raise ConfigError("launcher.gpus_per_node and launcher.signal_seconds must be >= 0")
    path = template_path(launcher)
    template = JobTemplate(path.read_text(encoding="utf-8"))
    # %j is Slurm's job id; a literal % in the run directory must be doubled for Slurm.
    log_file = str(run_dir_of(cfg) / "slurm").replace("%", "%%") + "/%j.out"
    values = {
        "job_name": _sbatch_quote(str(cfg.run_name)),
        "nodes": launcher.nodes,
        "procs_per_node": procs_per_node(launcher),
        "signal_seconds": launcher.signal_seconds,
        "log_file": _sbatch_quote(log_file),
        "optional_sbatch_lines": "\n".join(sbatch_lines(cfg)),
        "master_port": launcher.master_port,
        "command": inner_command(cfg, argv=argv),
        "requeue": "true" if launcher.requeue else "false",
    }
    unknown = sorted(_placeholders(template) - values.keys())
    if unknown:
        raise ConfigError(f"launcher.template={path}: unknown placeholder(s) {', '.join('$' + u for u in unknown)}; "
                          f"the placeholders filled in are {', '.join('$' + k for k in values)} (write shell variables in UPPERCASE)")
    return template.safe_substitute(values)


def _placeholders(template: JobTemplate) -> set[str]:
    found = set()
    for match in template.pattern.finditer(template.template):
        name = match.group("named") or match.group("braced")
        if name:
            found.add(name)
    return found


def _sbatch_quote(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def submit(cfg: AlignmentConfig, *, argv: list[str]) -> str | None:
    """Write ``<run dir>/slurm/job.sbatch`` and submit it; return the job id (None on a dry run)."""
    script = render(cfg, argv=argv)
    slurm_dir = run_dir_of(cfg) / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path = slurm_dir / SCRIPT_NAME
    script_path.write_text(script, encoding="utf-8")
    if cfg.launcher.dry_run:
        print(script, flush=True)
        print(f"wrote {script_path} (launcher.dry_run=true: not submitted; submit it with: sbatch {shlex.quote(str(script_path))})", flush=True)
        return None
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ConfigError(f"launcher=slurm: `sbatch` is not on PATH, so the job cannot be submitted (the script is in "
                          f"{script_path}). Run from a Slurm login node, pass launcher.dry_run=true to only write the "
                          f"script, or use launcher=local")
    done = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"launcher=slurm: sbatch refused {script_path}: {done.stderr.strip() or done.stdout.strip()}. "
                          f"Check launcher.partition, launcher.account, launcher.time, launcher.constraint, launcher.mem, "
                          f"launcher.cpus_per_task and launcher.extra_sbatch (see `sinfo` for partitions and limits)")
    job_id = done.stdout.strip().split(";", 1)[0]
    print(f"submitted Slurm job {job_id}: {script_path}", flush=True)
    print(f"log: {slurm_dir / (job_id + '.out')}  (squeue -j {job_id}; scancel {job_id})", flush=True)
    return job_id
