"""EnsembleRuntime.decode: one batched forward over row groups with different cache lengths and
different numbers of pending tokens equals each row's own full forward (GPT-2 and Llama)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pmixed.models.kv_cache import GrowingLayer  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup  # noqa: E402
from tests.models.test_stacked_lora import ARCHS, VOCAB, save_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(params=list(ARCHS))
def runtime(request, tmp_path):
    make, targets, fifo = ARCHS[request.param]
    base = make()
    dirs = save_adapters(base, targets, fifo, tmp_path, n=3)
    return EnsembleRuntime(base, None, dirs)


def reference(rt: EnsembleRuntime, adapter: int, seq: list[int]) -> torch.Tensor:
    return rt.probs(torch.tensor([seq]), [adapter])[0, -1]  # [V]


@pytest.mark.parametrize("split_head", [True, False])
def test_batched_groups_equal_separate_full_forwards(runtime, monkeypatch, split_head):
    if not split_head:
        monkeypatch.setattr(runtime, "split_head", lambda: None)
    check_batched_groups(runtime)


@pytest.fixture
def nan_buffers(monkeypatch):
    """Fresh batch buffers (``GrowingLayer.blank``) filled with NaN, as reused memory may be."""
    blank = GrowingLayer.blank

    def poisoned(self, *args):
        out = blank(self, *args)
        self._k.fill_(float("nan"))
        self._v.fill_(float("nan"))
        return out

    monkeypatch.setattr(GrowingLayer, "blank", poisoned)


def test_padding_is_written_whatever_fresh_batch_buffers_hold(runtime, nan_buffers):
    """The padded batch cache starts uninitialised (``GrowingLayer.blank``): filled with NaN here,
    as reused memory may be, every result stays exact, so every padded position was written (a
    masked position still enters attention's product, with weight 0, and 0 * NaN is NaN)."""
    check_batched_groups(runtime)


def check_batched_groups(rt: EnsembleRuntime) -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12, 6)]
    groups = [RowGroup([PUBLIC, 0, 1, 2]), RowGroup([1]), RowGroup([PUBLIC]), RowGroup([2, PUBLIC])]
    # step 1: prefill everything but the last few tokens (different lengths, one forward)
    for grp, s in zip(groups, seqs):
        grp.tokens = s[: len(s) - 3]
    first = rt.decode(groups)
    for grp, s, out in zip(groups, seqs, first):
        for j, a in enumerate(grp.adapters):
            torch.testing.assert_close(out[j], reference(rt, a, s[: len(s) - 3]), rtol=1e-5, atol=1e-6)
    # step 2: groups catch up by 3, 1, 2 and 3 tokens in one forward (pending tokens padded)
    for grp, s, k in zip(groups, seqs, (3, 1, 2, 3)):
        grp.tokens = s[grp.seen : grp.seen + k]
    second = rt.decode(groups)
    for grp, s, out in zip(groups, seqs, second):
        assert grp.tokens == [] and grp.cache[0][0].shape[2] == grp.seen
        for j, a in enumerate(grp.adapters):
            torch.testing.assert_close(out[j], reference(rt, a, s[: grp.seen]), rtol=1e-5, atol=1e-6)
    # a new group (no cache) next to groups with history
    fresh = RowGroup([0], tokens=seqs[0][:5])
    groups[1].tokens = [7]
    out = rt.decode([groups[1], fresh])
    torch.testing.assert_close(out[1][0], reference(rt, 0, seqs[0][:5]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][0], reference(rt, 1, seqs[1][:groups[1].seen - 1] + [7]),
                               rtol=1e-5, atol=1e-6)


def test_a_group_without_pending_tokens_is_refused(runtime):
    with pytest.raises(ValueError, match="no pending tokens"):
        runtime.decode([RowGroup([PUBLIC])])


def test_persistent_batches_are_reused_and_equal_full_forwards(runtime):
    """Constant-work serving: the same groups in the same order reuse last step's batch cache
    (no re-padding); a change of membership falls back to the padded rebuild. Same numbers."""
    rt = runtime
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (12, 9)]
    groups = [RowGroup([PUBLIC, 0, 1, 2], tokens=seqs[0][:5]), RowGroup([PUBLIC, 0, 1, 2], tokens=seqs[1][:2])]
    rt.decode(groups, persistent=True)
    assert groups[0]._batch is None  # prefill of unequal lengths: not aligned, copies
    for step in range(5):
        for grp, s in zip(groups, seqs):
            grp.tokens = [s[grp.seen]]
        shared = groups[0]._batch
        out = rt.decode(groups, persistent=True)
        assert groups[0]._batch is groups[1]._batch is not None
        if step > 0:
            assert shared is not None  # reused from the previous step
        for grp, s, o in zip(groups, seqs, out):
            for j, a in enumerate(grp.adapters):
                torch.testing.assert_close(o[j], reference(rt, a, s[: grp.seen]), rtol=1e-5, atol=1e-6)
    groups[1].tokens = [seqs[1][groups[1].seen]]  # only one group steps: the rebuild path
    out = rt.decode([groups[1]], persistent=True)
    torch.testing.assert_close(out[0][0], reference(rt, PUBLIC, seqs[1][: groups[1].seen]), rtol=1e-5, atol=1e-6)


def test_groups_join_and_leave_a_persistent_batch_without_a_rebuild(runtime, nan_buffers):
    """Constant-work serving under churn: a group that leaves gives its rows to the last slot's
    group, one that joins goes into the spare rows, and the batch buffer stays the same (no
    rebuild); a group that left keeps a cache of its own and is exact when it steps again; a
    group of another size falls back to the rebuild, and so does one that stepped elsewhere in
    between (its rows in the batch are stale). Fresh buffers hold NaN (as reused memory may):
    every number still equals the full forward."""
    rt = runtime
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (40,), generator=g).tolist() for _ in range(7)]
    pool = [RowGroup([PUBLIC, 0, 1, 2]) for _ in range(6)] + [RowGroup([PUBLIC, 2])]
    for i, grp in enumerate(pool):
        grp.tokens = seqs[i][: 3 + i]
    rt.decode(pool[:4], persistent=True)  # prefill of unequal lengths: copies
    rt.decode(pool[4:6], persistent=True)
    rt.decode(pool[6:], persistent=True)

    def step(members: list[int]) -> None:
        grps = [pool[i] for i in members]
        for i in members:
            pool[i].tokens = [seqs[i][pool[i].seen]]
        out = rt.decode(grps, persistent=True)
        for i, o in zip(members, out):
            for j, a in enumerate(pool[i].adapters):
                torch.testing.assert_close(o[j], reference(rt, a, seqs[i][: pool[i].seen]), rtol=1e-5, atol=1e-6)

    step([0, 1, 2, 3])  # the rebuild that makes the persistent batch (with spare rows)
    batch = pool[0]._batch
    buf = batch.cache.layers[0]._k.data_ptr()
    step([0, 1, 2, 3])
    step([3, 0, 2])  # group 1 leaves (the last slot's group fills its rows), in another order
    assert pool[0]._batch is batch and pool[1]._batch is None
    step([0, 2, 3, 4])  # group 4 joins into the spare rows
    step([4, 0, 2, 3])
    assert pool[4]._batch is batch and batch.cache.layers[0]._k.data_ptr() == buf
    assert [id(s) for s in batch.slots] == [id(pool[i]) for i in (0, 3, 2, 4)]
    step([1])  # the group that left steps alone on its own copy
    step([0, 2, 3, 4, 1])  # and comes back
    assert pool[1]._batch is batch and batch.cache.layers[0]._k.data_ptr() == buf
    assert batch.cache.layers[0].capacity_rows == 20  # 16 rows + a quarter more
    step([0, 2, 3, 4, 1, 6])  # a group of 2 rows: over the spare rows, a rebuild
    again = pool[0]._batch
    assert again is not batch and again.cache.layers[0].capacity_rows == 22 + 5
    step([0, 2, 4, 1, 6])  # group 3 leaves, but the last slot has 2 rows, not 4: a rebuild
    assert pool[0]._batch is not again
    step([0, 2, 4, 1, 6])
    latest = pool[0]._batch
    assert latest.cache.layers[0].rows == 18
    for i in (2, max((0, 2, 4, 1, 6), key=lambda i: pool[i].seen)):  # one, then the longest, step
        pool[i].tokens = [seqs[i][pool[i].seen]]  # on their own, outside the batch
        rt.decode([pool[i]])
    step([0, 2, 4, 1, 6])  # their rows in the batch are a step behind, one is longer: not reused
    final = pool[0]._batch
    assert final is not latest
    step([0, 2, 4, 1, 6])
    step([0, 4, 2])  # the last two slots leave (1, then 6: nothing moves), in another order
    step([4, 0])  # and a middle one (2): the last slot's group moves into its rows
    assert pool[0]._batch is final and [id(s) for s in final.slots] == [id(pool[0]), id(pool[4])]
    step([0, 4])


def test_a_persistent_batch_drops_the_padding_every_row_has_in_place(runtime, nan_buffers):
    """The long group that made the batch wide leaves: the others' rows are mostly padding, which
    is dropped in the same buffer (no rebuild) when a shorter group joins. Every number still
    equals each row's full forward; a moved piece that overlaps where it goes is copied exactly."""
    rt = runtime
    g = torch.Generator().manual_seed(9)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (40, 12, 12, 12)]
    pool = [RowGroup([PUBLIC, 0, 1, 2], tokens=s[: len(s) - 6]) for s in seqs]
    rt.decode(pool[:3], persistent=True)  # prefill, unequal lengths: copies
    rt.decode(pool[3:], persistent=True)

    def step(members: list[int]) -> None:
        for i in members:
            pool[i].tokens = [seqs[i][pool[i].seen]]
        out = rt.decode([pool[i] for i in members], persistent=True)
        for i, o in zip(members, out):
            for j, a in enumerate(pool[i].adapters):
                torch.testing.assert_close(o[j], reference(rt, a, seqs[i][: pool[i].seen]), rtol=1e-5, atol=1e-6)

    step([0, 1, 2])  # the rebuild that makes the batch: width 35 for the long group
    batch = pool[0]._batch
    buf, wide = batch.cache.layers[0]._k.data_ptr(), batch.width
    step([1, 2, 3])  # the long one leaves, a short one joins: 29 positions of padding each
    assert pool[1]._batch is batch and batch.cache.layers[0]._k.data_ptr() == buf
    assert batch.width == max(pool[i].seen for i in (1, 2, 3)) < wide - 16
    step([1, 2, 3])
    step([3, 1])


def test_spare_rows_of_a_persistent_batch_stay_within_max_rows(runtime):
    rt = runtime
    # no max_rows: a quarter more or one group more; max_rows: every row up to it (reserved, not written)
    for most, want in ((None, 8 + 4), (10, 10), (8, 8), (4, 8), (64, 64)):
        groups = [RowGroup([PUBLIC, 0, 1, 2], tokens=t) for t in ([1, 2, 3], [1, 2])]  # unaligned: copies
        rt.decode(groups, persistent=True, max_rows=most)
        for grp in groups:
            grp.tokens = [4]
        rt.decode(groups, persistent=True, max_rows=most)  # the rebuild that makes the batch
        assert groups[0]._batch.cache.layers[0].capacity_rows == want
