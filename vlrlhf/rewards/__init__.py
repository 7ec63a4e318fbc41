"""Rule rewards for online RL: built-ins and any function named by import path.

A reward function takes the batch and returns one float per completion:

    def score(completions: list[str], records: list[PromptRecord], **options) -> list[float]

Built-ins (`vlrlhf/rewards/builtin.py`): exact_match, multiple_choice, numeric,
length_penalty, format_match, and math (`vlrlhf/rewards/maths.py`: symbolic equivalence
of the boxed answer). `RewardSet` combines several with weights and applies
the error policy (see combine.py).
"""

from vlrlhf.rewards.combine import RewardError, RewardSet, RewardTerm

__all__ = ["RewardError", "RewardSet", "RewardTerm"]
