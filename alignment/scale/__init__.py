"""Scale-out: ranks and DeepSpeed (distributed.py), the local launcher (launch.py), Slurm
submission (slurm.py), stop-on-signal (preemption.py) and mid-stage checkpoints with exact resume
(checkpoints.py)."""
