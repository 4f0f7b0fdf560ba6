"""LoGra-Med multi-graph alignment: an optional auxiliary loss tying image, answer and extended caption.

Per batch of B samples there are three views, each (B, D) in the LLM width (`build_views`):

    image     mean over tokens of the selected, fused projector output     (S, N, D) -> (B, D)
    short     mean of the LLM's last hidden states over the answer tokens  (B, T, D) -> (B, D)
    extended  mean of the LLM's last hidden states over the extended caption, a text-only pass

Each view is L2-normalised per sample (the projector output and the LLM hidden states live on very
different scales) and the barycenter is the mean of the three. For each view M the loss is
mean(align(M, bary), align(bary, M)); the total is the mean over the three views.

align(G1, G2), both (B, D), nodes = samples:
    1. graph : kNN (k, cosine) on G1's nodes; G2 gets the SAME edges. Edges are directed i -> j for the
               k neighbours j of i (E = B*k); the GNN uses the symmetrised adjacency with self-loops.
    2. GNN   : two graph convolutions shared by every view and both graphs, each
               h' = A_hat h W_nbr + h W_root (no bias), ReLU between them, A_hat = D^-1/2 (A + I) D^-1/2;
               edge features are endpoint differences h[j] - h[i].
    3. costs : unary   U[i, j] = -(cos(h1_i, h2_j) + g - 0.5)                   (B, B)
               quadratic Q[a, b] = -(cos(e1_a, e2_b) + g - 0.5)                  (E, E)
               g ~ noise * Gumbel(0, 1) while training, 0 in eval mode (deterministic).
    4. solve : y = argmin <U, y> (+ <Q, z(y)>) over permutation matrices; z(y)[a, b] = 1 when edge a
               of G1 lands on edge b of G2 under y.
    5. loss  : Hamming(y, I) / B = (#entries where y and I differ) / B, in [0, 2].

Solvers (`AlignConfig.solver`). LoGra-Med uses LPMP's graph-matching solver, which is not on the
package registries here; we substitute:
    'lap'  : scipy `linear_sum_assignment` on U alone (exact for the linear problem; Q is never
             computed, so the quadratic term has no effect and receives no gradient).
    'ipfp' : an IPFP / Frank-Wolfe heuristic for the full quadratic objective J(y) = <U, y> + <Q, z(y)>:
             start from the 'lap' solution; repeat `ipfp_iters` times: linearise J at the current
             (continuous) point, take the permutation minimising the linearisation (a LAP), do an
             exact line search on the segment (J is quadratic along it), keep the best permutation
             seen. It never returns a permutation worse than the 'lap' one under J.

Black-box differentiation (Vlastelica et al. 2020) in `BlackBoxMatching`: the forward pass solves
y = solver(U, Q); the backward pass receives dL/dy, re-solves y' = solver(U + lam * dL/dy, Q) and returns
dU = -(y - y') / lam and, for 'ipfp', dQ = -(z(y) - z(y')) / lam. This is the exact gradient of the
piecewise-linear interpolation f_lam(w) = L(y_lam(w)) - [<w, y(w)> - <w, y_lam(w)>] / lam of the loss.
The re-solve is not linear in dL/dy, so a factor the trainer puts on the gradient *after* the loss
(accelerate's 1 / grad_accum, an fp16 loss scale) would change the interpolation and mis-size the
result. `MultiGraphAlign.grad_scale` names that known factor sigma (the trainer sets it each step):
the backward divides it out before the re-solve and multiplies it back after, so the loss
`train.align_weight * L_align` gets the same gradient under any accumulation or loss scaling. A
non-finite dL/dy (an fp16 overflow) gives NaN gradients, which the loss scaler skips.

Batches with B <= k cannot build a kNN graph: `MultiGraphAlign` skips them (loss 0, still connected to
the GNN parameters so DDP sees every parameter used), counts them in `skipped_batches` and warns once.
The config's `weight` is applied by the caller (the trainer): `loss = lm_loss + cfg.weight * align.loss`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import ConfigError, DataError

SOLVERS = ("lap", "ipfp")
VIEWS = ("image", "short", "extended")
IGNORE_INDEX = -100


@dataclass
class AlignConfig:
    """Settings of the LoGra-Med alignment loss (off by default)."""

    weight: float = 0.0
    """Weight of the alignment loss added to the LM loss; 0 turns it off (LoGra-Med uses 1.0)."""
    k: int = 5
    """Neighbours per node in the kNN graph; batches of at most k samples are skipped."""
    lam: float = 80.0
    """Black-box interpolation strength lambda (the perturbed re-solve uses costs w + lam * dL/dy)."""
    hidden: int = 256
    """Width of the two graph-convolution layers."""
    solver: str = "lap"
    """'lap' (linear assignment on the unary costs) or 'ipfp' (quadratic-assignment heuristic)."""
    noise: float = 0.1
    """Scale of the Gumbel noise added to the cosine affinities while training (0 = none)."""
    ipfp_iters: int = 10
    """Iterations of the 'ipfp' heuristic."""

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(
                f"align.solver={self.solver!r} is not supported; use one of {', '.join(SOLVERS)}"
            )
        if self.weight < 0:
            raise ConfigError(f"align.weight={self.weight} must be >= 0 (0 turns the loss off)")
        if self.k < 1:
            raise ConfigError(f"align.k={self.k} must be >= 1 (and below the per-device batch size)")
        for name in ("lam", "hidden", "ipfp_iters"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"align.{name}={getattr(self, name)} must be > 0")
        if self.noise < 0:
            raise ConfigError(f"align.noise={self.noise} must be >= 0 (0 disables the Gumbel noise)")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


# ------------------------------------------------------------------------------------ the views


@dataclass
class AlignViews:
    """The three (B, D) views of a batch and which samples have all three (`keep`, (B,) bool)."""

    image: torch.Tensor
    short: torch.Tensor
    extended: torch.Tensor
    keep: torch.Tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D), (B, T) -> mean over the masked positions (B, D), and (B,) rows with any position."""
    mask = mask.to(device=x.device, dtype=x.dtype).unsqueeze(-1)  # (B, T, 1)
    count = mask.sum(1)  # (B, 1)
    return (x * mask).sum(1) / count.clamp(min=1), count.squeeze(-1) > 0


def image_view(
    image_feats: torch.Tensor | None, images_per_sample: Sequence[int], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over all tokens of each sample's selected images: (S, N, D) -> (B, D), keep (B,).

    `images_per_sample[b]` is how many of the S selected images belong to sample b (in order), i.e.
    `[len(i) for i in selection.indices]`; samples with none get a zero row and keep=False.
    """
    counts = [int(c) for c in images_per_sample]
    total = 0 if image_feats is None else image_feats.shape[0]
    if sum(counts) != total:
        raise DataError(
            f"images_per_sample {counts} add up to {sum(counts)} but image_feats holds {total} images; "
            f"pass [len(i) for i in selection.indices] of the same forward pass"
        )
    keep = torch.tensor([c > 0 for c in counts], dtype=torch.bool)
    if image_feats is None:
        return torch.zeros(len(counts), dim), keep
    per_image = image_feats.mean(1)  # (S, D)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=per_image.device), torch.tensor(counts))
    sums = per_image.new_zeros(len(counts), per_image.shape[1]).index_add(
        0, owner.to(per_image.device), per_image
    )
    denom = torch.tensor(counts, dtype=per_image.dtype, device=per_image.device).clamp(min=1).unsqueeze(1)
    return sums / denom, keep.to(per_image.device)


def text_view(
    llm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A text-only LLM pass (no LM head) -> mean of the last hidden states over real tokens (B, D), keep.

    Used for the extended captions. `llm` is the causal LM (`UltraModel.llm`, LoRA-wrapped or not);
    its decoder is run so no (B, T, V) logits are materialised. Left or right padding both work.
    """
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    device = next(llm.parameters()).device
    attention_mask = attention_mask.to(device)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask, position_ids=positions)
    return masked_mean(out.last_hidden_state, attention_mask)


def build_views(
    image_feats: torch.Tensor | None,
    images_per_sample: Sequence[int],
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    extended: torch.Tensor,
    extended_keep: torch.Tensor | None = None,
) -> AlignViews:
    """The three views from one forward pass plus the extended-caption view.

    image_feats: (S, N, D) selected fused image tokens; images_per_sample: S split per sample;
    hidden_states: (B, T, D) last LLM hidden states; labels: (B, T) with -100 off the answer tokens
    (the answer tokens are where labels != -100, unshifted); extended: (B, D) from `text_view`.
    A sample missing a view (no image, no answer token, empty caption) has keep=False.
    """
    batch, dim = hidden_states.shape[0], hidden_states.shape[-1]
    if extended.shape != (batch, dim):
        raise DataError(f"extended view has shape {tuple(extended.shape)}, expected ({batch}, {dim})")
    img, img_keep = image_view(image_feats, images_per_sample, dim)
    if img.shape[0] != batch:
        raise DataError(f"images_per_sample has {img.shape[0]} entries for a batch of {batch} samples")
    short, short_keep = masked_mean(hidden_states, labels.to(hidden_states.device) != IGNORE_INDEX)
    keep = img_keep.to(short.device) & short_keep
    if extended_keep is not None:
        keep = keep & extended_keep.to(short.device)
    return AlignViews(image=img.to(short.device), short=short, extended=extended.to(short.device), keep=keep)


# --------------------------------------------------------------------------------------- solvers


def solve_lap(unary: np.ndarray) -> np.ndarray:
    """The permutation matrix (B, B) minimising <unary, y> (scipy's Hungarian-type solver)."""
    rows, cols = linear_sum_assignment(unary)
    y = np.zeros_like(unary, dtype=np.float64)
    y[rows, cols] = 1.0
    return y


def edge_matches(y: np.ndarray, edges1: np.ndarray, edges2: np.ndarray) -> np.ndarray:
    """z (E1, E2): z[a, b] = y[s1_a, s2_b] * y[t1_a, t2_b], 1 where y maps edge a of G1 onto edge b of G2.

    Works for continuous y too (then it is the bilinear term of the quadratic objective).
    """
    return y[np.ix_(edges1[0], edges2[0])] * y[np.ix_(edges1[1], edges2[1])]


def qap_objective(
    y: np.ndarray, unary: np.ndarray, quadratic: np.ndarray, edges1: np.ndarray, edges2: np.ndarray
) -> float:
    """J(y) = <U, y> + <Q, z(y)>, the graph-matching objective the 'ipfp' solver minimises."""
    return float((unary * y).sum() + (quadratic * edge_matches(y, edges1, edges2)).sum())


def _quadratic_grad(
    x: np.ndarray, quadratic: np.ndarray, edges1: np.ndarray, edges2: np.ndarray
) -> np.ndarray:
    """d<Q, z(x)>/dx (B, B): each edge pair (a, b) couples x[s1_a, s2_b] with x[t1_a, t2_b]."""
    (s1, t1), (s2, t2) = edges1, edges2
    n = x.shape[0]
    grad = np.zeros(n * n)
    # dz[a,b]/dx[s1_a, s2_b] = x[t1_a, t2_b]  and  dz[a,b]/dx[t1_a, t2_b] = x[s1_a, s2_b]
    for (src1, src2), (oth1, oth2) in (((s1, s2), (t1, t2)), ((t1, t2), (s1, s2))):
        weights = quadratic * x[np.ix_(oth1, oth2)]  # (E1, E2)
        cells = src1[:, None] * n + src2[None, :]  # flat (B, B) index of each pair's variable
        grad += np.bincount(cells.ravel(), weights=weights.ravel(), minlength=n * n)
    return grad.reshape(n, n)


def _perm_objective(
    cols: np.ndarray, unary: np.ndarray, quadratic: np.ndarray, edges1: np.ndarray, lookup: np.ndarray
) -> float:
    """J of the permutation i -> cols[i] in O(B + E): `lookup[u, v]` is the index of edge u -> v in G2 or -1."""
    (s1, t1), n = edges1, unary.shape[0]
    hit = lookup[cols[s1], cols[t1]]  # (E1,) the G2 edge each G1 edge lands on
    on = hit >= 0
    return float(unary[np.arange(n), cols].sum() + quadratic[np.flatnonzero(on), hit[on]].sum())


def solve_ipfp(
    unary: np.ndarray, quadratic: np.ndarray, edges1: np.ndarray, edges2: np.ndarray, iters: int = 10
) -> np.ndarray:
    """Best permutation found by IPFP (Leordeanu et al. 2009) for min J(y), started from `solve_lap`.

    Each iteration linearises J at the continuous point x, solves the linearisation exactly (a LAP),
    and moves x along the segment to that permutation by an exact line search (J restricted to the
    segment is a quadratic in t). Every permutation visited (and the rounding of the last x) is scored
    under J and the best is kept, so the result is never worse than the unary-only LAP solution. Stops
    early at a stationary point. Edges of G2 must be distinct (a kNN graph's are).
    """
    n = unary.shape[0]
    lookup = np.full((n, n), -1)
    lookup[edges2[0], edges2[1]] = np.arange(edges2.shape[1])

    def score(y: np.ndarray) -> float:
        return _perm_objective(y.argmax(1), unary, quadratic, edges1, lookup)

    x = best = solve_lap(unary)
    best_j = score(best)
    for _ in range(iters):
        grad = unary + _quadratic_grad(x, quadratic, edges1, edges2)
        d = solve_lap(grad)
        if (d_j := score(d)) < best_j:
            best, best_j = d, d_j
        delta = d - x
        slope = float((grad * delta).sum())  # dJ/dt at t = 0 (never positive: d minimises the linearisation)
        if slope >= -1e-12:
            break
        curve = float(
            (quadratic * edge_matches(delta, edges1, edges2)).sum()
        )  # J = .. + t * slope + t^2 * curve
        t = 1.0 if curve <= 0 else min(1.0, -slope / (2 * curve))
        x = x + t * delta
    rounded = solve_lap(-x)  # the permutation closest to the final continuous point
    return rounded if score(rounded) < best_j else best


def solve(
    solver: str,
    unary: np.ndarray,
    quadratic: np.ndarray | None = None,
    edges1: np.ndarray | None = None,
    edges2: np.ndarray | None = None,
    iters: int = 10,
) -> np.ndarray:
    """Dispatch to the named solver; 'ipfp' needs the quadratic costs and both edge lists."""
    if solver == "lap":
        return solve_lap(unary)
    if solver == "ipfp":
        if quadratic is None or edges1 is None or edges2 is None:
            raise ValueError("solver 'ipfp' needs quadratic costs and the edge lists of both graphs")
        return solve_ipfp(unary, quadratic, edges1, edges2, iters)
    raise ConfigError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")


class BlackBoxMatching(torch.autograd.Function):
    """P independent matchings y_p = solver(U_p, Q_p) with Vlastelica et al.'s black-box gradient.

    apply(unary (P, B, B), quadratic (P, E, E) | None, edges (P, 2, E) | None, solver, lam, iters,
    grad_scale) -> y (P, B, B) permutation matrices in unary's dtype and device. G2 uses G1's edges, so
    one edge list per problem serves both graphs. Backward, with g_p = dL/dy_p / grad_scale (the
    gradient of the loss itself): y'_p = solver(U_p + lam * g_p, Q_p), dU_p = -grad_scale * (y_p - y'_p)
    / lam and, when Q is given, dQ_p = -grad_scale * (z(y_p) - z(y'_p)) / lam; zeros when g_p = 0
    (then y' = y). A non-finite g_p gives NaN gradients for that problem instead of a solver error.
    """

    @staticmethod
    def forward(ctx, unary, quadratic, edges, solver, lam, iters, grad_scale=1.0):  # type: ignore[override]
        u = unary.detach().double().cpu().numpy()
        q = None if quadratic is None else quadratic.detach().double().cpu().numpy()
        e = None if edges is None else edges.cpu().numpy()
        y = np.stack([_solve_one(solver, u, q, e, p, iters) for p in range(u.shape[0])])
        ctx.solved = (u, q, e, y)
        ctx.settings = (solver, lam, iters, float(grad_scale))
        return torch.from_numpy(y).to(device=unary.device, dtype=unary.dtype)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        u, q, e, y = ctx.solved
        solver, lam, iters, sigma = ctx.settings
        g = grad_y.detach().double().cpu().numpy() / sigma  # dL/dy of the loss itself
        grad_u = np.zeros_like(u)
        grad_q = None if q is None or not ctx.needs_input_grad[1] else np.zeros_like(q)
        for p in range(u.shape[0]):
            if not (g[p] != 0).any():  # no upstream gradient: y' = y
                continue
            if not np.isfinite(g[p]).all():  # overflowed (fp16 loss scale): pass it on, do not solve on inf
                grad_u[p] = np.nan
                if grad_q is not None:
                    grad_q[p] = np.nan
                continue
            qp, ep = (None, None) if q is None else (q[p], e[p])
            y_lam = solve(solver, u[p] + lam * g[p], qp, ep, ep, iters)
            grad_u[p] = -sigma * (y[p] - y_lam) / lam
            if grad_q is not None:
                grad_q[p] = -sigma * (edge_matches(y[p], ep, ep) - edge_matches(y_lam, ep, ep)) / lam

        def to_grad(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device=grad_y.device, dtype=grad_y.dtype)

        return to_grad(grad_u), to_grad(grad_q), None, None, None, None, None


def _solve_one(
    solver: str, unary: np.ndarray, quadratic: np.ndarray | None, edges: np.ndarray | None, p: int, iters: int
) -> np.ndarray:
    q = None if quadratic is None else quadratic[p]
    e = None if edges is None else edges[p]
    return solve(solver, unary[p], q, e, e, iters)


def hamming_loss(y: torch.Tensor) -> torch.Tensor:
    """(..., B, B) matchings -> (...) Hamming distance to the identity divided by B (0 when y = I)."""
    n = y.shape[-1]
    eye = torch.eye(n, device=y.device, dtype=y.dtype)
    return (y * (1 - eye) + (1 - y) * eye).sum((-2, -1)) / n


# ------------------------------------------------------------------------------- graphs and GNN


def knn_edges(x: torch.Tensor, k: int) -> torch.Tensor:
    """(P, B, D) -> directed edges (P, 2, B*k): node i -> each of its k nearest neighbours (cosine)."""
    n = x.shape[-2]
    if n <= k:
        raise DataError(f"a kNN graph with k={k} needs more than {k} nodes, got {n}; lower align.k")
    xn = F.normalize(x.detach(), dim=-1)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    sim = (xn @ xn.transpose(-1, -2)).masked_fill(eye, float("-inf"))  # (P, B, B), no self-loops
    nbrs = sim.topk(k, dim=-1).indices.flatten(-2)  # (P, B*k)
    src = torch.arange(n, device=x.device).repeat_interleave(k).expand_as(nbrs)
    return torch.stack([src, nbrs], dim=-2)


def normalized_adjacency(edges: torch.Tensor, n: int) -> torch.Tensor:
    """(P, 2, E) -> A_hat = D^-1/2 (A + I) D^-1/2 (P, n, n) of each symmetrised graph."""
    batch = torch.arange(edges.shape[0], device=edges.device)[:, None]
    adj = torch.zeros(edges.shape[0], n, n, device=edges.device)
    adj[batch, edges[:, 0], edges[:, 1]] = 1.0
    adj = torch.maximum(adj, adj.transpose(-1, -2)) + torch.eye(n, device=edges.device)
    d = adj.sum(-1).rsqrt()  # (P, n)
    return d[..., :, None] * adj * d[..., None, :]


class GraphConv(nn.Module):
    """One graph convolution h' = A_hat h W_nbr + h W_root (no bias).

    The root term keeps each node's own features beside its neighbourhood mean. Without it, because
    G2 copies G1's edges, node i of both graphs averages over the same neighbour indices and the
    identity matching looks right from the shared structure alone, whatever the features say.
    No bias: a shared bias would dominate the randomly initialised outputs and make every pair of
    nodes look alike (cosine near 1).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.nbr = nn.Linear(in_dim, out_dim, bias=False)
        self.root = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ self.nbr(h) + self.root(h)


class GNN(nn.Module):
    """Two graph convolutions with a ReLU between them (none on the output, which feeds cosines)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = GraphConv(in_dim, hidden)
        self.conv2 = GraphConv(hidden, hidden)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """(..., B, D) node features, (..., B, B) A_hat -> (..., B, H)."""
        return self.conv2(torch.relu(self.conv1(x, adj)), adj)


def _gumbel_like(x: torch.Tensor) -> torch.Tensor:
    u = torch.rand_like(x).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, H), (..., M, H) -> (..., N, M) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


# ------------------------------------------------------------------------------------ the module


@dataclass
class AlignOutput:
    """What `MultiGraphAlign.forward` returns."""

    loss: torch.Tensor
    """Unweighted alignment loss (scalar); the caller adds `cfg.weight * loss`."""
    per_view: dict[str, float]
    """Loss of each view (image, short, extended) for logging."""
    nodes: int
    """Samples that entered the graphs (those with all three views)."""
    skipped: bool
    """True when the batch had too few samples (nodes <= k) and the loss is a connected zero."""


class MultiGraphAlign(nn.Module):
    """The LoGra-Med loss with its shared GNN (its only parameters: `gnn.conv{1,2}.{nbr,root}.weight`)."""

    def __init__(self, cfg: AlignConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.gnn = GNN(dim, cfg.hidden)
        self.skipped_batches = 0
        self.grad_scale = 1.0
        """Known factor on the upstream gradient (1 / grad_accum x loss scale): divided out before the
        black-box re-solve, multiplied back after (see BlackBoxMatching). The trainer sets it."""

    def _noisy(self, affinity: torch.Tensor) -> torch.Tensor:
        """Add noise * Gumbel(0, 1) while training with noise > 0; unchanged otherwise."""
        if self.training and self.cfg.noise > 0:
            return affinity + self.cfg.noise * _gumbel_like(affinity)
        return affinity

    def align(self, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """(P, B, D) pairs of graphs -> (P,) Hamming loss / B of matching G1's nodes to G2's on G1's kNN graph."""
        n = g1.shape[-2]
        edges = knn_edges(g1, self.cfg.k)  # (P, 2, E)
        adj = normalized_adjacency(edges, n)  # (P, B, B)
        h = self.gnn(torch.cat([g1, g2]), torch.cat([adj, adj]))  # both graphs in one batched pass
        h1, h2 = h.chunk(2)  # (P, B, H) each
        unary = -(self._noisy(_cosine(h1, h2)) - 0.5)  # (P, B, B)
        quadratic = None
        if self.cfg.solver == "ipfp":
            src, dst = edges[:, 0, :, None], edges[:, 1, :, None]  # (P, E, 1)
            e1 = h1.take_along_dim(dst, 1) - h1.take_along_dim(src, 1)  # (P, E, H)
            e2 = h2.take_along_dim(dst, 1) - h2.take_along_dim(src, 1)
            quadratic = -(self._noisy(_cosine(e1, e2)) - 0.5)  # (P, E, E)
        y = BlackBoxMatching.apply(
            unary, quadratic, edges, self.cfg.solver, self.cfg.lam, self.cfg.ipfp_iters, self.grad_scale
        )
        return hamming_loss(y)

    def forward(
        self,
        image: torch.Tensor,
        short: torch.Tensor,
        extended: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> AlignOutput:
        """The alignment loss of three (B, D) views; rows with keep=False are left out."""
        weight = self.gnn.conv1.root.weight
        views = [v.to(device=weight.device, dtype=weight.dtype) for v in (image, short, extended)]
        if keep is not None:
            keep = keep.to(weight.device)
            views = [v[keep] for v in views]
        stacked = F.normalize(torch.stack(views), dim=-1)  # (3, B, D)
        n = stacked.shape[1]
        if n <= self.cfg.k:
            self.skipped_batches += 1
            if self.skipped_batches == 1:
                warnings.warn(
                    f"LoGra-Med alignment skipped: {n} usable samples in the batch but align.k="
                    f"{self.cfg.k} needs more; raise the per-device batch size or lower align.k "
                    f"(skipped batches are counted in MultiGraphAlign.skipped_batches)",
                    stacklevel=2,
                )
            zero = sum(p.sum() for p in self.parameters()) * 0.0 + stacked.sum() * 0.0
            return AlignOutput(loss=zero, per_view=dict.fromkeys(VIEWS, 0.0), nodes=n, skipped=True)
        bary = stacked.mean(0, keepdim=True).expand_as(stacked)  # (3, B, D)
        # the six matchings in one batch: align(M, bary) for each view M, then align(bary, M)
        losses = self.align(torch.cat([stacked, bary]), torch.cat([bary, stacked]))  # (6,)
        per_view = 0.5 * (losses[:3] + losses[3:])  # (3,)
        return AlignOutput(
            loss=per_view.mean(),
            per_view={name: float(x) for name, x in zip(VIEWS, per_view.detach(), strict=True)},
            nodes=n,
            skipped=False,
        )
