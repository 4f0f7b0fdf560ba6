"""The LoGra-Med alignment loss in the training loop: the training-only head and one aligned step.

`model/align.py` owns the loss (views, graphs, GNN, solvers). This file owns how the trainer uses it:

- The head (`MultiGraphAlign`, its GNN) lives OUTSIDE `UltraModel`, so model checkpoints keep
  their keys and stay loadable by eval and serve. The loop prepares it with accelerate beside the
  model (its own DDP wrapper, so its gradients are averaged across ranks too), adds its weights
  to the optimiser as one more parameter group, and saves them in every resumable checkpoint
  (`align_head.safetensors`) for an exact resume. Final stage folders do not hold it.
- Every aligned stage starts a fresh head, seeded from `train.seed` and the stage, so a chained
  run and two separate runs stay the same computation (the stage-2 GNN does not depend on how
  stage 1 was run).
- One aligned step (`aligned_loss`): the model's forward with `output_hidden_states=True`, a
  text-only pass of the LLM over the extended captions (`text_view`), the three views
  (`build_views`), the head, and `loss = out.loss + weight * align.loss`. The per-view losses and
  whether the batch was skipped (too few usable samples for the kNN graph) are returned for logging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig, to_dict
from ..errors import CheckpointError, ConfigError
from ..model.align import AlignConfig, MultiGraphAlign, build_views, text_view

HEAD_FILE = "align_head.safetensors"


def align_config(train: TrainConfig) -> AlignConfig:
    """The `AlignConfig` of `train.align_weight` and the `train.align` section."""
    fields = {k: v for k, v in to_dict(train.align).items() if k != "stages"}
    return AlignConfig(weight=train.align_weight, **fields)


def build_head(
    train: TrainConfig, stage: int, dim: int, device: torch.device | str
) -> MultiGraphAlign | None:
    """A fresh alignment head for `stage` (None when the stage is not aligned); identical on every process."""
    if stage not in train.aligned_stages():
        return None
    with torch.random.fork_rng(devices=[]):  # leave the global RNG where the loop expects it
        torch.manual_seed(train.seed + 7919 * stage)
        head = MultiGraphAlign(align_config(train), dim)
    return head.to(device)


def head_param_group(head: MultiGraphAlign, weight_decay: float) -> dict[str, Any]:
    """The optimiser parameter group of the head's GNN (all matrices, so weight decay applies)."""
    return {"params": [p for _, p in sorted(head.named_parameters())], "weight_decay": weight_decay}


def aligned_loss(
    model: Any,
    head: Any,
    llm: Any,
    inputs: dict[str, Any],
    extended: dict[str, torch.Tensor] | None,
    grad_scale: float = 1.0,
) -> tuple[Any, torch.Tensor, dict[str, float]]:
    """One forward with the alignment loss: (model output, total loss, logged values).

    `model` and `head` may be DDP-wrapped (they are called, so their hooks run); `llm` is the
    unwrapped model's LLM for the text-only caption pass. `extended` is the collator's padded
    captions; without it every sample lacks the third view and the batch counts as skipped.
    `grad_scale` is what the backward will multiply the loss's gradient by (`backward_scale`); the
    black-box matching divides it out so its re-solve sees the loss's own gradient.
    """
    _unwrap(head).grad_scale = grad_scale
    out = model(**inputs, output_hidden_states=True, return_logits=False)
    labels = inputs["labels"]
    batch = labels.shape[0]
    if extended is not None:
        ext, ext_keep = text_view(llm, extended["input_ids"], extended["attention_mask"])
    else:
        dim = out.hidden_states.shape[-1]
        ext = out.hidden_states.new_zeros(batch, dim)
        ext_keep = torch.zeros(batch, dtype=torch.bool)
    counts = [len(i) for i in out.selection.indices]
    views = build_views(out.image_features, counts, out.hidden_states, labels, ext, ext_keep)
    result = head(views.image, views.short, views.extended, views.keep)
    weight = _unwrap(head).cfg.weight
    loss = out.loss + weight * result.loss.to(out.loss.dtype)
    logged = {
        "align_loss": float(result.loss.detach()),
        **{f"align_{view}": value for view, value in result.per_view.items()},
        "align_nodes": float(result.nodes),
        "align_skipped": float(result.skipped),
    }
    return out, loss, logged


def backward_scale(acc: Any) -> float:
    """The factor `acc.backward(loss)` puts on the loss's gradient: 1 / grad_accum (accelerate and
    DeepSpeed divide the loss) times the fp16 loss scale when a GradScaler is active."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED and acc.mixed_precision == "fp16":
        # DeepSpeed keeps its loss scale inside its engine, where we cannot read it per step
        raise ConfigError(
            "train.align_weight > 0 (LoGra-Med) with DeepSpeed fp16: the black-box matching needs the "
            "loss scale, which DeepSpeed does not expose; use bf16 (mixed_precision: bf16) or DDP/FSDP"
        )
    scale = 1.0 / max(1, int(getattr(acc, "gradient_accumulation_steps", 1) or 1))
    scaler = getattr(acc, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        scale *= float(scaler.get_scale())
    return scale


def _unwrap(module: Any) -> Any:
    return getattr(module, "module", module)


def save_head(head: Any, folder: Path) -> None:
    """Write the head's weights into a resumable checkpoint folder."""
    from safetensors.torch import save_file

    state = _unwrap(head).state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, Path(folder) / HEAD_FILE)


def load_head(head: MultiGraphAlign, folder: Path) -> None:
    """Load the head's weights from a resumable checkpoint written with the loss on."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{folder} holds no {HEAD_FILE}: it was written without the alignment loss; resume with "
            f"the run's original train.align_weight, or start over with --overwrite"
        )
    state = load_file(str(path))
    expected = head.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise CheckpointError(
            f"{path} does not match the alignment head (keys {sorted(state)}); it was written with "
            f"other train.align settings; resume with the original config"
        )
    head.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
