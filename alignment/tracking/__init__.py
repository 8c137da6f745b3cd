"""Experiment tracking: every stage is one run (W&B or TensorBoard) that lines up with its siblings.

W&B layout of a pipeline run ``<run_name>`` (``logger=auto``, the default, or ``logger=wandb``):

- group ``<run_name>``, one run per stage named ``<run_name>/<stage>`` with job type ``<stage>``
  and tags ``recipe:``, ``model:``, ``data:`` (plus ``logger.tags``);
- the run id is a hash of the run directory, the stage and the stage's inputs hash, so a
  resumed or requeued stage continues its W&B run, and a stage rerun with other inputs starts
  a new one;
- the resolved config, secrets removed (alignment/tracking/redaction.py), is the run's config;
- each stage logs its checkpoint as a ``model`` artifact named ``<run_name>-<stage>`` (by
  reference: paths and checksums, no upload unless ``logger.wandb.upload_checkpoints``) and
  declares the checkpoints it started from (its parent policy, a reward model) as inputs, so
  W&B draws SFT -> reward -> PPO/DPO.

Metric names are shared where stages share the meaning, so run comparison lines them up:

- ``train/step`` is every chart's x axis: an optimiser step (TRL stages) or one
  rollout-and-update iteration (PPO);
- ``train/loss``, ``train/grad_norm``, ``train/learning_rate``, ``train/tokens``,
  ``train/tokens_per_second`` while training (TRL stages);
- after training: ``eval/gold_accuracy_greedy``, ``eval/gold_accuracy_sampled`` (and
  ``eval/seen/...``, ``eval/unseen/...``, ``eval/family/<family>/...``),
  ``eval/response_tokens_mean``, ``eval/eos_rate``, ``eval/reward_mean`` (the reward model's
  mean score of the policy's samples) and ``eval/kl_to_<parent stage>`` (``eval/kl_to_sft`` in
  the shipped recipes); the first stage also logs its starting model under ``start/eval/...``;
- everything else under the stage's name: ``reward/pairwise_accuracy``, ``dpo/reward_accuracy``,
  ``dpo/rewards/margins``, ``ppo/kl``, ``ppo/rollout/gold_accuracy``, ...

The mode is decided once, before any ``wandb.init``: ``logger.wandb.mode``, else ``WANDB_MODE``,
else online when an API key is configured (WANDB_API_KEY, ~/.netrc, ``logger.wandb.api_key``)
and the W&B host answers within ``probe_timeout_seconds``, else offline. Offline runs sit in
``<run dir>/wandb/offline-run-*``; ``wandb sync <that dir>`` uploads them later. Tracking never
stops training: a W&B error is logged and the stage goes on. Only rank 0 tracks.
"""
