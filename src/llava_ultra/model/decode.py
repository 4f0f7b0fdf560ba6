"""Token-by-token decoding for `UltraModel.generate` and the serving engine: the dynamic KV cache
(default), a static KV cache with fixed shapes, and an optional compiled (CUDA-graph) decode step.

Three ways to run the same greedy / sampled loop after one prefill over the prompt embeddings:

    cache='dynamic'               transformers' DynamicCache; K/V grow by one column per step (torch.cat).
                                  The default, and what CPU runs use.
    cache='static'                one preallocated (B, H_kv, L, d) K/V buffer per layer (transformers'
                                  StaticCache) and a (B, L) key mask; every step has the same shapes.
    cache='static', compile=True  the step above through torch.compile(mode='reduce-overhead'), which on
                                  CUDA captures it as a CUDA graph (gpt-fast's recipe): one launch per
                                  token instead of hundreds of small kernels.

Notable choices:
- Prefill always runs on the dynamic cache (its shape changes with every prompt), then its K/V are
  copied into the static buffer. So prefill is bit-identical on every path, and the static step
  differs from the dynamic one only by more masked-out key columns: greedy output is token-for-token
  equal in fp32 (tested).
- One write column `t` for the whole batch (transformers' StaticLayer writes at its own
  `cumulative_length`); rows are told apart by the key mask and by their own `position_ids`, so
  RoPE positions never depend on the column a key is stored in. This is what lets `SlotDecoder`
  (continuous batching) put a request that joins mid-decode into a free row: its prefilled K/V go to
  columns [t - len, t) of that row, and the next step writes everyone's token at column t.
- The key mask is passed to the LLM as a ready 4-D mask (transformers uses a 4-D mask as given), a
  bool mask for SDPA and an additive one for eager attention; other attention backends keep the
  dynamic path (a clear error names the setting).
- Compilation is lazy, per (model, batch, cache length), and cached; cache lengths are rounded up to
  a multiple of `LENGTH_BUCKET` so that prompts of similar length reuse one graph. The first call's
  time (compile + CUDA-graph capture + the step itself) is reported as `DecodeStats.warmup_s`. If
  compilation fails, decoding falls back to the eager static step with ONE warning per model.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase, StaticCache

from ..errors import ConfigError

log = logging.getLogger(__name__)

CACHES = ("dynamic", "static")
LENGTH_BUCKET = 256
"""Static cache lengths are rounded up to a multiple of this (fewer recompilations)."""


@dataclass
class DecodeStats:
    """How one decode ran (returned in `GenerationOutput.stats`)."""

    cache: str
    """'dynamic' or 'static'."""
    compiled: bool
    """Whether the decode step ran compiled."""
    prefill_s: float = 0.0
    """Seconds of the prefill (LLM over the prompt; encoders not included)."""
    warmup_s: float = 0.0
    """Seconds of the first decode step when it had to be built (compile + graph capture); 0 when an
    already built step was reused."""
    decode_s: float = 0.0
    """Seconds of all decode steps after the first, i.e. the steady state."""
    steps: int = 0
    """Decode steps run (tokens fed back into the model)."""
    fallback: str | None = None
    """Why compilation was abandoned, if it was."""

    @property
    def ms_per_token(self) -> float:
        """Steady-state milliseconds per decode step (warm-up excluded)."""
        timed = self.steps - (1 if self.warmup_s else 0)
        return 1000 * self.decode_s / timed if timed > 0 else float("nan")


def eos_ids(
    eos: int | Sequence[int] | None, tokenizer: PreTrainedTokenizerBase | None, llm: nn.Module
) -> set[int]:
    """The end-of-sequence ids: as given, else the tokenizer's, else the LLM's generation config's."""
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def next_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or a temperature / nucleus sample."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_cache(cache: str) -> None:
    if cache not in CACHES:
        raise ConfigError(f"cache={cache!r} is not a decoding cache; use one of {', '.join(CACHES)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(
    llm: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, DynamicCache]:
    """The LLM over left-padded prompt embeddings (B, T, D): last-position logits (B, V) in fp32 and
    the dynamic cache."""
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(llm.forward).parameters else {}
    out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    return out.logits[:, -1].float(), out.past_key_values


class StaticKV:
    """A (batch, max_len) static KV cache with its key mask, write column and one decode step.

    `step(tokens, positions)` feeds one token per row (position ids per row), writes its K/V at
    column `t` of every row, attends each row to its masked-in columns, and returns (B, V) fp32
    logits. Rows are loaded from a prefill's dynamic cache with `load`; `shift` moves every row's
    columns left or right (continuous batching frees or makes room with it)."""

    def __init__(self, llm: nn.Module, batch: int, max_len: int, compile: bool | str = False) -> None:
        impl = getattr(llm.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ConfigError(
                f"the static KV cache needs model.llm.attn_implementation 'sdpa' or 'eager' (got {impl!r}); "
                f"use cache='dynamic'"
            )
        text = llm.config.get_text_config()
        weight = llm.get_input_embeddings().weight
        self.llm, self.batch, self.max_len = llm, batch, max_len
        self.device, self.dtype = weight.device, weight.dtype
        self.additive = impl == "eager"
        heads = text.num_key_value_heads or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # normal tensors even under inference_mode, so a cache kept for reuse also works outside it
        with torch.inference_mode(False):
            self.cache = StaticCache(config=llm.config, max_cache_len=max_len)
            self.cache.early_initialization(batch, heads, head_dim, self.dtype, self.device)
            self.mask = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.t = 0
        self.backend = _backend(compile)
        self._step_fn: Callable[..., torch.Tensor] = self._eager_step
        self._built = self.backend is None
        self.compiled = False
        self.fallback: str | None = None

    # --------------------------------------------------------------------------- the step

    def _eager_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask4: torch.Tensor) -> torch.Tensor:
        out = self.llm(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask4,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def _mask4(self) -> torch.Tensor:
        m = self.mask[:, None, None, :]  # (B, 1, 1, L)
        if not self.additive:
            return m
        return torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~m, torch.finfo(self.dtype).min
        )

    def _set_column(self, t: int) -> None:
        self.t = t
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(t)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(B,) tokens and (B,) positions -> (B, V) fp32 logits, and the seconds spent building the
        compiled step (0 unless this call built it)."""
        if self.t >= self.max_len:
            raise RuntimeError(f"static KV cache full ({self.max_len} columns); a scheduling bug")
        self.mask[:, self.t] = True
        args = (tokens.view(-1, 1).to(self.device), positions.view(-1, 1).to(self.device), self._mask4())
        built_s = 0.0
        if not self._built:
            self._built = True
            t0 = time.perf_counter()
            try:
                self._step_fn = _compiled_step(self, self.backend)
                self.compiled = True
                logits = self._step_fn(*args).float().clone()
                _sync(self.device)
                built_s = time.perf_counter() - t0
                self.t += 1
                return logits, built_s
            except Exception as exc:  # noqa: BLE001 - any compiler failure: keep decoding, eagerly
                self.fallback = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                _warn_once(self.llm, self.fallback)
                self._step_fn, self.compiled = self._eager_step, False
                self._set_column(self.t)  # a failed trace may have advanced the write column
        logits = self._step_fn(*args).float().clone()
        self.t += 1
        return logits, built_s

    # ------------------------------------------------------------------------------- rows

    def load(self, rows: slice | int, cache: DynamicCache, mask: torch.Tensor, end: int) -> None:
        """Copy a prefill's K/V (b, H, T, d) into `rows`, columns [end - T, end), with its (b, T) mask."""
        width = mask.shape[-1]
        start = end - width
        if start < 0 or end > self.max_len:
            raise RuntimeError(f"prompt of {width} tokens does not fit columns [{start}, {end})")
        for dst, src in zip(self.cache.layers, cache.layers, strict=True):
            dst.keys[rows, :, start:end] = src.keys.to(self.dtype)
            dst.values[rows, :, start:end] = src.values.to(self.dtype)
        self.mask[rows] = False
        self.mask[rows, start:end] = mask.to(self.device).bool()

    def set_column(self, t: int) -> None:
        """Make `t` the next write column (columns >= t of live rows must be unused)."""
        self._set_column(t)

    def shift(self, by: int) -> None:
        """Move every row's columns by `by` (negative: left, dropping the first -by columns; positive:
        right, freeing the first `by`) and the write column with them."""
        if by == 0:
            return
        n = self.max_len - abs(by)
        for layer in self.cache.layers:
            for buf in (layer.keys, layer.values):
                if by < 0:
                    buf[:, :, :n] = buf[:, :, -by:].clone()
                else:
                    buf[:, :, by:] = buf[:, :, :n].clone()
        if by < 0:
            self.mask[:, :n] = self.mask[:, -by:].clone()
            self.mask[:, n:] = False
        else:
            self.mask[:, by:] = self.mask[:, :n].clone()
            self.mask[:, :by] = False
        self._set_column(self.t + by)


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, StaticKV]] = weakref.WeakKeyDictionary()


def _warn_once(llm: nn.Module, reason: str) -> None:
    if llm not in _WARNED:
        _WARNED.add(llm)
        warnings.warn(
            f"compiling the decode step failed ({reason}); decoding with the uncompiled static cache",
            RuntimeWarning,
            stacklevel=3,
        )


def _backend(compile: bool | str) -> str | None:
    """None (no compilation), 'inductor' for True, or the torch.compile backend named."""
    if compile is True:
        return "inductor"
    return compile or None


def _compiled_step(kv: StaticKV, backend: str) -> Callable[..., torch.Tensor]:
    """torch.compile of `kv`'s eager step: inductor with mode='reduce-overhead' (CUDA graphs on CUDA),
    or another backend as named (e.g. 'aot_eager': traced but not code-generated; fast CPU tests)."""
    if backend == "inductor":
        return torch.compile(kv._eager_step, mode="reduce-overhead", dynamic=False)
    return torch.compile(kv._eager_step, backend=backend, dynamic=False)


def _static_kv(llm: nn.Module, batch: int, length: int, compile: bool | str) -> tuple[StaticKV, bool]:
    """A static cache for (batch, length rounded up), reused per model when compiled (so is its
    compiled step); returns it and whether it was reused."""
    max_len = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    max_len = min(
        max_len, max(length, getattr(llm.config.get_text_config(), "max_position_embeddings", max_len))
    )
    if not compile:
        return StaticKV(llm, batch, max_len), False
    per_model = _COMPILED.setdefault(llm, {})
    key = (batch, max_len, llm.get_input_embeddings().weight.dtype, _backend(compile))
    if key in per_model:
        kv = per_model[key]
        kv.mask.zero_()  # stale K/V stay in the buffers, masked out
        kv._set_column(0)
        return kv, True
    kv = StaticKV(llm, batch, max_len, compile=compile)
    per_model[key] = kv
    return kv, False


def decode_loop(
    llm: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    on_tokens: Callable[[list[int]], bool],
    cache: str = "dynamic",
    compile: bool | str = False,
) -> DecodeStats:
    """Prefill over left-padded `embeds` (B, T, D) with `mask` (B, T), then decode up to
    `max_new_tokens` steps. `pick((B, V) fp32 logits) -> (B,)` chooses the tokens; `on_tokens(list)`
    takes each step's tokens and returns True when every row is done."""
    check_cache(cache)
    if compile and cache != "static":
        raise ConfigError("compile=True needs cache='static' (CUDA graphs need fixed shapes)")
    device = embeds.device
    stats = DecodeStats(cache=cache, compiled=False)
    mask = mask.to(device).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    logits, dyn = prefill(llm, embeds, mask, positions)
    _sync(device)
    stats.prefill_s = time.perf_counter() - t0
    kv = None
    if cache == "static":
        batch, width = mask.shape
        kv, _ = _static_kv(llm, batch, width + max_new_tokens, compile)
        kv.load(slice(None), dyn, mask, end=width)
        kv.set_column(width)
        del dyn
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        token = pick(logits)  # (B,)
        if on_tokens(token.tolist()) or step == max_new_tokens - 1:
            break
        positions = positions[:, -1:] + 1
        if kv is None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = llm(
                input_ids=token.view(-1, 1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=dyn,
                use_cache=True,
            )
            logits, dyn = out.logits[:, -1].float(), out.past_key_values
        else:
            logits, built_s = kv.step(token, positions)
            if built_s:
                stats.warmup_s = built_s
                t0 = time.perf_counter()
        stats.steps += 1
    _sync(device)
    stats.decode_s = time.perf_counter() - t0
    if kv is not None:
        stats.compiled, stats.fallback = kv.compiled, kv.fallback
    return stats


def kv_bytes_per_token(llm: nn.Module) -> int:
    """Bytes of K/V one token takes in a static cache of this LLM (all layers)."""
    text = llm.config.get_text_config()
    heads = text.num_key_value_heads or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = llm.get_input_embeddings().weight.element_size()
    return 2 * text.num_hidden_layers * heads * head_dim * element


class SlotDecoder:
    """Continuous batching on one static cache: `slots` rows, each holding one request at a time.

    A request is prefilled alone (`prefill` above, batch 1, so its first token is exactly what
    one-at-a-time generation gives), then `admit`ted into a free row; `step` decodes one token for
    every row at once; `release` frees a row. All rows share the write column `t`: a joining prompt of
    length n goes to columns [t - n, t). `room` keeps the invariant that every live row's remaining
    steps fit before the end of the buffer, shifting the columns left (dropping columns no live row
    uses) or right (when a prompt is longer than `t`) when that makes room; otherwise the request
    waits for rows to finish."""

    def __init__(self, llm: nn.Module, slots: int, max_len: int, compile: bool | str = False) -> None:
        self.kv = StaticKV(llm, slots, max_len, compile=compile)
        self.slots, self.max_len = slots, max_len
        self.start: list[int | None] = [None] * slots  # first used column of each live row
        self.left = [0] * slots  # decode steps a live row may still need
        self.position = [0] * slots  # next position id per row
        self.warmup_s = 0.0
        self.shifts = 0  # column shifts made (each copies the whole cache)
        self.waits = 0  # times a request had to wait for room

    @property
    def live(self) -> list[int]:
        return [s for s in range(self.slots) if self.start[s] is not None]

    def free(self) -> int | None:
        return next((s for s in range(self.slots) if self.start[s] is None), None)

    def fits(self, length: int, steps: int) -> bool:
        """Whether a request of `length` prompt tokens and up to `steps` decode steps fits a row at all."""
        return length + steps <= self.max_len

    def room(self, length: int, steps: int) -> bool:
        """Make room for a new row (shifting columns if needed); False if it must wait."""
        live = self.live
        if not live:
            self.kv.set_column(length)
            return True
        t = self.kv.t
        used = max(t - self.start[s] for s in live)  # columns the oldest live row needs kept
        lowest = max(used, length)  # the smallest write column possible after a shift
        need = max([self.left[s] for s in live] + [steps])
        if lowest + need > self.max_len:
            self.waits += 1
            return False
        if t + need > self.max_len or t < length:
            self._shift(lowest - t)
        return True

    def _shift(self, by: int) -> None:
        self.shifts += 1
        self.kv.shift(by)
        for s in self.live:
            self.start[s] += by

    def admit(self, slot: int, cache: DynamicCache, mask: torch.Tensor, steps: int) -> None:
        """Put a batch-1 prefill (`cache`, `mask` (1, n)) into row `slot`; call `room` first."""
        n = mask.shape[-1]
        self.kv.load(slot, cache, mask[0], end=self.kv.t)
        self.start[slot] = self.kv.t - n
        self.left[slot] = steps
        self.position[slot] = int(mask.long().sum())

    def release(self, slot: int) -> None:
        self.start[slot] = None
        self.left[slot] = 0

    def step(self, tokens: dict[int, int]) -> torch.Tensor:
        """Feed one token per live row ({slot: token}); (slots, V) fp32 logits (free rows: garbage)."""
        ids = torch.zeros(self.slots, dtype=torch.long)
        for s, tok in tokens.items():
            ids[s] = tok
        logits, built_s = self.kv.step(ids, torch.tensor(self.position))
        self.warmup_s += built_s
        for s in tokens:
            self.position[s] += 1
            self.left[s] -= 1
        return logits


def model_prefill(model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, DynamicCache, Any, torch.Tensor]:
    """One request's prefill through an `UltraModel` (inputs from `prepare_inputs`, batch 1): the
    last logits (1, V), the dynamic cache, the selection and the (1, T) mask."""
    counts = inputs.get("image_counts")
    feats, selection, _, _ = model._select(
        inputs.get("pixel_values_clip"), inputs.get("pixel_values_sam"), list(counts or [0]), None, None
    )
    embeds = model.embed(inputs["input_ids"], feats, selection)
    mask = inputs["attention_mask"].to(model.device).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = prefill(model.llm, embeds, mask, positions)
    return logits, cache, selection, mask
