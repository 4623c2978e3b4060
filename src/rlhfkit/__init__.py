"""rlhfkit: Reinforcement Learning from Human Feedback end to end."""

__version__ = "0.1.0"
