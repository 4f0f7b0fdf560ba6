"""The LLaVA-Ultra model: encoders (vision.py), fusion (fusion.py), frame selection (selector.py),
the assembled model with generation (ultra.py), trainability and LoRA (lora.py), the checkpoint
folder format (checkpoint.py), foreign checkpoints (convert.py) and the tiny tokenizer (tokenizer.py).

Import from the submodules; this package file stays light so that `import llava_ultra.model` does
not pull in transformers.
"""
