"""DHBE (trials/defenses/dhbe.py): generators, patch mixing, BN behaviour, lam=0, progress, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from trials.defenses import DefenseContext, make_defense
from trials.defenses.dhbe import tv2
from trials.defenses.dhbe_generators import PatchGenerator, SampleGenerator
from trials.models import build_model

TINY = {
    "epochs": 2,
    "iters_per_epoch": 1,
    "student_steps": 2,
    "batch_size": 8,
    "generator_width": 8,
    "patch_generator_width": 8,
    "nz": 16,
    "nz_patch": 16,
}
ITERS = TINY["epochs"] * TINY["iters_per_epoch"]
MEAN, STD = (0.2, 0.4, 0.6), (0.5, 0.25, 0.2)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one thread is as fast, and two threads beside another busy process on a
    2-core machine measured 150x slower (28 s instead of 0.2 s per tiny run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(image_size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return build_model("mini_resnet", 10, image_size, MEAN, STD)


def _ctx(seed: int = 0, **kw) -> DefenseContext:
    return DefenseContext(
        device=torch.device("cpu"), seed=seed, generator=torch.Generator().manual_seed(seed), **kw
    )


@pytest.mark.parametrize(("size", "init", "blocks"), [(32, 8, 2), (28, 7, 2), (64, 8, 3)])
def test_sample_generator_shapes(size: int, init: int, blocks: int) -> None:
    g = SampleGenerator(nz=16, ngf=8, channels=3, image_size=size)
    assert (g.init_size, len(g.blocks)) == (init, blocks)
    out = g(torch.randn(4, 16))
    assert out.shape == (4, 3, size, size)
    # ends with BatchNorm2d(3, affine=False): each channel has zero mean and unit variance over the batch
    assert isinstance(g.bn_out, nn.BatchNorm2d) and not g.bn_out.affine
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2)


def test_patch_generator_layers_bounded_and_padded() -> None:
    gp = PatchGenerator(nz=16, ngf=8, channels=3, patch_size=5, image_size=32)
    # the code's layer list: Linear -> BN(ngf) (no activation) -> conv -> BN(3, affine=False) -> tanh
    assert gp.l1.out_features == 8 * 5 * 5 and len(gp.blocks) == 0 and not gp.bn_out.affine
    patch = gp(torch.randn(6, 16))
    assert patch.shape == (6, 3, 5, 5) and patch.abs().max() < 1
    assert PatchGenerator(nz=16, ngf=8, patch_size=10)(torch.randn(2, 16)).shape == (2, 3, 10, 10)
    gen = torch.Generator().manual_seed(0)
    corners = set()
    for _ in range(20):
        padded = gp.random_pad(patch, gen)
        assert padded.shape == (6, 3, 32, 32)
        nonzero = (padded != 0).any(dim=1)  # (B, H, W)
        rows, cols = nonzero.any(dim=(0, 2)).nonzero().flatten(), nonzero.any(dim=(0, 1)).nonzero().flatten()
        top, left = int(rows.min()), int(cols.min())
        assert int(rows.max()) - top < 5 and int(cols.max()) - left < 5  # inside one p x p box
        for i in range(6):  # the same location for the whole batch, each sample its own patch
            assert torch.equal(padded[i, :, top : top + 5, left : left + 5], patch[i])
        corners.add((top, left))
    assert len(corners) > 5  # redrawn on every call


def test_patch_is_added_in_pixel_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """x_pat = norm(denorm(v) + P) with the model's mean/std, and no clamping."""
    from trials.defenses import dhbe

    model = _model()
    seen: list[torch.Tensor] = []
    original = type(model).forward_normalized

    def spy(self, z):
        seen.append(z.detach().clone())
        return original(self, z)

    pads: list[torch.Tensor] = []
    pad_original = PatchGenerator.random_pad

    def pad_spy(self, patch, generator):
        out = pad_original(self, patch, generator)
        pads.append(out.detach().clone())
        return out

    monkeypatch.setattr(type(model), "forward_normalized", spy)
    monkeypatch.setattr(dhbe.PatchGenerator, "random_pad", pad_spy)
    make_defense("dhbe", {**TINY, "epochs": 1, "iters_per_epoch": 1, "student_steps": 1}).run(
        model, None, _ctx()
    )
    # student step: T(v), S(v), S(x_pat) are the first three calls (teacher and student share the class)
    v, x_pat, pad = seen[0], seen[2], pads[0]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = ((v * std + mean) + pad - mean) / std
    assert torch.allclose(x_pat, expected, atol=1e-5)
    assert torch.equal(seen[1], v)
    # outside the patch box, the patched batch equals the clean one; inside it moved by P / std
    box = pad != 0
    assert torch.allclose(x_pat[~box], v[~box], atol=1e-5)
    assert torch.allclose((x_pat - v)[box], (pad / std.expand_as(pad))[box], atol=1e-5)
    # unclamped: the pixel-space image may leave [0, 1]
    assert ((v * std + mean) + pad).min() < 0 or ((v * std + mean) + pad).max() > 1


def test_teacher_untouched_student_bn_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import trials.defenses.dhbe as dhbe

    model = _model()
    before = copy.deepcopy(model.state_dict())
    prepared: list[nn.Module] = []
    real_prepare = dhbe.prepare_model

    def spy_prepare(module, device, amp):
        prepared.append(module)
        return real_prepare(module, device, amp)

    monkeypatch.setattr(dhbe, "prepare_model", spy_prepare)
    student = make_defense("dhbe", TINY).run(model, None, _ctx())
    teacher = prepared[0]  # the frozen copy is prepared first
    assert teacher is not student
    for k, v in teacher.state_dict().items():  # weights and BN buffers unchanged
        assert torch.equal(v, before[k]), k
    assert not teacher.training and not any(w.requires_grad for w in teacher.parameters())
    after = student.state_dict()
    stats = [k for k in before if k.endswith("running_mean") or k.endswith("running_var")]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)  # synthetic BN statistics
    # S in train mode in every step: 2 passes per student step, 1 in the G step, 2 in the Gp step
    assert int(after["stem.1.num_batches_tracked"]) == ITERS * (TINY["student_steps"] * 2 + 1 + 2)


def test_lam_zero_is_dfad_without_patch_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """lam = 0: Gp is never run (no patched batch, no Gp step), as in the official DFAD_train.py."""
    import trials.defenses.dhbe as dhbe

    calls = {"n": 0}
    forward = dhbe.PatchGenerator.forward

    def counting(self, z):
        calls["n"] += 1
        return forward(self, z)

    monkeypatch.setattr(dhbe.PatchGenerator, "forward", counting)
    records: list[dict] = []
    student = make_defense("dhbe", {**TINY, "lam": 0.0}).run(_model(), None, _ctx(progress=records.append))
    assert calls["n"] == 0
    assert all(r["L_br"] == 0 and r["loss_Gp"] == 0 for r in records)
    assert int(student.state_dict()["stem.1.num_batches_tracked"]) == ITERS * (TINY["student_steps"] + 1)
    make_defense("dhbe", TINY).run(_model(), None, _ctx())
    assert calls["n"] == ITERS * (
        TINY["student_steps"] + 1
    )  # with lam > 0: one Gp batch per student step and one Gp step


def test_lam_zero_takes_dfad_tv2_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """DFAD_train.py's TV2 weight is 0, DHBE_train.py's 1e-4: an unset tv2_weight follows lam."""
    import trials.defenses.dhbe as dhbe

    def weight(params: dict) -> float:
        return make_defense("dhbe", params).params.tv2_weight

    assert weight({}) == 1e-4 and weight({"lam": 0.5}) == 1e-4
    assert weight({"lam": 0}) == 0.0
    assert weight({"lam": "0", "tv2_weight": "1e-4"}) == 1e-4  # an explicit value is kept
    assert weight({"lam": 0.1, "tv2_weight": 0}) == 0.0
    assert weight({"tv2_weight": "none"}) == 1e-4

    calls = {"n": 0}
    original = dhbe.tv2

    def counting(x):
        calls["n"] += 1
        return original(x)

    monkeypatch.setattr(dhbe, "tv2", counting)
    make_defense("dhbe", {**TINY, "lam": 0.0}).run(_model(), None, _ctx())
    assert calls["n"] == 0  # DFAD: no image prior in the generator's loss
    make_defense("dhbe", TINY).run(_model(), None, _ctx())
    assert calls["n"] == ITERS  # DHBE: one TV2 term per generator step


def test_tiny_run_reports_and_keeps_architecture() -> None:
    records: list[dict] = []
    model = _model()
    names = [k for k, _ in model.state_dict().items()]
    ctx = _ctx(progress=records.append, monitor=lambda m: {"val_acc": 0.5})
    student = make_defense("dhbe", TINY).run(model, None, ctx)
    assert type(student) is type(model) and list(student.state_dict()) == names
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["val_acc"] == 0.5 and r["L_kd"] > 0 and r["L_br"] > 0 and r["loss_Gp"] < 0 for r in records)
    assert records[-1]["lr_S"] == pytest.approx(
        0.1 * 0.1 * 0.1
    )  # milestones round(0.6*2)=1, round(0.8*2)=2: decayed twice by the end of epoch 2


def test_checkpoint_resume_matches_uninterrupted(tmp_path) -> None:
    params = {**TINY, "epochs": 3}
    straight = make_defense("dhbe", params).run(_model(), None, _ctx())

    class Killed(Exception):
        pass

    def killed_at_epoch_two(record: dict) -> None:  # killed after epoch 2, before its checkpoint
        if record["epoch"] == 2:
            raise Killed

    ctx = _ctx(checkpoint_dir=tmp_path, checkpoint_every_s=0, progress=killed_at_epoch_two)
    with pytest.raises(Killed):
        make_defense("dhbe", params).run(_model(), None, ctx)
    records: list[dict] = []
    ctx2 = _ctx(checkpoint_dir=tmp_path, checkpoint_every_s=0, progress=records.append)
    ctx2.generator.manual_seed(999)  # its state comes back from the checkpoint
    resumed = make_defense("dhbe", params).run(_model(), None, ctx2)
    assert [r["epoch"] for r in records] == [2, 3]  # resumed after epoch 1
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_tv2_is_unsquared_whole_batch_norm() -> None:
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # right: one diff of 1; down: one; diagonal (1:, :-1) - (:-1, 1:): none; diagonal (:-1,:-1) - (1:,1:): one
    assert float(tv2(x)) == pytest.approx(3.0)
    assert float(tv2(torch.cat([x, x]))) == pytest.approx(3.0 * 2**0.5)  # grows with the batch
