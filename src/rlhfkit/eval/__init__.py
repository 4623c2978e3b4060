"""Evaluation: gold scoring on the playground, KL to a reference, (later) win rates, over-optimisation, reports."""
