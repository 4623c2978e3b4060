"""The labelling web app (FastAPI, server-rendered templates, a little vanilla JS, no build step).
Nothing else in rlhfkit imports it; `rlhfkit label serve` starts it."""
