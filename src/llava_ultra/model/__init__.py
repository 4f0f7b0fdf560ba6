"""The LLaVA-Ultra model: encoders (vision.py), fusion (fusion.py), frame selection (selector.py),
the assembled model with generation (ultra.py), trainability and LoRA (lora.py), the checkpoint
folder format (checkpoint.py), foreign checkpoints (convert.py), the tiny tokenizer (tokenizer.py),
the input processor shared by training and inference (processor.py), the batch predictor
(predict.py), static-cache decoding (decode.py) and the heads of encoder pretraining (pretrain_heads.py).

Import from the submodules; this package file stays light so that `import llava_ultra.model` does
not pull in transformers.
"""
