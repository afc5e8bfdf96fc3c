"""Reinforcement learning on the profile writer: PPO against the reward model, or DPO on preference pairs.

Both start from the last tuned adapter (collaborative, else SFT) and keep the frozen SFT-tuned model as the
reference. ``reclm rl RUN --method ppo|dpo`` runs :func:`reclm.llm.rl.stage.run_rl`.
"""

METHODS = ("ppo", "dpo", "none")
