"""LoGra-Med alignment: black-box gradient, loss behaviour, gradient flow, solvers, small batches."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from llava_ultra.errors import ConfigError, DataError
from llava_ultra.model.align import (
    AlignConfig,
    BlackBoxMatching,
    MultiGraphAlign,
    _perm_objective,
    _quadratic_grad,
    build_views,
    edge_matches,
    hamming_loss,
    image_view,
    knn_edges,
    qap_objective,
    solve_ipfp,
    solve_lap,
    text_view,
)
from tests.helpers import tiny_batch, tiny_model, tiny_tokenizer


def _random_graph(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Edges (2, n*k) of the kNN graph of n random points, as MultiGraphAlign builds them."""
    return knn_edges(torch.from_numpy(rng.normal(size=(1, n, 8))), k)[0].numpy()


def _is_permutation(y: np.ndarray) -> bool:
    return set(np.unique(y)) <= {0.0, 1.0} and (y.sum(0) == 1).all() and (y.sum(1) == 1).all()


# ------------------------------------------------------------------------ black-box gradient


@pytest.mark.parametrize("loss_kind", ["linear", "hamming"])
def test_blackbox_gradient_is_the_gradient_of_the_interpolated_loss(loss_kind: str) -> None:
    """The returned gradient equals a finite difference of Vlastelica's interpolation f_lambda.

    The solver is y(w) = argmin_{y in Pi} <w, y> over permutation matrices Pi. For a loss that is
    linear in y, L(y) = <c, y> + const (both a random c and the Hamming loss to the identity,
    Hamming(y, I) / B = <(1 - 2I) / B, y> + 1, are), dL/dy = c everywhere and the perturbed solution is
    y_lam(w) = y(w + lam c). The interpolation is

        f_lam(w) = L(y_lam(w)) - (1/lam) [<w, y(w)> - <w, y_lam(w)>]
                 = (1/lam) min_y <w + lam c, y> - (1/lam) min_y <w, y> + const,

    a difference of two piecewise-linear functions of w whose gradients are y_lam(w)/lam and
    y(w)/lam (Danskin). So grad f_lam(w) = -(y(w) - y_lam(w)) / lam exactly, away from the kinks;
    a central difference with a tiny step along random directions must reproduce it.
    """
    rng = np.random.default_rng(0)
    b, lam, eps = 6, 3.0, 1e-6
    eye = np.eye(b)
    c = rng.normal(size=(b, b)) if loss_kind == "linear" else (1 - 2 * eye) / b

    def loss_of(y: np.ndarray) -> float:
        return (
            float((c * y).sum())
            if loss_kind == "linear"
            else float((y * (1 - eye) + (1 - y) * eye).sum() / b)
        )

    def f_lam(w: np.ndarray) -> float:
        y, y_lam = solve_lap(w), solve_lap(w + lam * c)
        return loss_of(y_lam) - (float((w * y).sum()) - float((w * y_lam).sum())) / lam

    nonzero = 0
    for trial in range(5):
        w = rng.normal(size=(b, b))
        wt = torch.tensor(w[None], requires_grad=True)
        y = BlackBoxMatching.apply(wt, None, None, "lap", lam, 1)
        loss = (torch.from_numpy(c) * y).sum() if loss_kind == "linear" else hamming_loss(y).sum()
        assert float(loss.detach()) == pytest.approx(loss_of(y[0].detach().numpy()))
        loss.backward()
        grad = wt.grad[0].numpy()
        nonzero += bool(np.abs(grad).sum() > 0)
        for _ in range(4):
            d = rng.normal(size=(b, b))
            fd = (f_lam(w + eps * d) - f_lam(w - eps * d)) / (2 * eps)
            assert (grad * d).sum() == pytest.approx(fd, abs=1e-6), f"trial {trial}"
    assert nonzero >= 3  # the check is not vacuous: the perturbed solve usually moves


def test_blackbox_gradient_descent_step_moves_towards_the_identity() -> None:
    """For the Hamming loss, descent raises the wrong pairs' costs and lowers the true pairs'."""
    w = torch.tensor([[[0.0, -1.0], [-1.0, 0.0]]], requires_grad=True)  # the solver swaps the nodes
    y = BlackBoxMatching.apply(w, None, None, "lap", 80.0, 1)
    assert y[0].tolist() == [[0.0, 1.0], [1.0, 0.0]]
    hamming_loss(y).sum().backward()
    grad = w.grad[0]
    assert (grad.diagonal() > 0).all() and (grad[[0, 1], [1, 0]] < 0).all()  # (I - y) / lambda
    stepped = (w - 80.0 * w.grad).detach()
    assert float(hamming_loss(BlackBoxMatching.apply(stepped, None, None, "lap", 80.0, 1)).sum()) == 0.0


def _blackbox_grads(
    unary: np.ndarray,
    quadratic: np.ndarray | None,
    edges: np.ndarray | None,
    upstream: np.ndarray,
    solver: str,
    grad_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """dU (and dQ) that BlackBoxMatching returns for the upstream gradient dL/dy = `upstream`."""
    u = torch.tensor(unary, requires_grad=True)
    q = None if quadratic is None else torch.tensor(quadratic, requires_grad=True)
    e = None if edges is None else torch.from_numpy(edges)
    y = BlackBoxMatching.apply(u, q, e, solver, 5.0, 3, grad_scale)
    (y * torch.from_numpy(upstream)).sum().backward()
    return u.grad.numpy(), None if q is None else q.grad.numpy()


@pytest.mark.parametrize("solver", ["lap", "ipfp"])
def test_blackbox_gradient_passes_a_known_gradient_scale_through(solver: str) -> None:
    """The trainer scales the loss's gradient by sigma = 1 / grad_accum x fp16 loss scale after the
    loss. Told sigma (grad_scale), the backward returns exactly sigma x the unscaled gradient, so
    accumulation or loss scaling never changes the interpolation. Not told, the re-solve changes
    (the black-box gradient is not linear in dL/dy), which is why the trainer passes it.
    """
    rng = np.random.default_rng(3)
    p, n, k = 4, 7, 2
    edges = np.stack([_random_graph(rng, n, k) for _ in range(p)])
    unary = rng.normal(size=(p, n, n))
    quadratic = rng.normal(size=(p, n * k, n * k)) if solver == "ipfp" else None
    upstream = np.stack([(1 - 2 * np.eye(n)) / n * (i + 1) for i in range(p)])  # Hamming-like
    upstream[-1] = 0.0  # no gradient for one problem: zeros, no re-solve
    du, dq = _blackbox_grads(unary, quadratic, edges, upstream, solver)
    assert np.abs(du[:-1]).sum() > 0 and (du[-1] == 0).all()  # not vacuous
    if solver == "ipfp":
        assert dq is not None and np.abs(dq[:-1]).sum() > 0 and (dq[-1] == 0).all()
    for c in (0.25, 1000.0):
        du_c, dq_c = _blackbox_grads(unary, quadratic, edges, c * upstream, solver, grad_scale=c)
        np.testing.assert_allclose(du_c, c * du, rtol=1e-12, atol=0)
        if solver == "ipfp":
            np.testing.assert_allclose(dq_c, c * dq, rtol=1e-12, atol=0)
    du_blind, _ = _blackbox_grads(unary, quadratic, edges, 1000.0 * upstream, solver)
    assert not np.allclose(du_blind, 1000.0 * du)  # without grad_scale the interpolation changes
    du_inf, _ = _blackbox_grads(unary, quadratic, edges, np.where(upstream > 0, np.inf, upstream), solver)
    assert np.isnan(du_inf[:-1]).all() and (du_inf[-1] == 0).all()  # an overflow is passed on, not solved


def _brute_force_qap(unary: np.ndarray, quadratic: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The exact minimiser of <U, y> + <Q, z(y)> over all permutations (small B only)."""
    n = unary.shape[0]
    lookup = np.full((n, n), -1)
    lookup[edges[0], edges[1]] = np.arange(edges.shape[1])
    best = min(
        itertools.permutations(range(n)),
        key=lambda cols: _perm_objective(np.array(cols), unary, quadratic, edges, lookup),
    )
    return np.eye(n)[list(best)]


def test_blackbox_quadratic_gradient_with_an_exact_qap_solver(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an exact QAP solver injected for 'ipfp', (dU, dQ) is the gradient of the interpolation.

    The objective <U, y> + <Q, z(y)> is linear in theta = (U, Q) with features phi(y) = (y, z(y)), and a
    loss L(y) = <c, y> perturbs only the U part, so the argument of the linear-loss test applies in
    theta-space: grad f_lam(theta) = -(phi(y) - phi(y_lam)) / lam. The IPFP
    heuristic is not an exact argmin, so the check runs against a brute force over the B! permutations.
    """
    import llava_ultra.model.align as align_mod

    def exact(solver, unary, quadratic=None, edges1=None, edges2=None, iters=10):  # noqa: ANN001, ANN202
        assert solver == "ipfp" and edges1 is edges2
        return _brute_force_qap(unary, quadratic, edges1)

    monkeypatch.setattr(align_mod, "solve", exact)
    rng = np.random.default_rng(4)
    b, k, lam, eps = 5, 2, 2.0, 1e-6
    edges = _random_graph(rng, b, k)
    e = b * k

    def f_lam(w: np.ndarray, q: np.ndarray, c: np.ndarray) -> float:
        lam_eff = lam
        y, y_lam = _brute_force_qap(w, q, edges), _brute_force_qap(w + lam_eff * c, q, edges)

        def j(v: np.ndarray) -> float:
            return float((w * v).sum() + (q * edge_matches(v, edges, edges)).sum())

        return float((c * y_lam).sum()) - (j(y) - j(y_lam)) / lam_eff

    nonzero_q = 0
    for trial in range(4):
        w, q = rng.normal(size=(b, b)), rng.normal(size=(e, e))
        c = rng.normal(size=(b, b))
        wt, qt = torch.tensor(w[None], requires_grad=True), torch.tensor(q[None], requires_grad=True)
        y = BlackBoxMatching.apply(wt, qt, torch.from_numpy(edges[None]), "ipfp", lam, 1)
        (torch.from_numpy(c) * y).sum().backward()
        gw, gq = wt.grad[0].numpy(), qt.grad[0].numpy()
        nonzero_q += bool(np.abs(gq).sum() > 0)
        for _ in range(3):
            dw, dq = rng.normal(size=(b, b)), rng.normal(size=(e, e))
            fd = (f_lam(w + eps * dw, q + eps * dq, c) - f_lam(w - eps * dw, q - eps * dq, c)) / (2 * eps)
            scale = float(np.abs(c).max())
            assert (gw * dw).sum() + (gq * dq).sum() == pytest.approx(fd, abs=1e-6 * scale), f"trial {trial}"
    assert nonzero_q >= 2  # the quadratic part of the check is not vacuous


# -------------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("solver", ["lap", "ipfp"])
def test_loss_zero_for_identical_views_and_positive_when_shuffled(solver: str) -> None:
    torch.manual_seed(0)
    align = MultiGraphAlign(AlignConfig(weight=1.0, solver=solver, hidden=64), dim=32).eval()
    x = torch.randn(16, 32)
    same = align(x, x, x)
    assert float(same.loss.detach()) == 0.0 and not same.skipped and same.nodes == 16
    assert float(align(x, x, x).loss.detach()) == 0.0  # eval mode: no noise, deterministic
    shuffled = align(x[torch.randperm(16)], x, x)
    assert float(shuffled.loss.detach()) > 0
    assert shuffled.per_view["image"] > 0
    assert float(align(x[torch.randperm(16)], x, x).loss.detach()) <= 2.0


def test_noise_only_while_training() -> None:
    torch.manual_seed(0)
    align = MultiGraphAlign(AlignConfig(weight=1.0, noise=5.0, hidden=32), dim=16)
    x = torch.randn(12, 16)
    assert float(align.eval()(x, x, x).loss.detach()) == 0.0
    torch.manual_seed(1)
    assert float(align.train()(x, x, x).loss.detach()) > 0  # noise this large scrambles the matching


# ------------------------------------------------------------------------------ gradient flow


def test_gradients_reach_a_projector_and_the_gnn() -> None:
    torch.manual_seed(0)
    projector = nn.Linear(24, 32)
    align = MultiGraphAlign(AlignConfig(weight=1.0, hidden=64), dim=32).train()
    tokens = torch.randn(12, 5, 24)  # (B, N, D_vision)
    image = projector(tokens).mean(1)  # the image view: mean over projected tokens
    short, extended = torch.randn(12, 32), torch.randn(12, 32)
    out = align(image, short, extended)
    assert float(out.loss.detach()) > 0
    out.loss.backward()
    assert projector.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in align.parameters())


def test_gradients_reach_the_tiny_models_fusion_projector_and_llm() -> None:
    model = tiny_model()
    tok = tiny_tokenizer()
    n = 8
    batch = tiny_batch(model, [1] * n)
    feats = model.encode_images(batch["pixel_values_clip"], batch["pixel_values_sam"])  # (8, 16, 32)
    texts = [f"liver {'nodule ' * i}cyst" for i in range(n)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    short, keep_s = text_view(model.llm, input_ids, mask)
    extended, keep_e = text_view(model.llm, input_ids.flip(0), mask.flip(0))
    assert short.shape == (n, 32) and keep_s.all() and keep_e.all()
    img, keep_i = image_view(feats, [1] * n, 32)
    align = MultiGraphAlign(AlignConfig(weight=1.0, k=3, hidden=32), dim=32).eval()
    out = align(img, short, extended, keep_i & keep_s)
    assert float(out.loss.detach()) > 0
    out.loss.backward()
    assert model.fusion.clip_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.fusion.sam_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_text_view_ignores_padding_on_either_side() -> None:
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        view, keep = text_view(model.llm, ids, mask)
    assert keep.all()
    torch.testing.assert_close(view[0], view[1], atol=1e-5, rtol=1e-5)


def test_build_views_pools_the_right_positions() -> None:
    feats = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)  # S=3 images, N=2 tokens
    hidden = torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(3, 4, 4)  # (B=3, T=4, D=4)
    labels = torch.tensor([[-100, 7, 8, -100], [-100, -100, 9, -100], [-100, -100, -100, -100]])
    extended = torch.ones(3, 4)
    views = build_views(feats, [2, 0, 1], hidden, labels, extended)
    torch.testing.assert_close(views.image[0], feats[:2].mean((0, 1)))
    torch.testing.assert_close(views.image[2], feats[2].mean(0))
    torch.testing.assert_close(views.short[0], hidden[0, 1:3].mean(0))
    torch.testing.assert_close(views.short[1], hidden[1, 2])
    assert views.keep.tolist() == [True, False, False]  # sample 1 has no image, sample 2 no answer
    with pytest.raises(DataError, match="add up to 2"):
        build_views(feats, [1, 0, 1], hidden, labels, extended)
    with pytest.raises(DataError, match="extended view"):
        build_views(feats, [2, 0, 1], hidden, labels, torch.ones(3, 5))


# ------------------------------------------------------------------------------- small batches


def test_batches_not_larger_than_k_are_skipped_counted_and_warned_once() -> None:
    align = MultiGraphAlign(AlignConfig(weight=1.0, k=5, hidden=16), dim=8).train()
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.warns(UserWarning, match="align.k=5"):
        out = align(x, x, x)
    assert out.skipped and out.nodes == 5 and float(out.loss.detach()) == 0.0
    out.loss.backward()  # still connected: every GNN parameter gets a (zero) gradient, as DDP needs
    assert all(p.grad is not None and float(p.grad.abs().sum()) == 0 for p in align.parameters())
    assert x.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep = torch.tensor([True] * 3 + [False] * 5)
        assert align(torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), keep).skipped
    assert align.skipped_batches == 2
    assert not align(torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 8)).skipped
    with pytest.raises(DataError, match="needs more than 5 nodes"):
        knn_edges(torch.randn(1, 5, 8), 5)


def test_config_validation() -> None:
    assert not AlignConfig().enabled and AlignConfig(weight=1.0).enabled
    with pytest.raises(ConfigError, match="lap, ipfp"):
        AlignConfig(solver="lpmp")
    for bad in ({"k": 0}, {"lam": 0.0}, {"hidden": 0}, {"noise": -1.0}, {"weight": -1.0}, {"ipfp_iters": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            AlignConfig(**bad)


# ------------------------------------------------------------------------------------ solvers


def test_solvers_return_permutations_and_lap_is_optimal() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 5, 9, 16):
        k = min(3, n - 1)
        edges = _random_graph(rng, n, k)
        unary = rng.normal(size=(n, n))
        quadratic = rng.normal(size=(edges.shape[1], edges.shape[1]))
        assert _is_permutation(solve_lap(unary))
        assert _is_permutation(solve_ipfp(unary, quadratic, edges, edges, iters=5))
    unary = rng.normal(size=(5, 5))
    best = min(unary[np.arange(5), list(p)].sum() for p in itertools.permutations(range(5)))
    assert (unary * solve_lap(unary)).sum() == pytest.approx(best)


def test_ipfp_never_worse_than_lap_and_sometimes_better() -> None:
    rng = np.random.default_rng(1)
    better = 0
    for _ in range(20):
        n, k = 8, 3
        edges = _random_graph(rng, n, k)
        unary = rng.normal(size=(n, n))
        quadratic = rng.normal(size=(n * k, n * k))
        j_lap = qap_objective(solve_lap(unary), unary, quadratic, edges, edges)
        j_ipfp = qap_objective(solve_ipfp(unary, quadratic, edges, edges), unary, quadratic, edges, edges)
        assert j_ipfp <= j_lap + 1e-9
        better += j_ipfp < j_lap - 1e-9
    assert better >= 5


def test_quadratic_objective_pieces_agree() -> None:
    """The fast permutation score and the IPFP gradient agree with the plain definitions."""
    rng = np.random.default_rng(2)
    n, k = 7, 2
    edges = _random_graph(rng, n, k)
    unary, quadratic = rng.normal(size=(n, n)), rng.normal(size=(n * k, n * k))
    lookup = np.full((n, n), -1)
    lookup[edges[0], edges[1]] = np.arange(n * k)
    for _ in range(5):
        cols = rng.permutation(n)
        y = np.eye(n)[cols]
        assert _perm_objective(cols, unary, quadratic, edges, lookup) == pytest.approx(
            qap_objective(y, unary, quadratic, edges, edges)
        )
    x, d, eps = rng.random((n, n)), rng.normal(size=(n, n)), 1e-6

    def q(v: np.ndarray) -> float:
        return float((quadratic * edge_matches(v, edges, edges)).sum())

    fd = (q(x + eps * d) - q(x - eps * d)) / (2 * eps)
    assert (_quadratic_grad(x, quadratic, edges, edges) * d).sum() == pytest.approx(fd, rel=1e-5)


def test_ipfp_module_gives_gradients_to_the_gnn() -> None:
    torch.manual_seed(0)
    align = MultiGraphAlign(AlignConfig(weight=1.0, solver="ipfp", k=3, hidden=32, ipfp_iters=3), dim=16)
    views = [torch.randn(10, 16) for _ in range(3)]
    out = align.train()(*views)
    out.loss.backward()
    grads = [p.grad for p in align.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
