"""The two-stage training recipe on accelerate.

- loop.py        `train(cfg)`: stage 1 / stage 2, chained or alone; checks before compute; the step loop
- checkpoint.py  run folders, atomic resumable checkpoints, retention, RNG capture, run identity
- schedule.py    Adam/AdamW parameter groups and the cosine schedule with warm-up
- progress.py    progress bar, metrics.jsonl, optional TensorBoard

Data loading (length checks, the Dataset, collate, the sampler) lives in `dataset.py`; tokenisation
and label masking in the input processor, `model/processor.py`.
"""
