"""Selector: golden top-m picks, KD loss properties, straight-through gradient, attention teacher."""

from __future__ import annotations

import pytest
import torch

from llava_ultra.config import SelectorConfig
from llava_ultra.model.selector import (
    Selector,
    attention_relevance,
    attention_teacher,
    content_keys,
    group,
    kd_loss,
    normalise_teacher,
    select_features,
    select_top,
    straight_through,
    supervised_loss,
)
from tests.helpers import tiny_model

NEG = float("-inf")


def test_group_pads_ragged_samples():
    scores, valid = group(torch.tensor([1.0, 2.0, 3.0, 4.0]), [3, 0, 1])
    assert scores.tolist() == [[1.0, 2.0, 3.0], [NEG, NEG, NEG], [4.0, NEG, NEG]]
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]


def test_select_top_picks_highest_scores_golden():
    scores, valid = group(torch.tensor([0.1, 0.9, 0.3, -2.0, 5.0, 5.0, 1.0]), [3, 1, 3])
    assert select_top(scores, valid, 1).tolist() == [[0, 1, 0], [1, 0, 0], [1, 0, 0]]  # tie -> earlier frame
    assert select_top(scores, valid, 2).tolist() == [[0, 1, 1], [1, 0, 0], [1, 1, 0]]  # padding never chosen


def test_kd_loss_zero_when_teacher_and_student_agree():
    valid = torch.tensor([[True, True, True], [True, True, False]])
    teacher = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.1, 0.0]])
    temperature = 0.1
    agree = kd_loss(teacher, teacher / temperature + 3.0, valid, temperature)  # shift-invariant softmax
    assert agree.item() == pytest.approx(0.0, abs=1e-6)
    disagree = kd_loss(teacher, -teacher / temperature, valid, temperature)
    assert disagree.item() > 0.1


def test_kd_loss_has_the_papers_gradient():
    """KL = the paper's cross-entropy minus the teacher entropy: same gradient for the student."""
    valid = torch.ones(2, 4, dtype=torch.bool)
    teacher = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    student = torch.randn(2, 4, requires_grad=True)
    kd_loss(teacher, student, valid, 1.0).backward()
    ours = student.grad.clone()
    student.grad = None
    p = torch.softmax(teacher, -1)
    (-(p * torch.log_softmax(student, -1)).sum(-1).mean()).backward()
    torch.testing.assert_close(ours, student.grad)


def test_kd_loss_ignores_single_image_samples():
    valid = torch.tensor([[True, False], [True, False]])
    student = torch.randn(2, 2, requires_grad=True)
    loss = kd_loss(torch.rand(2, 2), student, valid)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph


def test_straight_through_keeps_values_and_passes_gradient():
    scores = torch.tensor([[0.2, 1.5, -0.3]], requires_grad=True)
    valid = torch.ones(1, 3, dtype=torch.bool)
    hard = select_top(scores.detach(), valid, 1)
    multipliers = straight_through(scores, valid, hard)
    assert torch.equal(multipliers.detach(), hard)  # exactly 1 / 0 in the forward pass
    (multipliers * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert scores.grad.abs().sum() > 0


def test_straight_through_trains_the_scorer_alone():
    """Mode 'feature' (no teacher): a loss on the selected features reaches the scorer's parameters."""
    torch.manual_seed(0)
    selector = Selector(SelectorConfig(mode="feature"), dim=8)
    feats = torch.randn(5, 4, 8)
    counts = [3, 2]
    scores, valid = group(selector.score(feats), counts)
    chosen = select_top(scores, valid, 1)
    selected = select_features(feats, counts, chosen, straight_through(scores, valid, chosen))
    assert selected.shape == (2, 4, 8)
    picks = [int(chosen[0].argmax()), 3 + int(chosen[1].argmax())]
    assert torch.equal(selected.detach(), feats[picks])  # the multipliers are exactly 1 going forward
    selected.sum().backward()
    assert selector.score_head.weight.grad.abs().sum() > 0
    assert selector.token_weight.weight.grad is not None


def test_select_features_gathers_in_sample_order():
    feats = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 2, 3)
    chosen = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    out = select_features(feats, [3, 2], chosen)
    assert out[:, 0, 0].tolist() == [2.0, 3.0]  # image 2 of sample 0, image 0 of sample 1 (flat 3)


def test_none_mode_has_no_parameters_and_fixed_choice():
    assert list(Selector(SelectorConfig(mode="none"), 8).state_dict()) == []
    assert Selector(SelectorConfig(mode="none", none_strategy="all"), 8).fixed_choice([2, 0]) == [[0, 1], []]
    assert Selector(SelectorConfig(mode="none", none_strategy="first"), 8).fixed_choice([2, 0]) == [[0], []]
    rand = Selector(SelectorConfig(mode="none", none_strategy="random"), 8).eval()
    assert rand.fixed_choice([3, 0, 4], keys=[7, 0, 9]) == [[1], [], [1]]  # key % k at eval


def test_content_keys_depend_on_each_samples_images_only():
    images = torch.arange(5 * 3, dtype=torch.float32).view(5, 3)
    keys = content_keys(images, [2, 0, 3])
    assert keys[1] == 0
    assert keys[0] == content_keys(images[:2], [2])[0] and keys[2] == content_keys(images[2:], [3])[0]
    assert keys[0] != keys[2]


def test_attention_relevance_golden():
    # one image of 2 tokens, 2 text tokens (the second padding), 1 head, 1 layer
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 2] = torch.tensor([0.3, 0.3, 0.4, 0.0])  # text token 0: 0.6 on the image
    attn[0, 0, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # padding row, ignored
    assert attention_relevance([attn], 2, torch.tensor([[1, 0]])).tolist() == pytest.approx([0.6])


def test_attention_relevance_peak_golden():
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 2] = torch.tensor([0.1, 0.5, 0.4, 0.0])  # text token 0: most-attended image token 0.5
    attn[0, 0, 3] = torch.tensor([0.3, 0.2, 0.0, 0.5])  # text token 1: 0.3
    mask = torch.tensor([[1, 1]])
    assert attention_relevance([attn], 2, mask, "peak").tolist() == pytest.approx([0.4])
    assert attention_relevance([attn], 2, mask, "mass").tolist() == pytest.approx([0.55])
    with pytest.raises(ValueError, match="'mass' or 'peak'"):
        attention_relevance([attn], 2, mask, "max")


def test_zscore_teacher_is_sharp_where_raw_masses_are_flat():
    # attention masses that differ by 1e-3 between frames: raw softmax(x / 0.1) is ~uniform,
    # the z-scored teacher puts most of its mass on the most relevant frame
    masses = torch.tensor([[0.690, 0.691, 0.692, NEG]])
    valid = torch.tensor([[True, True, True, False]])
    raw = torch.softmax(normalise_teacher(masses.masked_fill(~valid, 0), valid, "none")[:, :3] / 0.1, -1)
    z = normalise_teacher(masses.masked_fill(~valid, 0), valid, "zscore")
    assert z[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3)
    assert z[0, 3] == 0.0
    sharp = torch.softmax(z[:, :3] / 0.5, -1)
    assert raw.max() < 0.34 < 0.8 < sharp.max()
    # z-scoring is shift- and scale-invariant within the sample, and a single image gives 0
    assert torch.allclose(
        normalise_teacher(masses[:, :3] * 7 + 3, valid[:, :3], "zscore"), z[:, :3], atol=1e-4
    )
    assert normalise_teacher(torch.tensor([[0.4]]), torch.tensor([[True]]), "zscore").tolist() == [[0.0]]
    # the KD loss takes the normalisation: zero when the student equals the normalised teacher / T
    student = (z[:, :3] / 0.5).clone()
    assert kd_loss(masses[:, :3], student, valid[:, :3], 0.5, "zscore").item() == pytest.approx(0.0, abs=1e-6)


def test_supervised_loss_targets_the_labelled_valid_frames():
    scores = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, NEG], [0.0, 0.0, 0.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    labels = torch.tensor([[1, 0, 0], [1, 1, -1], [1, -1, 0]])  # row 2: all valid; row 3: one unknown
    loss = supervised_loss(scores, valid, labels)
    # only row 0 counts: -log softmax(0,0,0)[0] = log 3
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    loss.backward()
    assert scores.grad[0, 0] < 0 < scores.grad[0, 1]  # raise the valid frame, lower the others
    assert scores.grad[1:].abs().sum() == 0
    none = supervised_loss(scores, valid, torch.full((3, 3), -1))
    assert none.item() == 0.0


def test_attention_teacher_matches_full_eager_forward():
    model = tiny_model()
    llm = model.llm
    torch.manual_seed(0)
    images = torch.randn(3, 16, 32)
    text = torch.randn(3, 5, 32)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scores = attention_teacher(llm, images, text, mask, n_layers=1)
    assert scores.shape == (3,) and not scores.requires_grad
    assert ((scores >= 0) & (scores <= 1)).all()
    assert llm.config._attn_implementation == "sdpa"  # restored
    llm.set_attn_implementation("eager")
    full_mask = torch.cat([torch.ones(3, 16, dtype=torch.long), mask], 1)
    with torch.no_grad():
        out = llm(
            inputs_embeds=torch.cat([images, text], 1),
            attention_mask=full_mask,
            position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0),
            output_attentions=True,
        )
    llm.set_attn_implementation("sdpa")
    torch.testing.assert_close(scores, attention_relevance(out.attentions[:1], 16, mask))
