"""Property-based tests (hypothesis) of the episode samplers' invariants, over random shapes,
seeds and options: distinct classes per task, support and query disjoint, labels a
permutation consistent between support and query, and splits that are disjoint and complete."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamlkit.data.omniglot import official_split
from mamlkit.tasks.fewshot import FewShotTasks


@st.composite
def episodes(draw):
    n_classes = draw(st.integers(2, 12))
    n_way = draw(st.integers(2, n_classes))
    n_per_class = draw(st.integers(2, 8))
    k_shot = draw(st.integers(1, n_per_class - 1))
    q_query = draw(st.integers(1, n_per_class - k_shot))
    return dict(
        n_classes=n_classes,
        n_per_class=n_per_class,
        n_way=n_way,
        k_shot=k_shot,
        q_query=q_query,
        rotate=draw(st.booleans()),
        n_tasks=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=150, deadline=None)
@given(episodes())
def test_episode_invariants(e):
    # Each image is constant and holds its own id, so an episode's images name the examples drawn
    # (rotations keep a constant image constant).
    ids = torch.arange(e["n_classes"] * e["n_per_class"], dtype=torch.float32)
    images = ids.view(e["n_classes"], e["n_per_class"], 1, 1).expand(-1, -1, 3, 3).contiguous()
    tasks = FewShotTasks(images, e["n_way"], e["k_shot"], e["q_query"], rotate=e["rotate"])
    batch = tasks.batch(e["n_tasks"], torch.Generator().manual_seed(e["seed"]))
    n, k, q = e["n_way"], e["k_shot"], e["q_query"]
    for t in range(e["n_tasks"]):
        s_ids = batch.support_inputs[t, :, 0, 0, 0].long()
        q_ids = batch.query_inputs[t, :, 0, 0, 0].long()
        assert (batch.support_inputs[t] == batch.support_inputs[t, :, :1, :1, :1]).all()  # whole images
        assert len(set(s_ids.tolist()) | set(q_ids.tolist())) == n * (k + q)  # no example twice
        assert not set(s_ids.tolist()) & set(q_ids.tolist())  # support and query disjoint
        label_of = {}
        for ids_, labels, per in ((s_ids, batch.support_targets[t], k), (q_ids, batch.query_targets[t], q)):
            classes = (ids_ // e["n_per_class"]).tolist()
            for c, y in zip(classes, labels.tolist()):
                assert label_of.setdefault(c, y) == y  # one label per class, the same in support and query
            assert sorted(classes) == sorted(c for c in set(classes) for _ in range(per))  # `per` of each class
        assert len(label_of) == n  # n distinct classes
        assert sorted(label_of.values()) == list(range(n))  # labels a permutation of 0..n-1


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 300), st.data())
def test_splits_are_disjoint_and_complete(n, data):
    names = [f"alphabet/character{i:03d}" for i in range(n)]
    n_train = data.draw(st.integers(0, n))
    n_val = data.draw(st.integers(0, n - n_train))
    split = official_split(names, (n_train, n_val))
    parts = [split["train"], split["val"], split["test"]]
    assert [len(p) for p in parts] == [n_train, n_val, n - n_train - n_val]
    assert sorted(i for p in parts for i in p) == list(range(n))  # disjoint and complete
    assert official_split(names, (n_train, n_val)) == split  # the same split every time
