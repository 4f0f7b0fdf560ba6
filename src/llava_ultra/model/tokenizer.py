"""Tokenizer for tiny models, and the conversation formats.

`build_tiny_tokenizer` trains a byte-level BPE offline with `tokenizers` on the texts at hand, so
tiny random-init models get a real tokenizer with no download. Byte-level means every string,
Chinese included, round-trips exactly; there is deliberately no NFKC normaliser (it would rewrite
full-width Chinese punctuation such as '，' into ',' and break the round trip). Special tokens
have fixed ids: `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<image>`=4. Like LLaMA's tokenizer it
prepends `<s>` when `add_special_tokens=True`.

Conversation formats (LLaVA's names, `config.TEMPLATES`):
- 'vicuna_v1': "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." - used for instruction tuning.
- 'mistral_instruct': "[INST] {q} [/INST] {a} </s>[INST] {q2} [/INST]" - LLaVA's
  `conv_mistral_instruct` (separator style LLAMA_2, sep "", sep2 "</s>"), the format LLaVA-Med v1.5
  (Mistral-7B) was tuned with. Its default system prompt is empty; a non-empty one is wrapped as
  "<<SYS>>\n{system}\n<</SYS>>\n\n" at the start of the first instruction. `<s>` is not written:
  the tokenizer prepends it, as LLaVA's does.
- 'plain': "{image placeholder}{caption}\n" - stage 1 concept alignment, no roles.
`render_conversation` returns segments flagged as target or not, so that the input processor (processor.py) can mask
everything but the assistant's answers (and their end-of-sequence token) in the labels;
`render_prompt` ends where the assistant's answer starts ("ASSISTANT:" or "[/INST]") for
generation. `default_template` picks the format to prompt a checkpoint with when the user names none.

Sentencepiece-style (Metaspace) tokenizers of LLaMA / Vicuna / Mistral checkpoints: LLaVA's
`tokenizer_image_token` splits a prompt at `<image>` and tokenises every piece on its own, so the
text after the image starts with sentencepiece's "▁" prefix ("\n" after <image> is "▁", "<0x0A>").
We tokenise the whole prompt with `<image>` as a special token, which gives the same ids only when
the Metaspace pre-tokenizer prefixes every segment (`prepend_scheme="always"`, transformers'
`legacy=True`). transformers rebuilds that scheme from the `legacy` flag of tokenizer_config.json
on every load and does not always write the flag back, so `set_prefix_scheme` sets both, and
`load_tokenizer` re-applies the saved flag (a save/load round trip keeps the ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..config import TEMPLATES
from ..errors import ConfigError, DataError

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in this order
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (offline, deterministic for the same input).

    The vocabulary holds the 5 special tokens, the 256 byte symbols, and merges up to
    `vocab_size` (fewer when the texts are too small to support that many merges).
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise ConfigError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {minimum}"
        )
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise DataError("build_tiny_tokenizer got no text; pass the training reports' texts")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
    )
    ids = fast.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(len(SPECIAL_TOKENS))), ids  # fixed ids are part of the contract
    return fast


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved beside a checkpoint (or any transformers tokenizer folder/hub id).

    A Metaspace tokenizer whose tokenizer_config.json says `legacy: true` gets
    `prepend_scheme="always"` whatever transformers rebuilt (see the module docstring)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"no tokenizer could be loaded from {folder}: {exc}; save one there with tokenizer.save_pretrained"
        ) from exc
    scheme = prefix_scheme(tokenizer)
    config = Path(folder) / "tokenizer_config.json"
    if scheme is not None:
        legacy = None
        if config.is_file():
            try:
                legacy = json.loads(config.read_text(encoding="utf-8")).get("legacy")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"{config} is not valid UTF-8 JSON ({exc}); re-save the tokenizer"
                ) from None
        # also writes the flag into init_kwargs, which transformers does not: a later save keeps it
        set_prefix_scheme(tokenizer, "always" if legacy is True else scheme)
    return tokenizer


def _metaspace(tokenizer: PreTrainedTokenizerBase) -> pre_tokenizers.Metaspace | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    return pre if isinstance(pre, pre_tokenizers.Metaspace) else None


def prefix_scheme(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """'always', 'first' or 'never' for a sentencepiece-style (Metaspace) tokenizer, else None."""
    pre = _metaspace(tokenizer)
    return None if pre is None else str(pre.prepend_scheme)


def set_prefix_scheme(tokenizer: PreTrainedTokenizerBase, scheme: str) -> None:
    """Set a Metaspace tokenizer's prefix scheme, and the `legacy` / `add_prefix_space` flags
    transformers rebuilds it from on load, so that `save_pretrained` + load keep it."""
    if scheme not in ("always", "first", "never"):
        raise ConfigError(f"unknown Metaspace prepend scheme {scheme!r}; use always, first or never")
    pre = _metaspace(tokenizer)
    if pre is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} has no Metaspace pre-tokenizer; the prefix scheme applies to "
            "sentencepiece-style (LLaMA / Mistral) tokenizers only"
        )
    pre.prepend_scheme = scheme
    tokenizer.backend_tokenizer.pre_tokenizer = pre
    tokenizer.legacy = scheme == "always"
    tokenizer.add_prefix_space = scheme != "never"
    tokenizer.init_kwargs["legacy"] = scheme == "always"
    tokenizer.init_kwargs["add_prefix_space"] = scheme != "never"


def tokenizer_image_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, image_token: str = IMAGE, image_id: int = -200
) -> list[int]:
    """LLaVA's `tokenizer_image_token`: tokenise each piece between `<image>`s on its own (BOS on
    the first only) and put `image_id` between them; for checking our tokenisation against LLaVA's."""
    pieces = [tokenizer(piece).input_ids for piece in prompt.split(image_token)]
    bos = tokenizer.bos_token_id
    ids = list(pieces[0])
    for piece in pieces[1:]:
        ids.append(image_id)
        ids += piece[1:] if bos is not None and piece[:1] == [bos] else piece
    return ids


# ------------------------------------------------------------------------------- conversations


@dataclass(frozen=True)
class Segment:
    """A piece of rendered conversation; `is_target` marks text the model is trained to produce."""

    text: str
    is_target: bool


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise DataError("conversation is empty; give at least one user message")
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.get("role") != expected:
            raise DataError(
                f"conversation message {i} has role {msg.get('role')!r}, expected {expected!r}; "
                f"messages must alternate user/assistant starting with user"
            )


def render_conversation(
    messages: list[dict[str, str]],
    template: str = "vicuna_v1",
    system: str | None = None,
    image_token: str = IMAGE,
    eos_token: str = EOS,
) -> list[Segment]:
    """Render alternating user/assistant messages into segments (targets = assistant answers + EOS).

    Messages are `{"role": "user"|"assistant", "content": str}`; the user content carries the image
    placeholder where the images go. For 'plain' only the first exchange is used: the placeholder
    followed by the answer (LLaVA's stage-1 format drops the question). `system` None means the
    template's default (LLaVA's sentence for 'vicuna_v1', none for 'mistral_instruct').
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {template!r}; use one of {', '.join(TEMPLATES)}")
    _check_messages(messages)
    if template == "plain":
        if len(messages) < 2:
            raise DataError("the 'plain' template needs a user message and an assistant answer")
        prefix = image_token if image_token in messages[0]["content"] else ""
        return [Segment(prefix, False), Segment(messages[1]["content"] + "\n", True)]
    if template == "mistral_instruct":
        return _render_mistral_instruct(messages, system or "", eos_token)
    segments = [Segment((DEFAULT_SYSTEM if system is None else system) + " ", False)]
    for i in range(0, len(messages), 2):
        segments.append(Segment(f"USER: {messages[i]['content']} ASSISTANT:", False))
        if i + 1 < len(messages):
            segments.append(Segment(f" {messages[i + 1]['content']}{eos_token}", True))
    return segments


def _render_mistral_instruct(messages: list[dict[str, str]], system: str, eos_token: str) -> list[Segment]:
    # LLaVA's SeparatorStyle.LLAMA_2 with sep="" and sep2="</s>": "[INST] q [/INST]" + " a </s>" per turn
    segments = []
    for i in range(0, len(messages), 2):
        question = messages[i]["content"]
        if i == 0 and system:
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
        segments.append(Segment(f"[INST] {question} [/INST]", False))
        if i + 1 < len(messages):
            segments.append(Segment(f" {messages[i + 1]['content']} {eos_token}", True))
    return segments


def default_template(recorded: str, llm_model_type: str | None = None) -> str:
    """The conversation format to prompt a checkpoint with when the user names none.

    `recorded` is the checkpoint's `model.config.template` (written by `llava-ultra convert`, or the
    training config's `model.template`). A 'plain' (stage-1, concept alignment) checkpoint was never
    taught a chat format and 'plain' drops the question, so it is prompted with the conversation
    format of its LLM family instead: 'mistral_instruct' for a Mistral LLM, else 'vicuna_v1'
    (what eval / serve used for every checkpoint before they read the recorded template). Pass
    `--template plain` to get the stage-1 format anyway.
    """
    if recorded not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {recorded!r}; use one of {', '.join(TEMPLATES)}")
    if recorded != "plain":
        return recorded
    return "mistral_instruct" if llm_model_type == "mistral" else "vicuna_v1"


def model_template(model) -> str:
    """`default_template` for a loaded `UltraModel` (its recorded template and its LLM's model_type)."""
    llm_config = getattr(getattr(model, "llm", None), "config", None)
    text_config = llm_config.get_text_config() if hasattr(llm_config, "get_text_config") else llm_config
    return default_template(model.config.template, getattr(text_config, "model_type", None))


def render_prompt(
    messages: list[dict[str, str]],
    template: str = "vicuna_v1",
    system: str | None = None,
    image_token: str = IMAGE,
) -> str:
    """The text a model continues to answer the last user message (ends with 'ASSISTANT:' or '[/INST]')."""
    if template == "plain":
        _check_messages(messages)
        return image_token if image_token in messages[0]["content"] else ""
    if len(messages) % 2 == 0:
        raise DataError("render_prompt needs the conversation to end with a user message")
    return "".join(s.text for s in render_conversation(messages, template, system, image_token))
