"""FewShotTasks invariants on a synthetic dataset whose pixels encode (class, example, rotation)."""

import pytest
import torch

from mamlkit.engine import TaskBatch
from mamlkit.tasks.fewshot import FewShotTasks

N_CLASSES, N_PER_CLASS, SIDE = 12, 6, 4
BASE = torch.arange(SIDE * SIDE, dtype=torch.float32).view(SIDE, SIDE)  # distinct under every rotation


def coded_images() -> torch.Tensor:
    """``[classes, per_class, 4, 4]``: image (c, e) = BASE + 16 * (c * N_PER_CLASS + e)."""
    ids = torch.arange(N_CLASSES * N_PER_CLASS, dtype=torch.float32).view(N_CLASSES, N_PER_CLASS, 1, 1)
    return BASE + SIDE * SIDE * ids


def decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class, example and number of 90° turns of images ``[..., 1, 4, 4]``."""
    x = x[..., 0, :, :]
    ids = (x.amin(dim=(-2, -1)) // (SIDE * SIDE)).long()
    pattern = x - (SIDE * SIDE) * ids[..., None, None]
    matches = torch.stack([(pattern == torch.rot90(BASE, r)).all(-1).all(-1) for r in range(4)], -1)
    assert matches.sum(-1).eq(1).all(), "every image must be an exact rotation of a dataset image"
    return ids // N_PER_CLASS, ids % N_PER_CLASS, matches.int().argmax(-1)


def sample(n_way=5, k_shot=2, q_query=3, n_tasks=64, seed=0, **kwargs) -> TaskBatch:
    tasks = FewShotTasks(coded_images(), n_way, k_shot, q_query, **kwargs)
    return tasks.batch(n_tasks, torch.Generator().manual_seed(seed))


def test_shapes_and_dtypes():
    b = sample(n_way=5, k_shot=2, q_query=3, n_tasks=7)
    assert isinstance(b, TaskBatch)
    assert b.support_inputs.shape == (7, 10, 1, SIDE, SIDE) and b.support_inputs.dtype == torch.float32
    assert b.query_inputs.shape == (7, 15, 1, SIDE, SIDE) and b.query_inputs.dtype == torch.float32
    assert b.support_targets.shape == (7, 10) and b.support_targets.dtype == torch.int64
    assert b.query_targets.shape == (7, 15) and b.query_targets.dtype == torch.int64
    # A channel dimension that is already there is kept.
    b = FewShotTasks(coded_images().unsqueeze(2).expand(-1, -1, 3, -1, -1), 2, 1, 1).batch(3, torch.Generator())
    assert b.support_inputs.shape == (3, 2, 3, SIDE, SIDE)


def test_classes_examples_and_labels_are_consistent():
    n_way, k, q = 5, 2, 3
    b = sample(n_way, k, q, n_tasks=200)
    s_cls, s_ex, _ = decode(b.support_inputs)
    q_cls, q_ex, _ = decode(b.query_inputs)
    for t in range(200):
        classes = s_cls[t].unique()
        assert len(classes) == n_way, "classes of a task must be distinct"
        assert set(q_cls[t].tolist()) == set(classes.tolist())
        label_of = {}
        all_classes = torch.cat([s_cls[t], q_cls[t]]).tolist()
        all_labels = torch.cat([b.support_targets[t], b.query_targets[t]]).tolist()
        for cls, lab in zip(all_classes, all_labels, strict=True):
            assert label_of.setdefault(cls, lab) == lab, "one class must have one label across support and query"
        assert sorted(label_of.values()) == list(range(n_way))
        support = set(zip(s_cls[t].tolist(), s_ex[t].tolist(), strict=True))
        query = set(zip(q_cls[t].tolist(), q_ex[t].tolist(), strict=True))
        assert len(support) == n_way * k and len(query) == n_way * q, "examples drawn without replacement"
        assert not support & query, "support and query must be disjoint"
        assert torch.bincount(b.support_targets[t], minlength=n_way).eq(k).all()
        assert torch.bincount(b.query_targets[t], minlength=n_way).eq(q).all()


def test_labels_are_permuted_per_task():
    n_way = 5
    b = sample(n_way, 1, 1, n_tasks=300)
    s_cls, _, _ = decode(b.support_inputs)
    # Rank of each class id within its task versus its label: a sampler that labelled classes in
    # id order (or by slot with unshuffled slots) would always give the identity.
    ranks = s_cls.argsort(1).argsort(1)
    label_by_rank = torch.empty_like(b.support_targets).scatter_(1, ranks, b.support_targets)
    assert len({tuple(row) for row in label_by_rank.tolist()}) > 50
    # Every label is used at every slot position.
    for slot in range(n_way):
        assert set(b.support_targets[:, slot].tolist()) == set(range(n_way))


def test_every_class_and_example_is_drawn():
    b = sample(5, 1, 1, n_tasks=400)
    cls, ex, _ = decode(torch.cat([b.support_inputs, b.query_inputs], 1))
    assert set(cls.flatten().tolist()) == set(range(N_CLASSES))
    assert set((cls * N_PER_CLASS + ex).flatten().tolist()) == set(range(N_CLASSES * N_PER_CLASS))


def test_rotation_is_per_class_and_covers_all_four():
    n_way, k, q = 4, 2, 2
    b = sample(n_way, k, q, n_tasks=100, rotate=True)
    s_cls, _, s_rot = decode(b.support_inputs)
    q_cls, _, q_rot = decode(b.query_inputs)
    cls, rot = torch.cat([s_cls, q_cls], 1), torch.cat([s_rot, q_rot], 1)
    for t in range(100):
        for c in cls[t].unique():
            assert rot[t][cls[t] == c].unique().numel() == 1, "all images of a class share one rotation"
    assert set(rot.flatten().tolist()) == {0, 1, 2, 3}
    # Per (task, class) rotations are roughly uniform over the 400 draws.
    per_class = torch.bincount(s_rot[:, ::k].flatten(), minlength=4)
    assert per_class.min() > 60


def test_no_rotation_when_disabled():
    b = sample(5, 2, 3, n_tasks=100, rotate=False)
    _, _, s_rot = decode(b.support_inputs)
    _, _, q_rot = decode(b.query_inputs)
    assert s_rot.eq(0).all() and q_rot.eq(0).all()


def test_deterministic_for_a_seed():
    for rotate in (False, True):
        a, b = sample(seed=3, rotate=rotate), sample(seed=3, rotate=rotate)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        c = sample(seed=4, rotate=rotate)
        assert not torch.equal(a.support_inputs, c.support_inputs)


def test_uint8_images_are_scaled_per_batch_and_never_modified():
    images = (coded_images() % 256).to(torch.uint8)
    tasks = FewShotTasks(images, 3, 1, 2, scale=1 / 255)
    b = tasks.batch(10, torch.Generator().manual_seed(0))
    assert b.support_inputs.dtype == torch.float32
    assert 0 <= b.support_inputs.min() and b.support_inputs.max() <= 1
    values = set((b.query_inputs * 255).round().long().unique().tolist())
    assert values <= set(images.unique().long().tolist())
    # Scaling float images works in place on the batch, not on the dataset.
    floats = coded_images()
    before = floats.clone()
    FewShotTasks(floats, 3, 1, 2, scale=0.5).batch(10, torch.Generator())
    FewShotTasks(floats, 3, 1, 2, scale=0.5, rotate=True).batch(10, torch.Generator())
    assert torch.equal(floats, before)


def test_impossible_requests_raise():
    images = coded_images()
    with pytest.raises(ValueError, match="distinct classes"):
        FewShotTasks(images, N_CLASSES + 1, 1, 1)
    with pytest.raises(ValueError, match="without replacement"):
        FewShotTasks(images, 5, 4, 3)
    with pytest.raises(ValueError, match=">= 1"):
        FewShotTasks(images, 5, 0, 1)
    with pytest.raises(ValueError, match="square"):
        FewShotTasks(torch.zeros(3, 3, 4, 5), 2, 1, 1, rotate=True)
    with pytest.raises(ValueError, match="classes, per_class"):
        FewShotTasks(torch.zeros(3, 4, 5), 2, 1, 1)
    # Exactly as many as exist is fine.
    b = FewShotTasks(images, N_CLASSES, 2, N_PER_CLASS - 2).batch(2, torch.Generator())
    assert b.query_inputs.shape[1] == N_CLASSES * (N_PER_CLASS - 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_everything_stays_on_the_device():
    images = coded_images().cuda()
    tasks = FewShotTasks(images, 5, 2, 3, rotate=True)
    b = tasks.batch(8, torch.Generator(device="cuda").manual_seed(0))
    assert all(t.is_cuda for t in b)
    cls, _, rot = decode(b.support_inputs.cpu())
    assert cls.shape == (8, 10) and rot.max() <= 3
    with pytest.raises(ValueError, match="generator"):
        tasks.batch(8, torch.Generator())
