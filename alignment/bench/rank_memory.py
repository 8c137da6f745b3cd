"""Per-rank peak memory of SFT, DPO and PPO on two processes, without ZeRO and under ZeRO-3.

Each cell is one real run of the pipeline (``python -m alignment.run``, two ranks on this
machine) for a few steps. While it runs, this script reads every rank's peak resident set
(``VmHWM`` in ``/proc/<pid>/status``, the kernel's high-water mark, the same number as the
rank's own ``getrusage(RUSAGE_SELF).ru_maxrss``) every half second; the last value before the
rank exits is its peak. Nothing in the ranks is changed for measuring. On a GPU the CUDA peak is
not read (a CPU measurement).

All three stages start from the same safetensors copy of the model, written once to
``--work/model`` (a GGUF file is dequantised whole on every rank by transformers' GGUF loader, so
measuring from it would show that loader, not the sharding): SFT from it, DPO with it as parent
(pairs sampled from it), PPO with it as policy and as reward model (a fresh scalar head).

    python -m alignment.bench.rank_memory --model-dir /work/shared/data/models \\
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/rank_memory --out rank_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

STAGES = {
    "sft": ["+recipe=sft", "sft.max_steps=2", "sft.per_device_batch_size=4", "sft.global_batch_size=8"],
    "dpo": ["+recipe=dpo", "dpo.max_steps=2", "dpo.per_device_batch_size=4", "dpo.global_batch_size=8", "dpo.pairs.n_prompts=16", "dpo.pairs.max_new_tokens=8"],
    "ppo": ["+recipe=ppo", "ppo.num_rollouts=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.n_prompts=64",
            "ppo.max_new_tokens=8"],
}


def start_points(stage: str, model: Path) -> list[str]:
    if stage == "sft":
        return [f"model.name_or_path={model}"]
    if stage == "dpo":
        return [f"model.name_or_path={model}", f"dpo.init_from={model}"]
    return [f"model.name_or_path={model}", f"ppo.init_from={model}", f"ppo.reward_from={model}"]


def convert(model_dir: str, gguf_file: Optional[str], target: Path) -> Path:
    """The model as an ordinary safetensors directory (once)."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.modeling.gguf import as_plain_model

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **extra)
    as_plain_model(model).save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir, **extra).save_pretrained(target)
    return target


def _rank_of(pid: int) -> Optional[int]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(line for line in status.read_text().splitlines() if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        children.setdefault(ppid, []).append(int(status.parent.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _peak_kib(pid: int) -> Optional[int]:
    try:
        line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1])


def measure(overrides: list[str], *, log: Path) -> tuple[dict[int, float], list[list[float]]]:
    """Run the pipeline with ``overrides``; each rank's peak RSS in MiB, and the peaks over time
    ([seconds, rank, MiB] every half second, to see which phase sets it beside the run's log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    peaks: dict[int, int] = {}
    series: list[list[float]] = []
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alignment.run", *overrides], env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                rank, peak = _rank_of(pid), _peak_kib(pid)
                if rank is not None and peak is not None:
                    peaks[rank] = max(peaks.get(rank, 0), peak)
                    series.append([round(time.monotonic() - started, 1), rank, round(peak / 1024)])
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}); see {log}")
    return {rank: kib / 1024 for rank, kib in sorted(peaks.items())}, series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--gguf-file")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("rank_memory.json"))
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--options", nargs="+", default=["none", "zero3"])
    parser.add_argument("--peft", default="null", help="model.peft for every run (null: full fine-tuning)")
    parser.add_argument("--reduce-bucket", type=int, help="deepspeed.reduce_bucket_size under ZeRO (elements); default: the config's")
    parser.add_argument("--live-parameters", type=int,
                        help="deepspeed.max_live_parameters and max_reuse_distance under ZeRO-3 (elements); default: the config's")
    parser.add_argument("--port", type=int, default=29655)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = convert(args.model_dir, args.gguf_file, args.work / "model")
    previous = json.loads(args.out.read_text()) if args.out.is_file() else []  # cells of earlier invocations stay
    results = []
    for stage in args.stages:
        for option in args.options:
            bucket = args.reduce_bucket if option != "none" else None
            live = args.live_parameters if option.startswith("zero3") else None
            name = f"{stage}_{option}" + (f"_bucket{bucket}" if bucket else "") + (f"_live{live}" if live else "")
            overrides = [*STAGES[stage], *start_points(stage, model), "model=smollm2", f"model.peft={args.peft}",
                         f"output_dir={args.work / name}", "eval.enabled=false", "num_threads=1", "logger=none",
                         "launcher.nproc_per_node=2", f"deepspeed={option}", f"launcher.master_port={args.port}",
                         *([f"deepspeed.reduce_bucket_size={bucket}"] if bucket else []),
                         *([f"deepspeed.max_live_parameters={live}", f"deepspeed.max_reuse_distance={live}"] if live else [])]
            started = time.monotonic()
            peaks, series = measure(overrides, log=args.work / f"{name}.log")
            results.append({"name": name, "stage": stage, "deepspeed": option, "reduce_bucket_size": bucket, "live_parameters": live,
                            "peak_rss_mib": peaks, "seconds": time.monotonic() - started, "overrides": overrides,
                            "peak_over_time": series})
            print(f"{name:28s} " + "  ".join(f"rank {r}: {v:7.0f} MiB" for r, v in peaks.items()), flush=True)
            names = {r["name"] for r in results}
            args.out.write_text(json.dumps([r for r in previous if r.get("name") not in names] + results, indent=1))


if __name__ == "__main__":
    main()
