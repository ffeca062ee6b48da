"""Training: SFT cold start and two-stage GRPO on TRL with our rollout engine (docs/training.md).

Modules: ``data`` (MedQA / MedMCQA / MCQ loaders), ``grpo`` (``rollout_func``, rewards, ``GRPOConfig``), ``sft``
(protocol transcripts, masks), ``logprob_head`` (plain log-softmax head), ``run`` (``run_training``: config to run
directory), ``metrics`` (``metrics.jsonl`` and its PNG report); for many nodes ``verl`` (our loop as verl 0.9.1's
agent loop), ``verl_data`` (MCQ datasets to verl's parquet), ``verl_reward`` (our rewards as verl's
``custom_reward_function``; docs/scaling.md). Nothing heavy is imported here.
"""
