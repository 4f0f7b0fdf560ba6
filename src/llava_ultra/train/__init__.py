"""The two-stage training recipe on accelerate.

- loop.py        `train(cfg)`: stage 1 / stage 2, chained or alone; checks before compute; the step loop
- checkpoint.py  run folders, atomic resumable checkpoints, retention, RNG capture, run identity
- schedule.py    Adam/AdamW parameter groups and the cosine schedule with warm-up
- progress.py    progress bar, metrics.jsonl, optional TensorBoard

Data loading (tokenisation, label masking, length checks, the Dataset) lives in `data/collate.py`.
"""
