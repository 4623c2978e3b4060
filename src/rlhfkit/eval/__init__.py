"""Evaluation: gold scoring on the playground, KL to a reference, win rates, over-optimisation curves and the
online monitor PPO runs, the HTML report."""
