"""The shared batch predictor: files or PIL images -> answers and selections, one generate per batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_ultra.errors import DataError
from llava_ultra.model.predict import load_images, predict, predict_batched
from tests.helpers import tiny_images, tiny_model, tiny_tokenizer

PROMPTS = ["<image>\n肝脏大小?", "USER: <image> What is the examination site? ASSISTANT:", "<image>\n描述"]


def _files(tmp_path: Path, counts: list[int]) -> list[list[Path]]:
    rows = []
    for r, k in enumerate(counts):
        row = []
        for i, im in enumerate(tiny_images(k, seed=r)):
            path = tmp_path / f"r{r}_{i}.png"
            im.save(path)
            row.append(path)
        rows.append(row)
    return rows


def test_predict_is_prepare_and_generate_on_the_same_batch(tmp_path: Path):
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    files = _files(tmp_path, [2, 1, 3])
    got = predict(model, tok, PROMPTS, files, max_new_tokens=5)
    batch = model.prepare_inputs(tok, PROMPTS, [load_images(row) for row in files])
    gen = model.generate(**batch, max_new_tokens=5, tokenizer=tok)
    assert [p.text for p in got] == [t.strip() for t in gen.texts]
    assert [p.n_tokens for p in got] == [len(s) for s in gen.sequences]
    assert [p.selected for p in got] == gen.selection.indices
    assert [len(p.scores) for p in got] == [2, 1, 3] and all(p.error is None for p in got)


def test_an_unreadable_image_fails_its_row_alone_or_raises_naming_it(tmp_path: Path):
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    files = _files(tmp_path, [2, 1, 3])
    files[1][0].write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"r1_0\.png cannot be decoded"):
        predict(model, tok, PROMPTS, files, max_new_tokens=4)
    got = predict(model, tok, PROMPTS, files, max_new_tokens=4, skip_unreadable=True)
    assert got[1].error and "r1_0.png" in got[1].error and got[1].text == "" and got[1].selected is None
    without = predict(model, tok, [PROMPTS[0], PROMPTS[2]], [files[0], files[2]], max_new_tokens=4)
    assert [got[0], got[2]] == without  # the others are generated as if the bad row were absent


def test_batched_prediction_keeps_consecutive_batches(tmp_path: Path):
    model, tok = tiny_model(seed=3), tiny_tokenizer()
    files = _files(tmp_path, [2, 1, 3])
    images = [[*row] for row in files]
    batched = predict_batched(model, tok, PROMPTS, images, 2, max_new_tokens=4)
    assert batched == [
        *predict(model, tok, PROMPTS[:2], images[:2], max_new_tokens=4),
        *predict(model, tok, PROMPTS[2:], images[2:], max_new_tokens=4),
    ]
