"""Expert placement by co-activation: which experts share an expert-parallel rank.

Speculative MoE (Li et al. 2025, "Speculative MoE: Communication Efficient Parallel MoE Inference
with Speculative Token and Expert Pre-scheduling") groups experts that tokens select together onto
the same rank, so that a token's experts span fewer ranks. Here, per MoE layer, from the routing
statistics' co-activation matrix C [E, E] (C[i, j] = calibration tokens that selected both i and j):

    groups      E / EP experts per rank (equal counts: every rank holds the same expert slice size)
    objective   maximise the within-rank co-activation mass W = sum_{i<j, same rank} C[i, j]
    constraint  per-rank token load (sum of the counts of its experts) at most
                max(max_load_ratio, the current placement's ratio) x the mean rank load

For tokens with at most two experts (top-2 token choice) the expected number of distinct ranks a
token's experts span is exactly  E[experts per token] - W / tokens,  so maximising W minimises it;
with more experts per token W is the pairwise (second-order) part of the same count, and the
distinct-rank figures below are the pairwise estimate  sum_r (n_r - C(n_r, 2))  (exact when no
token has three experts on one rank).

Algorithm (`place_layer`): several starts (the current placement, a greedy grouping that seeds each
rank with the most co-activated free expert and adds the free expert most co-activated with the
group, and seeded random balanced partitions), each improved by steepest pairwise swaps between
ranks (Kernighan-Lin style; a swap keeps the counts equal) under the lexicographic key
(load-bound excess, -W) until no swap improves it; the best result wins. The current placement
is a start and meets the bound, so the result never has less within-rank mass than it, and never
breaks the bound. On E=8 the result is checked against exhaustive enumeration (tests).

The result is a permutation per layer, `perm[new] = old`: the expert at new index i is the old
expert perm[i]; rank r holds new indices [r * E/EP, (r+1) * E/EP). Groups are numbered onto ranks
so that as few experts as possible move (an assignment problem), and keep ascending order inside a
rank, so the identity comes out when the current placement is already the best. Experts that
must keep their index (ProMoE's unconditional expert, the last one) are pinned.

`permute_tensor` applies a permutation to one tensor of the model, named as in its state dict:
the stacked experts (w1, b1, w2, b2), the routers' gate rows (linear, MLP, cross-attention,
Sinkhorn, Selective Sinkhorn, expert choice, Expert Race, DiffMoE, DynMoLE), the aux-free
`expert_bias`, DiffMoE's capacity predictor output rows and per-expert threshold [E], ProMoE's
prototypes; null experts' rows (AdaMoE) stay where they are. What is not per expert (Expert Race's
scalar threshold, Selective Sinkhorn's step counter, ProMoE's scale, cross-attention projections,
the MLP gate's and DiffMoE predictor's hidden layers, layer-regularisation heads, shared experts)
is left alone, and an unknown tensor under a router or the experts raises, so a new router's
per-expert state is never left unpermuted by accident.

Timestep-band experts are refused (UNPLACEABLE_ROUTERS): band j owns the expert indices
[j P, (j + 1) P), so moving an expert to another index would move it to another noise band.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from megamoe.posttrain.trained_model import PostTrainError

DEFAULT_MAX_LOAD_RATIO = 1.10
"""Default bound on max rank load / mean rank load (unless the current placement is already worse)."""


# ---------------------------------------------------------------------------------------------
# Figures of a placement.


def rank_of(perm: np.ndarray | list, ep_size: int) -> np.ndarray:
    """[E] the rank of each OLD expert index under `perm` (perm[new] = old)."""
    perm = np.asarray(perm)
    per_rank = len(perm) // ep_size
    ranks = np.empty(len(perm), dtype=np.int64)
    ranks[perm] = np.arange(len(perm)) // per_rank
    return ranks


@dataclass
class PlacementFigures:
    distinct_ranks: float
    """Expected distinct ranks a token's experts span (pairwise estimate; exact for <= 2 experts per token)."""
    remote_assignments: float
    """Expected (token, expert) assignments per token whose expert is on another rank than the token
    (tokens spread evenly over the ranks): one row each for the current dispatcher."""
    remote_rank_sends: float
    """Expected other ranks per token that hold at least one of its experts: one row each for a
    dispatcher that sends a token once per destination rank."""
    within_rank_mass: float
    """W: co-activation pairs inside a rank, per token."""
    rank_load: list
    """Share of all assignments each rank receives (sums to 1)."""

    @property
    def imbalance(self) -> float:
        """Max rank load / mean rank load."""
        return max(self.rank_load) * len(self.rank_load)


def placement_figures(coactivation: torch.Tensor | np.ndarray, num_tokens: int, perm, ep_size: int) -> PlacementFigures:
    c = np.asarray(coactivation, dtype=np.float64)
    n = max(num_tokens, 1)
    counts = np.diag(c).copy()
    ranks = rank_of(perm, ep_size)
    same = ranks[:, None] == ranks[None, :]
    pairs = np.triu(c * same, k=1).sum()
    experts = counts.sum()
    distinct = (experts - pairs) / n
    loads = np.array([counts[ranks == r].sum() for r in range(ep_size)])
    share = loads / max(experts, 1e-300)
    return PlacementFigures(
        distinct_ranks=distinct,
        remote_assignments=experts / n * (1 - 1 / ep_size),
        remote_rank_sends=distinct * (1 - 1 / ep_size),
        within_rank_mass=pairs / n,
        rank_load=share.tolist(),
    )


# ---------------------------------------------------------------------------------------------
# The optimiser.


def _within_mass(c: np.ndarray, groups: np.ndarray) -> float:
    same = groups[:, None] == groups[None, :]
    return float((c * same).sum() / 2)  # c has a zero diagonal


def _excess(loads: np.ndarray, bound: float) -> float:
    return float(np.clip(loads - bound, 0, None).sum())


def _local_search(c: np.ndarray, counts: np.ndarray, groups: np.ndarray, ep: int, bound: float) -> np.ndarray:
    """Steepest pairwise swaps between ranks until none lowers (load excess, -W)."""
    groups = groups.copy()
    e = len(groups)
    eps = 1e-12 * max(c.sum(), 1.0)
    onehot = np.zeros((e, ep))
    for _ in range(50 * e):
        onehot[:] = 0
        onehot[np.arange(e), groups] = 1
        s = c @ onehot  # s[i, g]: co-activation of i with group g (zero diagonal: not with itself)
        loads = counts @ onehot
        si = s[np.arange(e), groups]  # with its own group
        s_other = s[:, groups]  # s_other[i, j] = s[i, group of j]
        # gain of swapping i and j (different groups)
        gain = (s_other - si[:, None]) + (s_other.T - si[None, :]) - 2 * c
        # load excess after the swap: groups of i and j change by -c_i + c_j and -c_j + c_i
        gi, gj = groups[:, None], groups[None, :]
        delta = counts[None, :] - counts[:, None]  # load change of i's group
        li, lj = loads[gi] + delta, loads[gj] - delta
        before = np.clip(loads - bound, 0, None)
        new_excess = (
            before.sum() - before[gi] - before[gj] + np.clip(li - bound, 0, None) + np.clip(lj - bound, 0, None)
        )
        valid = gi != gj
        excess_now = before.sum()
        better_excess = valid & (new_excess < excess_now - eps)
        if better_excess.any():
            score = np.where(better_excess, new_excess, np.inf)
            i, j = np.unravel_index(np.argmin(score), score.shape)
        else:
            ok = valid & (new_excess <= excess_now + eps) & (gain > eps)
            if not ok.any():
                break
            score = np.where(ok, gain, -np.inf)
            i, j = np.unravel_index(np.argmax(score), score.shape)
        groups[i], groups[j] = groups[j], groups[i]
    return groups


def _greedy(c: np.ndarray, ep: int) -> np.ndarray:
    e = len(c)
    per = e // ep
    groups = np.full(e, -1)
    free = set(range(e))
    for g in range(ep):
        seed = max(free, key=lambda i: (c[i, list(free)].sum(), -i))
        members = [seed]
        free.discard(seed)
        while len(members) < per:
            nxt = max(free, key=lambda i: (c[i, members].sum(), -i))
            members.append(nxt)
            free.discard(nxt)
        groups[members] = g
    return groups


def _key(c, counts, groups, bound) -> tuple[float, float]:
    loads = np.bincount(groups, weights=counts, minlength=groups.max() + 1)
    return _excess(loads, bound), -_within_mass(c, groups)


def _to_permutation(groups: np.ndarray, ep: int, pinned: tuple[int, ...]) -> np.ndarray:
    """perm[new] = old from a grouping: groups onto ranks moving the fewest experts, ascending inside a rank."""
    from scipy.optimize import linear_sum_assignment

    e = len(groups)
    per = e // ep
    home = np.arange(e) // per  # current rank of each old expert
    overlap = np.zeros((ep, ep))  # overlap[g, r]: experts of group g already on rank r
    np.add.at(overlap, (groups, home), 1)
    for p in pinned:  # a pinned expert's group must go to the rank of its index
        overlap[groups[p], :] -= 10 * e
        overlap[groups[p], home[p]] += 20 * e
    rows, cols = linear_sum_assignment(-overlap)
    rank_of_group = dict(zip(rows.tolist(), cols.tolist()))
    perm = np.empty(e, dtype=np.int64)
    for g in range(ep):
        members = sorted(np.flatnonzero(groups == g).tolist())
        r = rank_of_group[g]
        for p in pinned:  # keep a pinned expert at its own index inside the rank
            if p in members:
                members.remove(p)
                members.insert(p - r * per, p)
        perm[r * per : (r + 1) * per] = members
    for p in pinned:
        assert perm[p] == p
    return perm


def place_layer(
    coactivation,
    ep_size: int,
    max_load_ratio: float = DEFAULT_MAX_LOAD_RATIO,
    restarts: int = 16,
    seed: int = 0,
    pinned: tuple[int, ...] = (),
) -> np.ndarray:
    """perm [E] (perm[new] = old) placing E experts on `ep_size` ranks; see the module docstring.

    pinned: old expert indices that must keep their index (their group goes to their current rank)."""
    c = np.array(coactivation, dtype=np.float64)
    e = len(c)
    if ep_size < 1 or e % ep_size:
        raise PostTrainError(f"--ep-size {ep_size} does not divide the {e} experts of a layer; choose a divisor of {e}")
    counts = np.diag(c).copy()
    np.fill_diagonal(c, 0.0)
    c = (c + c.T) / 2
    if ep_size == 1 or ep_size == e:
        return np.arange(e)
    per = e // ep_size
    mean = counts.sum() / ep_size
    current = np.arange(e) // per
    current_loads = np.bincount(current, weights=counts, minlength=ep_size)
    bound = max(max_load_ratio * mean, current_loads.max())
    rng = np.random.default_rng(seed)
    starts = [current, _greedy(c, ep_size)]
    starts += [rng.permutation(current) for _ in range(restarts)]
    best, best_key = None, None
    for start in starts:
        groups = _local_search(c, counts, start, ep_size, bound)
        key = _key(c, counts, groups, bound)
        if best_key is None or key < best_key:
            best, best_key = groups, key
    # The current placement is feasible: only accept a change that strictly raises W.
    if _key(c, counts, current, bound) <= best_key:
        best = current
    return _to_permutation(best, ep_size, pinned)


def within_rank_mass(coactivation, perm, ep_size: int) -> float:
    """W of a placement: co-activation pairs inside a rank (raw counts, not per token)."""
    c = np.array(coactivation, dtype=np.float64)
    np.fill_diagonal(c, 0.0)
    c = (c + c.T) / 2
    return _within_mass(c, rank_of(perm, ep_size))


# ---------------------------------------------------------------------------------------------
# Applying a placement to the model's tensors.

_BLOCK = re.compile(r"^blocks\.(\d+)\.ffn\.(experts|router)\.(.+)$")
_STACKED = {"w1", "b1", "w2", "b2"}
# One row per expert (then, for the gate and the aux-free bias, one per null expert).
_GATE_ROWS = {"gate.weight", "gate.2.weight", "expert_bias", "predictor.2.weight", "predictor.2.bias"}
# Scalars and layers whose outputs are not experts. `threshold` is Expert Race's scalar here;
# DiffMoE's threshold has one entry per expert and is permuted (see permute_tensor).
_NOT_PER_EXPERT = re.compile(
    r"^(threshold|threshold_initialized|bias_update_count|coin_step|log_scale|(gate|predictor)\.0\.(weight|bias)"
    r"|(query|key|value)\.(weight|bias)|layer_reg_head\.(weight|bias))$"
)
UNPLACEABLE_ROUTERS = {
    "timestep_band": "band j owns the expert indices [j P, (j + 1) P), so moving an expert to another index would "
    "move it to another noise band; placement is not built for it",
}
"""Routers whose expert index means more than the expert's weights, and why: the tool refuses them."""


def pinned_experts(router: str, num_experts: int) -> tuple[int, ...]:
    """Experts whose index the router fixes: ProMoE's unconditional expert is the last one."""
    return (num_experts - 1,) if router == "promoe" else ()


def permute_tensor(name: str, tensor: torch.Tensor, perms: dict[int, torch.Tensor], num_experts: int) -> torch.Tensor:
    """`tensor` (state-dict key `name`, full shape) with the experts of its layer put in the order
    perms[block] (perm[new] = old); tensors not indexed by expert are returned as they are."""
    m = _BLOCK.match(name)
    if m is None or int(m.group(1)) not in perms:
        return tensor
    perm = perms[int(m.group(1))].long()
    part, rest = m.group(2), m.group(3)
    if part == "experts" and rest in _STACKED:
        return tensor.index_select(0, perm)
    if part == "router" and (rest in _GATE_ROWS or (rest == "threshold" and tensor.dim() == 1)):
        # rows >= num_experts are null experts (AdaMoE): they are not placed and stay where they are
        order = torch.cat([perm, torch.arange(num_experts, tensor.shape[0])])
        return tensor.index_select(0, order)
    if part == "router" and rest == "prototypes":
        if int(perm[-1]) != num_experts - 1:
            raise PostTrainError(f"{name}: ProMoE's unconditional expert (the last) must keep its index")
        conditional = num_experts - 1
        per = tensor.shape[0] // conditional
        return tensor.view(conditional, per, *tensor.shape[1:]).index_select(0, perm[:-1]).reshape(tensor.shape)
    if part == "router" and _NOT_PER_EXPERT.match(rest):
        return tensor
    raise PostTrainError(
        f"{name}: placement does not know whether this tensor is indexed by expert; "
        f"teach megamoe/posttrain/placement.py (permute_tensor) about it"
    )


def permute_state(state: dict[str, torch.Tensor], perms: dict[int, torch.Tensor], num_experts: int) -> dict:
    """A state dict (module keys, optionally with a 'kind/' prefix as in a checkpoint's state/) permuted."""
    out = {}
    for key, tensor in state.items():
        prefix, _, name = key.rpartition("/")
        out[key] = permute_tensor(name, tensor, perms, num_experts)
        del prefix
    return out
