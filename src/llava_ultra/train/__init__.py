"""The two-stage training recipe on accelerate.

- loop.py          `train(cfg)`: stage 1 / stage 2, chained or alone; checks before compute; each
                   stage's starting model
- trainer.py       one stage: `Trainer` (prepare, resume through accelerate's save_state /
                   load_state, step, log, maybe save, final folder)
- setup.py         what a run starts from: data paths, tokenizer, the fresh model (shared with the
                   feature cache)
- checkpoint.py    run folders, atomic checkpoint folders, manifests, retention, RNG capture
                   (encoder pretraining), run identity
- schedule.py      Adam/AdamW parameter groups and the cosine schedule with warm-up
- progress.py      progress bar, metrics.jsonl, optional TensorBoard
- feature_cache.py frozen-encoder outputs computed once; logra.py the LoGra-Med loss;
  pretrain.py      encoder pretraining

Data loading (length checks, the Dataset, collate, the sampler) lives in `dataset.py`; tokenisation
and label masking in the input processor, `model/processor.py`.
"""
