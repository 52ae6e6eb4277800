"""ZO-SGD: MeZO's SPSA step on any parameter set, exact restores, replay, and the gradient it estimates."""
import copy
import math

import pytest
import torch
from torch import nn

from dlzo.zo import ZOSGD, param_groups, step_seed


def quad_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1)).to(dtype)
    x = torch.randn(8, 5, dtype=dtype)
    y = torch.randn(8, 1, dtype=dtype)
    loss = lambda: float(((model(x) - y) ** 2).mean())  # noqa: E731
    return model, loss


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_lr_zero_leaves_parameters(restore):
    model, loss = quad_model()
    before = snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, restore=restore)
    for _ in range(3):
        opt.step(loss)
    for n, p in model.named_parameters():
        if restore == "exact":
            assert torch.equal(p, before[n]), n  # bit for bit
        else:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)  # in-place round trip: rounding only


def test_only_tuned_parameters_move():
    model, loss = quad_model()
    before = snapshot(model)
    opt = ZOSGD(model[2].parameters(), lr=1e-2, eps=1e-3)
    for _ in range(3):
        opt.step(loss)
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[1].weight, before["1.weight"])
    assert not torch.equal(model[2].weight, before["2.weight"])


@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_same_seed_bit_identical(restore):
    runs = []
    for _ in range(2):
        model, loss = quad_model()
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3, seed=7, restore=restore)
        gs = [opt.step(loss) for _ in range(5)]
        runs.append((gs, snapshot(model)))
    assert runs[0][0] == runs[1][0]
    for n in runs[0][1]:
        assert torch.equal(runs[0][1][n], runs[1][1][n])


def test_restore_modes_agree():
    """Both restore modes draw the same z: same projected gradients and updates up to rounding."""
    out = {}
    for restore in ("mezo", "exact", "fused"):
        model, loss = quad_model(torch.float64)
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-4, seed=3, restore=restore)
        out[restore] = ([opt.step(loss) for _ in range(4)], snapshot(model))
    for other in ("exact", "fused"):
        for a, b in zip(out["mezo"][0], out[other][0]):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
        for n in out["mezo"][1]:
            torch.testing.assert_close(out["mezo"][1][n], out[other][1][n], rtol=1e-9, atol=1e-12)


def test_projected_gradient_is_directional_derivative():
    """In float64 with small eps, g = grad(L) . z for the z the step drew."""
    model, loss = quad_model(torch.float64)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(step_seed(11, 0))
    zs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    torch.manual_seed(0)  # quad_model's data: same draws after the same init
    nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    grads = torch.autograd.grad(((model(x) - y) ** 2).mean(), params)
    expected = sum(float((gr * z).sum()) for gr, z in zip(grads, zs))
    g = ZOSGD(params, lr=0.0, eps=1e-6, seed=11, restore="exact").step(loss)
    assert g == pytest.approx(expected, rel=1e-5)


def test_draw_is_the_z_of_the_step():
    """draw(step): per tuned tensor, the z that step perturbs with (one generator seeded with step_seed)."""
    model, _ = quad_model()
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=11)
    assert [id(p) for p in opt.tensors()] == [id(p) for p in model.parameters()]
    for step in (0, 3):
        gen = torch.Generator().manual_seed(step_seed(11, step))
        expected = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
        assert all(torch.equal(z, e) for z, e in zip(opt.draw(step), expected))


@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_projected_gradient_is_the_step_without_the_update(restore):
    """projected_gradient(closure, step=j) evaluates exactly what step j does, updates nothing, records nothing
    and leaves theta as it came (exact: bit for bit)."""
    model, loss = quad_model()
    twin, twin_loss = quad_model()
    before = snapshot(model)
    probe = ZOSGD(param_groups(model.named_parameters(), 0.01), lr=1e-2, eps=1e-3, weight_decay=0.01, seed=6,
                  restore=restore)
    got = [probe.projected_gradient(loss, step=j) for j in range(3)]
    assert probe.steps_done == 0 and probe.trajectory == []
    for n, p in model.named_parameters():
        if restore == "exact":
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    # the (L+, L-, g) that training step j sees at the same parameters (lr 0: they stay put); the in-place
    # restores perturb out of place or in place, so only the exact one matches to the bit
    opt = ZOSGD(param_groups(twin.named_parameters(), 0.01), lr=0.0, eps=1e-3, weight_decay=0.01, seed=6,
                restore="exact")
    for j in range(3):
        assert opt.projected_gradient(twin_loss) == opt.projected_gradient(twin_loss, step=j)  # default: next step
        g = opt.step(twin_loss)
        seen = (opt.trajectory[-1]["loss_plus"], opt.trajectory[-1]["loss_minus"], g)
        assert seen == got[j] if restore == "exact" else seen == pytest.approx(got[j], rel=1e-4)


def test_projected_gradient_exact_restores_after_an_error():
    model, loss = quad_model()
    before = snapshot(model)
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-1, restore="exact")
    calls = []

    def fail_second():
        calls.append(1)
        if len(calls) == 2:  # theta is at theta - eps*z now
            raise RuntimeError("boom")
        return loss()
    with pytest.raises(RuntimeError, match="boom"):
        opt.projected_gradient(fail_second)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="closure"):
        opt.projected_gradient()


def test_weight_decay_skips_bias_and_norm():
    model, loss = quad_model()
    groups = param_groups(model.named_parameters(), 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}


@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_replay_rebuilds_weights_bit_identically(restore):
    model, loss = quad_model()
    opt = ZOSGD(param_groups(model.named_parameters(), 0.01), lr=1e-2, eps=1e-3, weight_decay=0.01,
                seed=5, restore=restore)
    for _ in range(6):
        opt.step(loss)
    trained = snapshot(model)
    fresh, _ = quad_model()
    ZOSGD(param_groups(fresh.named_parameters(), 0.01), lr=1e-2, eps=1e-3, weight_decay=0.01, seed=5,
          restore=restore).replay(opt.trajectory)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, trained[n]), n


def test_step_seed_is_pure_and_spread():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(0, s) for s in range(1000)}) == 1000
    assert step_seed(0, 1) != step_seed(1, 1)


def test_non_finite_loss_stops():
    from dlzo.zo import NonFiniteLoss

    model, _ = quad_model()
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-3)
    with pytest.raises(NonFiniteLoss, match="step 0"):
        opt.step(lambda: math.nan)
    assert opt.trajectory == []


@torch.no_grad()
def _mezo_trainer_step(named, loss, seed, lr, eps, wd, masks=None):
    """MeZO's trainer (zo_perturb_parameters / zo_step / zo_update), transcribed op for op: global
    torch.manual_seed, torch.normal per tensor, out-of-place arithmetic, wd skipped by name. ``masks``
    ({name: bool mask}): Sparse-MeZO's, z times the mask after each draw (the wd term too)."""
    masks = masks or {}

    def normal(name, param):
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        return z * masks[name] if name in masks else z

    def perturb(scaling_factor):
        torch.manual_seed(seed)
        for name, param in named:
            z = normal(name, param)
            param.data = param.data + scaling_factor * z * eps

    perturb(1)
    loss1 = loss()
    perturb(-2)
    loss2 = loss()
    projected_grad = (loss1 - loss2) / (2 * eps)
    perturb(1)
    torch.manual_seed(seed)
    for name, param in named:
        z = normal(name, param)
        if "bias" not in name and "layer_norm" not in name and "layernorm" not in name and param.ndim > 1:
            decay = wd * param.data * masks[name] if name in masks and wd else wd * param.data
            param.data = param.data - lr * (projected_grad * z + decay)
        else:
            param.data = param.data - lr * (projected_grad * z)
    return projected_grad


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_mezo_restore_is_mezo_trainer_bit_for_bit(wd):
    """restore="mezo" is the MeZO baseline itself: same z, same arithmetic, same bits."""
    model_a, loss_a = quad_model()
    model_b, loss_b = quad_model()
    named_b = list(model_b.named_parameters())
    # MeZO walks parameters in named order; param_groups puts decayed tensors first, so feed the
    # reference the same order the optimizer draws z in
    groups = param_groups(list(model_a.named_parameters()), wd)
    order = [n for g in groups for p in g["params"] for n, q in model_a.named_parameters() if q is p]
    named_b = [(n, dict(named_b)[n]) for n in order]
    opt = ZOSGD(groups, lr=1e-2, eps=1e-3, weight_decay=wd, seed=4, restore="mezo")
    for step in range(4):
        g_ours = opt.step(loss_a)
        g_ref = _mezo_trainer_step(named_b, loss_b, step_seed(4, step), 1e-2, 1e-3, wd)
        assert g_ours == g_ref
    for (n, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), n


def test_magnitude_mask_selects_the_smallest_weights():
    from dlzo.zo import magnitude_mask

    torch.manual_seed(0)
    w = torch.randn(40, 25)  # distinct magnitudes
    for sparsity in (0.0, 0.5, 0.75, 0.99):
        mask = magnitude_mask(w, sparsity)
        assert int(mask.sum()) == math.ceil((1 - sparsity) * w.numel())
        if sparsity:
            assert w.abs()[mask].max() < w.abs()[~mask].min()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, 1.0)


@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_masked_groups_draw_the_same_z_and_move_only_the_mask(restore):
    """Sparse-MeZO: z is the unmasked draw times the mask; weights outside the mask keep their bits."""
    model, loss = quad_model()
    named = list(model.named_parameters())
    groups = param_groups(named, 0.1, sparsity=0.5)
    masks = {id(p): m.tensor() for g in groups for p, m in zip(g["params"], g["masks"])}
    plain = ZOSGD(param_groups(named, 0.1), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=9, restore=restore)
    opt = ZOSGD(groups, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=9, restore=restore)
    for p, q, z_plain, z in zip(plain.tensors(), opt.tensors(), plain.draw(0), opt.draw(0)):
        m = masks[id(q)]
        assert p is q and torch.equal(z, z_plain * m)
        assert torch.equal(z != 0, m)  # exactly the masked weights are perturbed
    before = snapshot(model)
    for _ in range(3):
        opt.step(loss)
    for n, p in model.named_parameters():
        m = masks[id(p)]
        assert torch.equal(p[~m], before[n][~m]), n
        assert (p[m] != before[n][m]).all(), n


def test_masked_replay_rebuilds_weights_bit_identically():
    model, loss = quad_model()
    opt = ZOSGD(param_groups(model.named_parameters(), 0.01, sparsity=0.7), lr=1e-2, eps=1e-3,
                weight_decay=0.01, seed=2, restore="mezo")
    for _ in range(5):
        opt.step(loss)
    fresh, _ = quad_model()  # the masks are recomputed from the fresh (base) weights
    ZOSGD(param_groups(fresh.named_parameters(), 0.01, sparsity=0.7), lr=1e-2, eps=1e-3, weight_decay=0.01,
          seed=2, restore="mezo").replay(opt.trajectory)
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n


def test_chunked_draw_is_the_whole_draw():
    """restore="mezo" draws z chunk by chunk into one buffer (CPU): the values of one whole-tensor draw, bit for
    bit, and the generator ends where the whole draw leaves it, for every size around the 16-value blocks."""
    from dlzo.zo import _chunks

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (1, 15, 16, 17, 47, 48, 49, 63, 64, 65, 95, 96, 97, 111, 113, 1000, 4099):
            gen = torch.Generator().manual_seed(n)
            whole, after = torch.randn(n, generator=gen, dtype=dtype), torch.randn(17, generator=gen, dtype=dtype)
            gen = torch.Generator().manual_seed(n)
            buf, parts = torch.empty(48 + 16, dtype=dtype), []
            for b, e in _chunks(n, 48):
                assert e - b >= min(n, 16)
                parts.append(torch.randn(e - b, generator=gen, dtype=dtype, out=buf[: e - b]).clone())
            assert torch.equal(torch.cat(parts), whole), (dtype, n)
            assert torch.equal(torch.randn(17, generator=gen, dtype=dtype), after), (dtype, n)


def wide_model(dtype):
    """quad_model with tensors of many chunks (and remainders under 16) once ZOSGD.chunk is 48."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(37, 29), nn.LayerNorm(29), nn.Linear(29, 3)).to(dtype)
    x, y = torch.randn(16, 37).to(dtype), torch.randn(16, 3).to(dtype)
    loss = lambda: float(((model(x).float() - y.float()) ** 2).mean())  # noqa: E731
    return model, loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("sparsity", [None, 0.6])
@pytest.mark.parametrize("chunk", [48, 1 << 20])
def test_mezo_restore_in_place_by_chunks_is_mezo_bit_for_bit(dtype, wd, sparsity, chunk):
    """The default (restore="mezo") runs MeZO's out-of-place expressions in place, chunk by chunk: the same
    ops on the same values, so the same bits as MeZO's trainer in every dtype, masked or not, with or
    without weight decay, over steps whose parameters and losses feed back; replay gives them again."""
    model_a, loss_a = wide_model(dtype)
    model_b, loss_b = wide_model(dtype)
    groups = param_groups(list(model_a.named_parameters()), wd, sparsity)
    order = [n for g in groups for p in g["params"] for n, q in model_a.named_parameters() if q is p]
    named_b = [(n, dict(model_b.named_parameters())[n]) for n in order]
    masks = {}
    if sparsity is not None:
        by_id = {id(p): m.tensor() for g in groups for p, m in zip(g["params"], g["masks"])}
        masks = {n: by_id[id(q)] for n, q in model_a.named_parameters()}
    opt = ZOSGD(groups, lr=0.05, eps=1e-2, weight_decay=wd, seed=5, restore="mezo")
    opt.chunk = chunk
    for step in range(6):
        g_ours = opt.step(loss_a)
        g_ref = _mezo_trainer_step(named_b, loss_b, step_seed(5, step), 0.05, 1e-2, wd, masks)
        assert g_ours == g_ref, step
        for (n, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
            assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                               b.view(torch.int16 if dtype != torch.float32 else torch.int32)), (step, n)
    fresh, _ = wide_model(dtype)
    again = ZOSGD(param_groups(list(fresh.named_parameters()), wd, sparsity), lr=0.05, eps=1e-2, weight_decay=wd,
                  seed=5, restore="mezo")
    again.chunk = 64 if chunk == 48 else chunk
    again.replay(opt.trajectory)
    for (n, a), b in zip(fresh.named_parameters(), model_a.parameters()):
        assert torch.equal(a, b), n


def test_kth_magnitude_by_chunks_is_the_partitioned_value():
    """Sparse-MeZO's threshold without a copy of the tensor: the value partitioning |w| gives, ties and zeros too."""
    import numpy as np

    from dlzo.zo import _kth_magnitude

    gen = torch.Generator().manual_seed(0)
    for trial in range(12):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            n = int(torch.randint(1, 3000, (1,), generator=gen))
            w = (torch.randn(n, generator=gen) * 10.0 ** float(torch.randint(-6, 3, (1,), generator=gen))).to(dtype)
            if trial % 3 == 0:
                w[: n // 3] = w[0]
            if trial % 4 == 0:
                w[::7] = 0.0
            for sparsity in (0.0, 0.5, 0.75, 0.99):
                k = max(1, math.ceil((1 - sparsity) * n))
                mag = np.abs(w.to(torch.float32).numpy())
                mag.partition(k - 1)
                assert _kth_magnitude(w, k, chunk=48) == float(mag[k - 1]), (trial, dtype, n, sparsity)


def test_magnitude_mask_leaves_the_weights_as_they_are():
    """The mask's threshold is read from |w| chunk by chunk: never written back into an fp32 tensor's weights."""
    from dlzo.zo import magnitude_mask

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = torch.randn(5000, generator=torch.Generator().manual_seed(1)).to(dtype)
        before = w.clone()
        mask = magnitude_mask(w, 0.6)
        assert torch.equal(w, before) and int(mask.sum()) >= 2000  # ties at the threshold (bf16) count too


def test_bitmask_packs_and_unpacks_every_span():
    """Sparse-MeZO's masks are kept one bit an element: every span read back is the bool mask's, whatever the
    tensor's size (not a multiple of 8 or of the chunk), its dtype or the chunk the spans are cut by."""
    from dlzo.zo import BitMask, _chunks, magnitude_mask, magnitude_masks

    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 8, 9, 15, 16, 17, 100, 1000, 4099):
        mask = torch.rand(n, generator=gen) < 0.3
        for chunk in (16, 48, 1 << 20):
            bm = BitMask.pack(mask.view(-1, 1) if n % 2 else mask, chunk=chunk)
            assert bm.bits.numel() == (n + 7) // 8 and bm.numel() == n
            assert torch.equal(bm.tensor().reshape(-1), mask) and bm.count(chunk=chunk) == int(mask.sum())
            for b, e in _chunks(n, 16):
                assert torch.equal(bm.chunk(b, e), mask[b:e]), (n, chunk, b, e)
            z = torch.randn(n, generator=gen)
            assert torch.equal(bm.mul_into(z.clone().view(bm.shape), chunk=chunk).reshape(-1), z * mask)
            for dtype in (torch.float32, torch.bfloat16):  # unpacked in the multiplied dtype: the same product
                got = bm.chunk(0, n, dtype)
                assert got.dtype == dtype and torch.equal(z.to(dtype) * got, z.to(dtype) * mask)
    with pytest.raises(ValueError, match="starts on a byte"):
        BitMask.pack(torch.ones(20, dtype=torch.bool)).chunk(4, 12)
    with pytest.raises(ValueError, match="needs 3 uint8 bytes"):
        BitMask(torch.zeros(2, dtype=torch.uint8), (17,))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ws = [torch.randn(*s, generator=gen).to(dtype) for s in ((37, 11), (5,), (64, 64), (3, 7, 9))]
        ws.append(torch.randn(40, 30, generator=gen).to(dtype).t())  # not contiguous
        packed = magnitude_masks(ws, 0.75)
        assert len({m.bits.untyped_storage().data_ptr() for m in packed}) == 1  # one buffer for all
        for w, m in zip(ws, packed):
            want = magnitude_mask(w, 0.75)
            assert m.shape == w.shape and torch.equal(m.tensor(), want), (dtype, w.shape)
            assert torch.equal(magnitude_mask(w, 0.75, packed=True).tensor(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("restore", ["mezo", "exact", "fused"])
def test_packed_and_bool_masks_take_the_same_steps(restore, dtype):
    """A group's masks as BitMasks (param_groups) or as the bool tensors they pack: the same bits after steps
    with weight decay (a BitMask is unpacked in the weights' dtype), on a tensor whose size is no multiple of 8
    and cut into chunks of 16, and on one that is not contiguous; and only the masked weights move."""
    from dlzo.zo import magnitude_mask

    runs = []
    for packed in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(13, 7), nn.LayerNorm(7), nn.Linear(7, 3))  # 91 weights: 6 spans of 16
        # one tensor not contiguous: drawn and masked whole (as every tensor is on a GPU)
        model[2].weight = nn.Parameter(torch.randn(3, 7).t().contiguous().t())
        model.to(dtype)
        x, y = torch.randn(8, 13, dtype=dtype), torch.randn(8, 3, dtype=dtype)
        loss = lambda: float(((model(x) - y) ** 2).mean())  # noqa: E731
        before = copy.deepcopy(model)
        groups = param_groups(model.named_parameters(), 0.1, sparsity=0.6)
        if not packed:
            for g in groups:
                g["masks"] = [magnitude_mask(p, 0.6) for p in g["params"]]
        opt = ZOSGD(groups, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=4, restore=restore)
        opt.chunk = 16
        for _ in range(4):
            opt.step(loss)
        runs.append(snapshot(model))
    assert not model[2].weight.is_contiguous()
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n
    fresh = dict(zip(runs[0], (p.detach() for p in before.parameters())))
    for n, w in runs[0].items():
        m = magnitude_mask(fresh[n], 0.6)
        assert torch.equal(w[~m], fresh[n][~m]) and (w[m] != fresh[n][m]).any(), n
