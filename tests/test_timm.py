"""timm ViT integration: shapes, keep-all exactness, equality with hand-pruned runs, remove(), probe exactness."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vtprune
from vtprune.capture import capture_layers
from vtprune.errors import BudgetError, ConfigError
from vtprune.integrations.timm_vit import TimmAttentionProbe
from vtprune.pruners.base import Pruner

N, D, DEPTH, CLASSES = 196, 64, 6, 10
KEEP = 64
PRUNERS = vtprune.list_pruners()
SELECTORS = ["divprune", "fastervlm", "hiprune", "random"]  # pure selection: keep-all is bit-exact

MODELS = {
    "cls": dict(),
    "reg": dict(reg_tokens=4, class_token=True, qk_norm=True, no_embed_class=True),
    "gap": dict(class_token=False, global_pool="avg"),
}


def make_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=4, num_classes=CLASSES, **kwargs
    ).eval()
    # Larger weights than timm's init (std 0.02), so attention is peaked and outputs depend on the tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def vits():
    return {key: make_vit(i, **kwargs) for i, (key, kwargs) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 224, 224)


@pytest.fixture(autouse=True)
def _unpatched(request):
    yield
    if "vits" in request.fixturenames:
        for model in request.getfixturevalue("vits").values():
            if model.__dict__.get("_vtprune_handle") is not None:
                vtprune.remove(model)


def run(model, x):
    with torch.no_grad():
        return model(x), model.forward_features(x)


def manual_forward(model, x, after_block, stats, name):
    """The unpatched model's own modules, with the kept tokens built by hand from the handle's stats."""
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks[: after_block + 1]:
            h = block(h)
        rows = []
        for image, stat in enumerate(stats):
            patches = h[image, prefix:]
            tokens = []
            for slot, rep in enumerate(stat.order.tolist()):
                members = (stat.assignment == slot).nonzero().flatten()
                if name == "pool":  # mean of the cell
                    tokens.append(patches[members].mean(0))
                elif members.numel() <= 1:  # a selected token (or a VisionZip target without members)
                    tokens.append(patches[rep])
                else:  # VisionZip contextual token: target + mean of its other members
                    others = members[members != rep]
                    tokens.append(patches[rep] + patches[others].mean(0))
            rows.append(torch.stack(tokens))
        pruned = torch.cat([h[:, :prefix], torch.stack(rows)], dim=1)
        if not h.is_contiguous():  # ViTs without prefix tokens keep the patch embedding's [B, D, N] memory layout
            pruned = pruned.transpose(1, 2).contiguous().transpose(1, 2)
        h = pruned
        for block in model.blocks[after_block + 1 :]:
            h = block(h)
        features = model.norm(h)
        return model.forward_head(features), features


def eager_attention(model, x):
    """timm's own attention weights (non-fused path, captured after softmax) and keys of every block."""
    weights, keys, hooks = {}, {}, []
    fused = [block.attn.fused_attn for block in model.blocks]
    try:
        for i, block in enumerate(model.blocks):
            block.attn.fused_attn = False
            hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: weights.__setitem__(i, o)))
            hooks.append(block.attn.k_norm.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(i, o)))
        with torch.no_grad(), capture_layers(model.blocks, inputs=set(range(len(model.blocks)))) as (inputs, _):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for block, value in zip(model.blocks, fused):
            block.attn.fused_attn = value
    return weights, keys, inputs


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", PRUNERS)
def test_shapes(vits, x, kind, name):
    model = vits[kind]
    prefix = model.num_prefix_tokens
    with vtprune.apply(model, name, keep=KEEP) as handle:
        logits, features = run(model, x)
        assert logits.shape == (2, CLASSES) and bool(torch.isfinite(logits).all())
        assert features.shape == (2, prefix + KEEP, D)
        assert [(s.tokens_in, s.tokens_out, s.extra["row"]) for s in handle.stats] == [(N, KEEP, 0), (N, KEEP, 1)]
        assert handle.selection_time > 0
        assert handle.last_sequence is None


# ---------------------------------------------------------------------------------------------- keep-all
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", PRUNERS)
def test_keep_all_is_exact(vits, x, kind, name):
    model = vits[kind]
    prefix = model.num_prefix_tokens
    ref_logits, ref_features = run(model, x)
    with vtprune.apply(model, name, keep=N) as handle:
        logits, features = run(model, x)
        orders = [s.order for s in handle.stats]
    if name != "visionzip":
        assert all(torch.equal(order, torch.arange(N)) for order in orders)
        assert torch.equal(logits, ref_logits)
        assert torch.equal(features, ref_features)
        return
    # VisionZip emits [dominant (raster), contextual targets (raster of the rest)]: at keep=N every token is its
    # own group, so the tokens are exactly the originals but permuted. The blocks after the hook are
    # permutation-equivariant, so results agree up to float summation order, not bit for bit.
    for image, order in enumerate(orders):
        assert sorted(order.tolist()) == list(range(N))
        inverse = torch.argsort(order)
        torch.testing.assert_close(features[image, prefix:][inverse], ref_features[image, prefix:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features[:, :prefix], ref_features[:, :prefix], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- hand-built
@pytest.mark.parametrize("kind, after_block", [("cls", -2), ("reg", -2), ("gap", -2), ("cls", 3), ("gap", 1)])
@pytest.mark.parametrize("name", PRUNERS)
def test_pruned_equals_manual(vits, x, kind, name, after_block):
    model = vits[kind]
    with vtprune.apply(model, name, keep=KEEP, after_block=after_block) as handle, torch.no_grad():
        logits = model(x)
        logits_stats = handle.stats  # per call: `random` draws new picks every call
        features = model.forward_features(x)
        features_stats = handle.stats
    ref_logits = manual_forward(model, x, after_block % DEPTH, logits_stats, name)[0]
    ref_features = manual_forward(model, x, after_block % DEPTH, features_stats, name)[1]
    if name in SELECTORS:
        assert torch.equal(features, ref_features)
        assert torch.equal(logits, ref_logits)
    else:  # merged tokens: the pruner sums members in another order than .mean()
        torch.testing.assert_close(features, ref_features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["cls", "reg"])
def test_fastervlm_keeps_top_cls_attention_of_timm(vits, x, kind):
    """Selection matches top-k of the CLS row of timm's own (eager) attention at the default block -2."""
    model = vits[kind]
    prefix = model.num_prefix_tokens
    weights, _, _ = eager_attention(model, x)
    with vtprune.apply(model, "fastervlm", keep=KEEP) as handle:
        run(model, x)
    for image, stat in enumerate(handle.stats):
        scores = weights[DEPTH - 2][image, :, 0, prefix:].mean(0)
        assert torch.equal(stat.kept, torch.sort(torch.topk(scores, KEEP).indices).values)


# ---------------------------------------------------------------------------------------------- after_block
def block_lengths(model, x):
    lengths, hooks = [], []
    for block in model.blocks:
        hooks.append(block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1])))
    try:
        run(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    return lengths[:DEPTH]  # model(x) only


@pytest.mark.parametrize("after_block, pruned_from", [(None, DEPTH - 1), (-2, DEPTH - 1), (1, 2), (0, 1), (-1, DEPTH)])
def test_after_block(vits, x, after_block, pruned_from):
    model = vits["cls"]
    options = {} if after_block is None else {"after_block": after_block}
    with vtprune.apply(model, "random", keep=KEEP, **options) as handle:
        assert handle.integration.encoder_info().feature_layer == (DEPTH - 2 if after_block is None else after_block % DEPTH)
        lengths = block_lengths(model, x)
        _, features = run(model, x)
    assert lengths == [1 + N] * pruned_from + [1 + KEEP] * (DEPTH - pruned_from)
    assert features.shape == (2, 1 + KEEP, D)


def test_default_layers_follow_after_block(vits, x):
    """Without explicit layers, FasterVLM scores at after_block and HiPrune's deep layer is after_block."""
    model = vits["cls"]
    weights, _, _ = eager_attention(model, x)
    with vtprune.apply(model, "fastervlm", keep=KEEP, after_block=2) as handle:
        assert handle.pruner.attention_layers(handle.integration.encoder_info()) == {2}
        run(model, x)
    scores = weights[2][0, :, 0, 1:].mean(0)
    assert torch.equal(handle.stats[0].kept, torch.sort(torch.topk(scores, KEEP).indices).values)
    with vtprune.apply(model, "hiprune", keep=KEEP, after_block=3) as handle:
        assert handle.pruner.attention_layers(handle.integration.encoder_info()) == {1, 3}


# ---------------------------------------------------------------------------------------------- remove()
def snapshot(model):
    return {name: id(value) for name, value in model.__dict__.items()}


@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_remove_is_exact(vits, x, name):
    model = vits["reg"]
    before = snapshot(model)
    ref_logits, ref_features = run(model, x)
    handle = vtprune.apply(model, name, keep=KEEP)
    assert "forward_features" in model.__dict__
    run(model, x)
    handle.remove()
    assert snapshot(model) == before
    logits, features = run(model, x)
    assert torch.equal(logits, ref_logits) and torch.equal(features, ref_features)
    handle.remove()  # safe twice
    with vtprune.apply(model, name, keep=KEEP):  # and patchable again
        pass
    assert snapshot(model) == before


class Boom(Pruner):
    name = "boom"

    def reduce(self, tokens, keep):
        tokens.cls_attention(-2)  # the probe works, then the pruner fails
        raise RuntimeError("boom")

    def attention_layers(self, encoder):
        return {encoder.feature_layer}


def test_remove_after_exception(vits, x):
    model = vits["cls"]
    before = snapshot(model)
    ref_logits, _ = run(model, x)
    handle = vtprune.apply(model, Boom(keep=KEEP))
    with pytest.raises(RuntimeError, match="boom"):
        run(model, x)
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in model.blocks)
    handle.remove()
    assert snapshot(model) == before
    assert torch.equal(run(model, x)[0], ref_logits)


def test_already_patched_and_vtprune_remove(vits, x):
    model = vits["gap"]
    before = snapshot(model)
    vtprune.apply(model, "pool", keep=49)
    with pytest.raises(vtprune.AlreadyPatchedError):
        vtprune.apply(model, "random", keep=KEEP)
    assert run(model, x)[1].shape == (2, 49, D)
    vtprune.remove(model)
    assert snapshot(model) == before


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name, kwargs, error, match",
    [
        ("random", dict(keep=KEEP, after_block=DEPTH), ConfigError, "out of range"),
        ("random", dict(keep=KEEP, after_block=-DEPTH - 1), ConfigError, "out of range"),
        ("random", dict(keep=KEEP, after_block=True), ConfigError, "after_block must be an int"),
        ("random", dict(keep=KEEP, after_block="-2"), ConfigError, "after_block must be an int"),
        ("fastervlm", dict(keep=KEEP, layer=-1), ConfigError, "after after_block"),
        ("hiprune", dict(keep=KEEP, after_block=0), ConfigError, "after after_block"),
        ("visionzip", dict(keep=KEEP, after_block=1, layer=4), ConfigError, "after after_block"),
        ("fastervlm", dict(keep=KEEP, layer=DEPTH), ConfigError, "out of range"),
        ("random", dict(keep=KEEP, positions="compact"), ConfigError, "positions does not apply"),
        ("random", dict(keep=N + 1), BudgetError, "exceeds the 196"),
        ("pool", dict(keep=197), BudgetError, "exceeds"),
        ("pool", dict(keep=181), BudgetError, "pool cannot make"),
        ("random", dict(), ConfigError, "no default budget"),
    ],
)
def test_apply_errors(vits, name, kwargs, error, match):
    model = vits["cls"]
    before = snapshot(model)
    with pytest.raises(error, match=match):
        vtprune.apply(model, name, **kwargs)
    assert snapshot(model) == before


def test_bypassing_calls_refuse_while_patched(vits, x):
    model = vits["cls"]
    with vtprune.apply(model, "fastervlm", keep=KEEP):
        with pytest.raises(NotImplementedError, match="bypasses"):
            model.forward_intermediates(x)
        with pytest.raises(NotImplementedError, match="bypasses"):
            model.get_intermediate_layers(x)
        with pytest.raises(NotImplementedError, match="attn_mask"):
            model(x, is_causal=True)
    with torch.no_grad():
        assert len(model.get_intermediate_layers(x, n=2)) == 2


# ---------------------------------------------------------------------------------------------- probe
@pytest.mark.parametrize("kind", MODELS)
def test_probe_matches_timm_attention(vits, x, kind):
    model = vits[kind]
    prefix = model.num_prefix_tokens
    weights, keys, inputs = eager_attention(model, x)
    probe = TimmAttentionProbe(model.blocks, inputs, prefix)
    # The probe computes one row (or the mean) with its own matmul shapes; CPU GEMM kernels block those
    # differently from timm's full S x S product, so results agree to a few float32 ulps, not bitwise
    # (measured, torch 2.15: within 1e-6 relative on one Xeon, up to 3.6e-7 absolute and 1.6e-6 relative on another).
    tight = dict(rtol=1e-5, atol=1e-6)
    for layer in range(DEPTH):
        for image in range(x.shape[0]):
            attention = weights[layer][image]  # [H, S, S]
            if model.cls_token is not None:
                torch.testing.assert_close(probe.cls_attention(layer, image), attention[:, 0, prefix:], **tight)
            torch.testing.assert_close(probe.global_attention(layer, image), attention.mean(dim=(0, 1))[prefix:], **tight)
            torch.testing.assert_close(probe.keys(layer, image), keys[layer][image].mean(0)[prefix:], **tight)
    # Attention is far from uniform with these weights, so the checks above are not vacuous.
    assert float(weights[DEPTH - 2][:, :, 0].max()) > 5.0 / weights[0].shape[-1]


# ---------------------------------------------------------------------------------------------- variants
def test_dynamic_img_size(x):
    model = make_vit(3, dynamic_img_size=True)
    small = x[:, :, :160]  # 10 x 14 patches
    ref_logits, ref_features = run(model, small)
    with vtprune.apply(model, "hiprune", ratio=1.0) as handle:
        logits, features = run(model, small)
        assert handle.stats[0].tokens_in == 140
    assert torch.equal(logits, ref_logits) and torch.equal(features, ref_features)
    with vtprune.apply(model, "pool", ratio=0.25):  # 35 = 5 x 7 cells of the 10 x 14 grid
        assert run(model, small)[1].shape == (2, 1 + 35, D)
        assert run(model, x)[1].shape == (2, 1 + 49, D)


def test_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(4)
    model = VisionTransformerDistilled(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    ref_logits, _ = run(model, images)
    with vtprune.apply(model, "fastervlm", keep=16):
        assert torch.equal(run(model, images)[0], ref_logits)
    with vtprune.apply(model, "visionzip", keep=6):
        logits, features = run(model, images)
        assert logits.shape == (2, 5) and features.shape == (2, 2 + 6, 32)


def test_patch_dropout_in_training_is_refused(x):
    model = make_vit(5, patch_drop_rate=0.5)
    with vtprune.apply(model, "fastervlm", keep=KEEP):
        with pytest.raises(NotImplementedError, match="patch dropout"):
            model.train()(x)
        assert model.eval()(x).shape == (2, CLASSES)


def test_gradients_with_checkpointing(x):
    model = make_vit(6).train()
    model.set_grad_checkpointing(True)
    reference = make_vit(6).train()
    with vtprune.apply(model, "visionzip", keep=KEEP), vtprune.apply(reference, "visionzip", keep=KEEP):
        model(x[:1]).square().sum().backward()
        reference(x[:1]).square().sum().backward()
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters())]
    assert all(g is not None for g, _ in grads)
    for g, h in grads:
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
