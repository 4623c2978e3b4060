"""`python -m rlhfkit` is the `rlhfkit` command (also what `accelerate launch -m rlhfkit` runs)."""

from rlhfkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
