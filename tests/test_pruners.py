"""Unit tests of the built-in pruners on small hand-made inputs, each checked against the method's formula."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vtprune.pruners  # noqa: F401  (registers the built-in pruners before the registry is used)
from vtprune.budget import Budget
from vtprune.errors import BudgetError, ConfigError, MissingCLSError
from vtprune.pruners.divprune import DivPrune, greedy_max_min, greedy_max_min_naive, pairwise_distance
from vtprune.pruners.fastervlm import FasterVLM
from vtprune.pruners.hiprune import HiPrune, default_object_layer, grid_neighbours, num_anchors
from vtprune.pruners.pool import Pool, pool_grid
from vtprune.pruners.random import RandomPruner
from vtprune.pruners.visionzip import VisionZip
from vtprune.registry import create_pruner, list_pruners
from vtprune.tokens import CLS_INDEX, EncoderInfo, TensorProbe, VisualTokens


def make_tokens(
    grid: tuple[int, int],
    depth: int = 4,
    feature_layer: int = 2,
    has_cls: bool = True,
    features: torch.Tensor | None = None,
    cls: dict | None = None,
    glob: dict | None = None,
    keys: dict | None = None,
    cls_feature: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
) -> VisualTokens:
    """One image's tokens; the probe tables map a layer to an un-batched tensor (the image dim is added here)."""
    n = grid[0] * grid[1]
    if features is None:
        features = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def batch(table: dict | None) -> dict:
        return {layer: torch.as_tensor(t, dtype=torch.float32)[None] for layer, t in (table or {}).items()}

    probe = TensorProbe(cls_attention=batch(cls), global_attention=batch(glob), keys=batch(keys))
    return VisualTokens(
        features,
        grid,
        EncoderInfo(depth=depth, feature_layer=feature_layer, has_cls=has_cls),
        probe=probe,
        cls_feature=cls_feature,
        embeddings=embeddings,
    )


def kept_set(reduction) -> set[int]:
    return set(reduction.order.tolist())


# --------------------------------------------------------------------------------------------------------- FasterVLM

# CLS rows of block 2 (= -2 of a 4-block encoder). Head means: [.25, .20, .28, .23, .02, .02] -> top-2 {0, 2},
# while head 0 alone ranks {0, 3} first, head 1 alone {1, 2}, and the max over heads {0, 1}.
FASTERVLM_CLS = [[0.50, 0.00, 0.24, 0.26, 0.00, 0.00], [0.00, 0.40, 0.32, 0.20, 0.04, 0.04]]
MISLEADING_CLS = [[0.0, 0.0, 0.0, 0.0, 0.5, 0.4], [0.0, 0.0, 0.0, 0.0, 0.4, 0.5]]  # top-2 {4, 5}
MISLEADING_GLOBAL = [0.1, 0.5, 0.05, 0.3, 0.02, 0.03]  # top-2 {1, 3}


def fastervlm_tokens(has_cls: bool = True) -> VisualTokens:
    return make_tokens(
        (2, 3),
        has_cls=has_cls,
        cls={2: FASTERVLM_CLS, 1: MISLEADING_CLS, 3: MISLEADING_CLS},
        glob={2: MISLEADING_GLOBAL, 3: [0.5, 0.4, 0, 0, 0, 0]},
    )


def test_fastervlm_keeps_topk_of_head_mean_cls_attention_of_layer_minus_2():
    pruner = FasterVLM(keep=2)
    assert pruner.attention_layers(EncoderInfo(4, 2, True)) == {2}
    reduction = pruner.reduce(fastervlm_tokens(), 2)
    assert reduction.order.tolist() == [0, 2]
    assert reduction.features is None
    # The per-head rankings disagree with the mean, so a per-head or max rule would fail above.
    heads = torch.tensor(FASTERVLM_CLS)
    assert set(heads[0].topk(2).indices.tolist()) == {0, 3}
    assert set(heads[1].topk(2).indices.tolist()) == {1, 2}
    assert set(heads.max(0).values.topk(2).indices.tolist()) == {0, 1}


def test_fastervlm_explicit_layer_reads_that_layer():
    pruner = FasterVLM(keep=2, layer=-1)
    assert pruner.attention_layers(EncoderInfo(4, 2, True)) == {3}
    assert pruner.reduce(fastervlm_tokens(), 2).order.tolist() == [4, 5]
    with pytest.raises(ConfigError, match="out of range"):
        FasterVLM(layer=4).attention_layers(EncoderInfo(4, 2, True))


def test_fastervlm_global_fallback_and_error_without_cls():
    tokens = fastervlm_tokens(has_cls=False)
    assert FasterVLM(keep=2).reduce(tokens, 2).order.tolist() == [1, 3]
    with pytest.raises(MissingCLSError, match="cls_fallback"):
        FasterVLM(keep=2, cls_fallback="error").reduce(tokens, 2)
    with pytest.raises(ConfigError, match="cls_fallback"):
        FasterVLM(cls_fallback="mean")


# --------------------------------------------------------------------------------------------------------- VisionZip


def visionzip_case(has_cls: bool = True, with_cls_feature: bool = True) -> VisualTokens:
    # 8 tokens on a 2x4 grid, x_i = [i, 10 - i]. Head sums of the CLS row: token 5 (0.55) > token 4 (0.50).
    cls = [[0.05, 0.1, 0.0, 0.0, 0.2, 0.3, 0.0, 0.05], [0.0, 0.0, 0.1, 0.0, 0.3, 0.25, 0.0, 0.0]]
    # Keys: targets 0 -> (3, 0) and 3 -> (0, 0.5). Token 6 = (0.3, 1) has the larger raw dot product with
    # target 0 but the larger cosine with target 3, so it checks the L2 normalisation.
    keys = [[3, 0], [2, 0.1], [0.1, 3], [0, 0.5], [1, 0.2], [0, -5], [0.3, 1], [0.5, 0.4]]
    features = torch.tensor([[float(i), float(10 - i)] for i in range(8)])
    return make_tokens(
        (2, 4),
        has_cls=has_cls,
        features=features,
        cls={2: cls},
        glob={2: [0.3, 0.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.0]},
        keys={2: keys},
        cls_feature=torch.tensor([100.0, -100.0]) if with_cls_feature else None,
    )


def test_visionzip_contextual_merge_by_hand():
    reduction = VisionZip(dominant=2, contextual=2).reduce(visionzip_case(), 4)
    # Dominant: CLS + top-1 patch (5). Remaining R = [0, 1, 2, 3, 4, 6, 7], step = 7 // 2 = 3 -> targets at
    # positions 0 and 3 = tokens 0 and 3. Members by cosine: 1, 4, 7 -> 0; 2, 6 -> 3.
    # c_0 = x_0 + mean(x_1, x_4, x_7) = [0, 10] + [4, 6];  c_3 = x_3 + mean(x_2, x_6) = [3, 7] + [4, 6].
    assert reduction.order.tolist() == [CLS_INDEX, 5, 0, 3]
    assert reduction.space == "vision"
    expected = torch.tensor([[100.0, -100.0], [5.0, 5.0], [4.0, 16.0], [7.0, 13.0]])
    assert torch.equal(reduction.features, expected)
    assert reduction.assignment.tolist() == [2, 2, 3, 3, 2, 1, 3, 2]
    assert reduction.kept.tolist() == [0, 3, 5]


def test_visionzip_without_cls_uses_global_attention_and_no_cls_token():
    tokens = visionzip_case(has_cls=False, with_cls_feature=False)
    reduction = VisionZip(dominant=2, contextual=1).reduce(tokens, 3)
    # Global attention top-2 = {0, 5}; remaining [1, 2, 3, 4, 6, 7] merge into the single target 1.
    x = tokens.features
    merged = x[1] + x[[2, 3, 4, 6, 7]].mean(0)
    assert reduction.order.tolist() == [0, 5, 1]
    assert torch.allclose(reduction.features, torch.stack([x[0], x[5], merged]))
    assert reduction.assignment.tolist() == [0, 2, 2, 2, 2, 1, 2, 2]
    with pytest.raises(MissingCLSError, match="cls_fallback"):
        VisionZip(dominant=2, contextual=1, cls_fallback="error").reduce(tokens, 3)


def test_visionzip_without_contextual_drops_the_rest():
    reduction = VisionZip(dominant=3, contextual=0).reduce(visionzip_case(), 3)
    assert reduction.order.tolist() == [CLS_INDEX, 4, 5]
    assert reduction.assignment.tolist() == [-1, -1, -1, -1, 1, 2, -1, -1]


def test_visionzip_target_without_members_is_unchanged():
    # keep = N: R = 7, contextual = 6, step = 1: targets are the first 6 remaining, only token 7 is a member.
    tokens = visionzip_case()
    reduction = VisionZip(dominant=2, contextual=6).reduce(tokens, 8)
    assert reduction.order.tolist() == [CLS_INDEX, 5, 0, 1, 2, 3, 4, 6]
    x = tokens.features
    # Token 7's key (0.5, 0.4) is most cosine-similar to token 4's (1, 0.2): cos 0.888 vs 0.822 (token 6),
    # 0.811 (token 1), 0.781 (token 0).
    expected = torch.stack([tokens.cls_feature, x[5], x[0], x[1], x[2], x[3], x[4] + x[7], x[6]])
    assert torch.equal(reduction.features, expected)


@pytest.mark.parametrize("keep,split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30))])
def test_visionzip_default_split(keep, split):
    assert VisionZip().split(keep) == split


def test_visionzip_partial_and_full_split():
    assert VisionZip(dominant=54).split(64) == (54, 10)
    assert VisionZip(contextual=10).split(100) == (90, 10)
    assert VisionZip(dominant=54, contextual=10).budget == Budget(keep=64)
    assert VisionZip().budget == Budget(keep=64)


def test_visionzip_bad_split_errors():
    with pytest.raises(ConfigError, match=r"keep=100.*dominant=54.*contextual=10"):
        VisionZip(keep=100, dominant=54, contextual=10)
    with pytest.raises(ConfigError, match="dominant"):
        VisionZip(dominant=-1)
    with pytest.raises(ConfigError, match="contextual"):
        VisionZip(contextual=1.5)
    with pytest.raises(BudgetError, match="dominant=10"):
        VisionZip(keep=8, dominant=10)
    with pytest.raises(ConfigError, match="keep=5"):
        VisionZip(ratio=0.5, dominant=2, contextual=2).reduce(visionzip_case(), 5)
    no_cls = visionzip_case(has_cls=False, with_cls_feature=False)
    with pytest.raises(BudgetError, match="contextual=5"):
        VisionZip(dominant=4, contextual=5).reduce(no_cls, 9)


# ---------------------------------------------------------------------------------------------------------- DivPrune


@pytest.mark.parametrize("seed", range(6))
def test_divprune_greedy_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(5, 41, (1,), generator=g))
    x = torch.randn(n, int(torch.randint(2, 9, (1,), generator=g)), generator=g)
    for distance in ("cosine", "l1", "l2"):
        dist = pairwise_distance(x, distance)
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        assert greedy_max_min(dist, k).tolist() == greedy_max_min_naive(dist, k).tolist()


# Four angular clusters of unit vectors (degrees). 11 has the farthest nearest neighbour (11 deg away, all other
# nearest neighbours are 3-4 deg away); 101, 191 and 281 sit exactly 90 deg apart from it.
ANGLES = [0, 97, 191, 285, 11, 101, 188, 277, -4, 105, 281]
CLUSTER = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 3]


def cluster_points() -> torch.Tensor:
    rad = torch.tensor(ANGLES, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_divprune_matches_brute_force_on_clusters():
    points = cluster_points()
    dist = 1.0 - points @ points.T
    n = len(ANGLES)
    nearest = [min(dist[i, j].item() for i in range(n) if i != j) for j in range(n)]
    picks = greedy_max_min(dist, 4)
    assert picks[0].item() == max(range(n), key=nearest.__getitem__) == ANGLES.index(11)

    def min_pairwise(subset) -> float:
        return min(dist[i, j].item() for i, j in itertools.combinations(subset, 2))

    best = max(itertools.combinations(range(n), 4), key=min_pairwise)
    assert min_pairwise(picks.tolist()) == min_pairwise(best)
    assert sorted(CLUSTER[i] for i in picks.tolist()) == [0, 1, 2, 3]

    tokens = make_tokens((1, n), features=torch.randn(n, 5), embeddings=points.float())
    reduction = DivPrune(keep=4).reduce(tokens, 4)
    assert reduction.order.tolist() == sorted(ANGLES.index(a) for a in (11, 101, 191, 281))
    assert reduction.features is None


def test_divprune_uses_embeddings_and_sorts():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(12, 6, generator=g)
    tokens = make_tokens((3, 4), features=torch.randn(12, 4, generator=g), embeddings=emb)
    reduction = DivPrune(keep=5, distance="l2").reduce(tokens, 5)
    expected = sorted(greedy_max_min_naive(torch.cdist(emb, emb), 5).tolist())
    assert reduction.order.tolist() == expected
    with pytest.raises(ConfigError, match="distance"):
        DivPrune(distance="cos")


# ----------------------------------------------------------------------------------------------------------- HiPrune


def test_hiprune_default_layers():
    assert default_object_layer(24) == 8  # paper: layer 9 (1-based) of 24
    assert default_object_layer(4) == max(1, math.floor(9 * 4 / 24 + 0.5)) - 1 == 1
    assert HiPrune().attention_layers(EncoderInfo(24, 22, True)) == {8, 22}
    assert HiPrune().attention_layers(EncoderInfo(4, 2, False)) == {1, 2}
    assert HiPrune(object_layer=-3, deep_layer=-1).attention_layers(EncoderInfo(24, 22, True)) == {21, 23}
    assert (num_anchors(192, 0.1), num_anchors(128, 0.1), num_anchors(64, 0.1)) == (4, 3, 1)


def test_hiprune_buffers_are_true_2d_neighbours():
    grid = (4, 4)
    assert sorted(grid_neighbours(torch.tensor([4]), grid).tolist()) == [0, 5, 8]  # not 3 (previous row's end)
    assert sorted(grid_neighbours(torch.tensor([3]), grid).tolist()) == [2, 7]  # not 4 (next row's start)
    assert sorted(grid_neighbours(torch.tensor([15]), grid).tolist()) == [11, 14]
    assert sorted(grid_neighbours(torch.tensor([5]), grid).tolist()) == [1, 4, 6, 9]


def hiprune_tokens(object_scores: dict[int, float], deep_scores: dict[int, float] | None) -> VisualTokens:
    obj = torch.zeros(16)
    for i, v in object_scores.items():
        obj[i] = v
    glob = {1: obj}
    if deep_scores is not None:
        deep = torch.zeros(16)
        for i, v in deep_scores.items():
            deep[i] = v
        glob[2] = deep
    return make_tokens((4, 4), has_cls=False, glob=glob)


def test_hiprune_full_kept_set_left_edge_anchor():
    # keep 8, alpha 0.625 -> round(8 * 0.625 / 5) = 1 anchor: token 4 (left edge; token 3 is the runner-up
    # and the wrap-around "left neighbour"). Buffers 0, 5, 8. Deep scores rank the chosen 0, 4, 5 first: the
    # 4 registers must be the next best unchosen 15, 10, 6, 12; token 3 has the lowest deep score.
    deep = {0: 0.9, 4: 0.8, 5: 0.7, 15: 0.6, 10: 0.5, 6: 0.4, 12: 0.3, 1: 0.1, 2: 0.1, 7: 0.1, 9: 0.1}
    deep.update({11: 0.1, 13: 0.1, 14: 0.1, 8: 0.05, 3: 0.01})
    tokens = hiprune_tokens({4: 0.5, 3: 0.4, 9: 0.1}, deep)
    reduction = HiPrune(keep=8, alpha=0.625).reduce(tokens, 8)
    assert reduction.order.tolist() == [0, 4, 5, 6, 8, 10, 12, 15]


def test_hiprune_corner_anchor_gets_two_buffers():
    deep = {15: 1.0, 14: 0.9, 11: 0.8, 0: 0.5, 1: 0.4, 2: 0.3, 3: 0.2}
    tokens = hiprune_tokens({15: 0.9, 12: 0.5}, deep)
    reduction = HiPrune(keep=6, alpha=0.5).reduce(tokens, 6)  # round(0.6) = 1 anchor
    assert reduction.order.tolist() == [0, 1, 2, 11, 14, 15]


def test_hiprune_overflow_keeps_anchor_then_best_buffers():
    # keep 3, alpha 1 -> 1 anchor (5) with 4 buffers: keep the 2 buffers with the best object score (4, 6).
    # No deep-layer scores exist in the probe: no registers are needed, so none may be read.
    tokens = hiprune_tokens({5: 0.9, 1: 0.1, 4: 0.3, 6: 0.2, 9: 0.05}, None)
    assert HiPrune(keep=3, alpha=1.0).reduce(tokens, 3).order.tolist() == [4, 5, 6]


def test_hiprune_alpha_zero_is_deep_topk():
    deep = {i: float(i) for i in range(16)}
    tokens = hiprune_tokens({0: 1.0}, deep)
    assert HiPrune(keep=4, alpha=0.0).reduce(tokens, 4).order.tolist() == [12, 13, 14, 15]


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.1", True])
def test_hiprune_bad_alpha(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        HiPrune(alpha=alpha)


# -------------------------------------------------------------------------------------------------------------- Pool


def test_pool_grid_sizes():
    assert pool_grid(64, 24, 24) == (8, 8)
    assert pool_grid(144, 24, 24) == (12, 12)
    assert pool_grid(576, 24, 24) == (24, 24)
    assert pool_grid(128, 24, 24) == (16, 8)  # 16x8 and 8x16 tie in aspect; the larger gh wins
    assert pool_grid(6, 2, 4) == (2, 3)
    assert pool_grid(12, 3, 12) == (2, 6)  # target aspect 1/4: 2/6 is 4/3 off, 1/12 and 3/4 are 3x off


def test_pool_impossible_keep():
    with pytest.raises(BudgetError, match=r"keep=7.*4x4.*\[4, 6, 8, 9\]"):
        pool_grid(7, 4, 4)
    with pytest.raises(BudgetError, match="keep=17"):
        pool_grid(17, 4, 4)


def test_pool_cell_means_by_hand():
    emb = torch.arange(32, dtype=torch.float32).reshape(16, 2)  # token t = [2t, 2t + 1]
    tokens = make_tokens((4, 4), features=torch.zeros(16, 3), embeddings=emb)
    reduction = Pool(keep=4).reduce(tokens, 4)
    # Cells {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}: mean t = 2.5, 4.5, 10.5, 12.5.
    assert torch.equal(reduction.features, torch.tensor([[5.0, 6.0], [9.0, 10.0], [21.0, 22.0], [25.0, 26.0]]))
    assert reduction.space == "llm"
    assert reduction.order.tolist() == [0, 2, 8, 10]
    assert reduction.assignment.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    vision = Pool(keep=4, space="vision").reduce(tokens, 4)
    assert vision.space == "vision" and torch.equal(vision.features, torch.zeros(4, 3))


@pytest.mark.parametrize("rows,cols,keep", [(5, 5, 4), (5, 7, 6), (3, 8, 6), (7, 3, 3)])
def test_pool_uneven_cells_match_boundaries(rows, cols, keep):
    gh, gw = pool_grid(keep, rows, cols)
    x = torch.randn(rows * cols, 3, generator=torch.Generator().manual_seed(rows * cols), dtype=torch.float64)
    reduction = Pool(keep=keep, space="vision").reduce(make_tokens((rows, cols), features=x), keep)
    rb = [i * rows // gh for i in range(gh + 1)]
    cb = [j * cols // gw for j in range(gw + 1)]
    for i in range(gh):
        for j in range(gw):
            members = [r * cols + c for r in range(rb[i], rb[i + 1]) for c in range(cb[j], cb[j + 1])]
            slot = i * gw + j
            assert [t for t in range(rows * cols) if reduction.assignment[t] == slot] == members
            assert torch.allclose(reduction.features[slot], x[members].mean(0))
            centre = ((rb[i] + rb[i + 1] - 1) // 2) * cols + (cb[j] + cb[j + 1] - 1) // 2
            assert reduction.order[slot].item() == centre


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_keep_all_is_identity(dtype):
    emb = torch.randn(24, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    reduction = Pool(keep=24).reduce(make_tokens((4, 6), embeddings=emb), 24)
    assert reduction.features.dtype == dtype
    assert torch.equal(reduction.features, emb)
    assert reduction.order.tolist() == list(range(24))
    assert reduction.assignment.tolist() == list(range(24))


# ------------------------------------------------------------------------------------------------------------ Random


def test_random_is_seeded_sorted_and_sized():
    tokens = make_tokens((10, 10))
    a, b = RandomPruner(seed=3), RandomPruner(seed=3)
    first_a, second_a = a.reduce(tokens, 10).order, a.reduce(tokens, 10).order
    first_b, second_b = b.reduce(tokens, 10).order, b.reduce(tokens, 10).order
    assert torch.equal(first_a, first_b) and torch.equal(second_a, second_b)
    assert not torch.equal(first_a, second_a)  # the generator advances between images
    other = RandomPruner(seed=4).reduce(tokens, 10).order
    assert not torch.equal(first_a, other)
    assert first_a.numel() == 10 and len(set(first_a.tolist())) == 10
    assert first_a.tolist() == sorted(first_a.tolist())
    with pytest.raises(ConfigError, match="seed"):
        RandomPruner(seed=-1)


# ---------------------------------------------------------------------------------------------- Registry and config

ALL = ["divprune", "fastervlm", "hiprune", "pool", "random", "visionzip"]


def test_registry_lists_all_pruners():
    assert set(ALL) <= set(list_pruners())
    for name in ALL:
        assert create_pruner(name).name == name


def test_registry_errors():
    with pytest.raises(ConfigError, match="unknown pruner 'nope'.*fastervlm"):
        create_pruner("nope")
    with pytest.raises(ConfigError, match=r"unknown option.*'foo'"):
        create_pruner("divprune", foo=1)
    assert create_pruner("visionzip", keep=64, contextual=10).split(64) == (54, 10)


def test_default_budgets_and_hparams():
    assert FasterVLM().budget == Budget(ratio=0.25)
    assert HiPrune().budget == Budget(keep=192)
    assert DivPrune().budget == Budget(ratio=0.098)
    assert VisionZip().budget == Budget(keep=64)
    assert not RandomPruner().budget.is_set and not Pool().budget.is_set
    assert HiPrune(keep=64).hparams() == {"alpha": 0.1, "object_layer": None, "deep_layer": None}
    assert repr(DivPrune(keep=8)) == "DivPrune(keep=8, distance='cosine')"


@pytest.mark.parametrize(
    "factory",
    [
        lambda: FasterVLM(layer="a"),
        lambda: FasterVLM(layer=True),
        lambda: Pool(space="pixels"),
        lambda: VisionZip(cls_fallback="none"),
        lambda: HiPrune(object_layer=1.0),
    ],
)
def test_bad_options(factory):
    with pytest.raises(ConfigError):
        factory()
