"""The playground: a built-in world small enough for RLHF to work visibly on a laptop CPU in minutes.

Modules:
  tasks       seeded prompts of four kinds (facts, arithmetic, short messages, harmful requests) and
              leak-free train/val/test splits
  responses   responses of mixed quality along independent axes, the pretraining corpus ("web text") and the
              SFT demonstrations
  gold        the hidden gold judge, the "true human" -- ONLY evaluation and the simulated annotators use it
  annotators  simulated annotators: noisy, biased judges sampled from the gold judge
  preferences pairs and rankings from the world's generator or a policy, labelled by the simulated annotators
  simulate    `rlhfkit label simulate`: the annotators label a feedback project through the feedback service
  ai_judge    a simulated constitutional AI judge (it reads responses; it does not use the gold judge)
  world       the world on disk: prompts, corpus, demonstrations, the word-level tokenizer and the initial model

This package deliberately imports none of its modules, so `import rlhfkit.playground` never loads the gold
judge: training code may import `tasks` and `responses` but never reach `gold` (tests/test_import_rules.py).
"""
