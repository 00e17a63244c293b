"""GrowingLayer (models/kv_cache.py): the same keys and values as transformers' DynamicLayer for
any sequence of appends, in place while capacity lasts, never reserving beyond its limit; and the
runtime's steady constant-work step appends in place instead of copying the batch cache."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

from pmixed.models.kv_cache import GrowingLayer, growing_cache  # noqa: E402
from pmixed.models.runtime import PUBLIC, EnsembleRuntime, RowGroup  # noqa: E402
from tests.models.test_stacked_lora import ARCHS, VOCAB, save_adapters  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.integers(1, 9), min_size=1, max_size=12), limit=st.one_of(st.none(), st.integers(1, 40)),
       seed=st.integers(0, 2**16))
def test_growing_layer_equals_dynamic_layer(steps, limit, seed):
    g = torch.Generator().manual_seed(seed)
    ours, ref = GrowingLayer(limit), DynamicLayer()
    for t in steps:
        k, v = torch.randn(3, 2, t, 5, generator=g), torch.randn(3, 2, t, 4, generator=g)
        ka, va = ours.update(k, v)
        kb, vb = ref.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        assert ours.get_seq_length() == ref.get_seq_length() == ka.shape[2]
        cap = ours._k.shape[2]
        assert cap >= ours.length
        if limit is not None:  # never reserves beyond the limit unless the appends need more
            assert cap <= max(limit, ours.length)


def test_a_reserving_layer_takes_every_position_up_to_its_limit_at_once():
    layer = GrowingLayer(limit=40, reserve=True)
    layer.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2))
    buf = layer._k.data_ptr()
    assert layer._k.shape == (2, 1, 40, 2)
    for _ in range(37):
        layer.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    assert layer._k.data_ptr() == buf and layer.length == 40
    assert GrowingLayer(limit=40)._capacity_for(3) == 16  # without reserve: doubling


def test_appends_in_place_while_capacity_lasts():
    layer = GrowingLayer(limit=64)
    layer.update(torch.zeros(1, 1, 20, 2), torch.zeros(1, 1, 20, 2))
    buf = layer._k.data_ptr()
    cap = layer._k.shape[2]
    for i in range(cap - 20):
        k = torch.full((1, 1, 1, 2), float(i))
        keys, _ = layer.update(k, k)
        assert layer._k.data_ptr() == buf  # no reallocation, no copy of the earlier positions
        assert keys.data_ptr() == buf and keys[0, 0, -1, 0] == i
    layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))  # full: one reallocation
    assert layer._k.data_ptr() != buf and layer._k.shape[2] <= 64
    layer.crop(-5)  # remove 5 positions (transformers 4.56 and 5.x alike)
    assert layer.get_seq_length() == cap + 1 - 5 == layer.keys.shape[2]
    keys, _ = layer.update(torch.full((1, 1, 1, 2), 7.0), torch.zeros(1, 1, 1, 2))  # into the freed room
    assert keys.shape[2] == cap + 1 - 4 and keys[0, 0, -1, 0] == 7.0


def test_batch_select_and_a_row_count_change():
    layer = GrowingLayer()
    k = torch.arange(24.0).view(4, 1, 3, 2)
    layer.update(k, k)
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, k[[2, 0]]) and layer.get_seq_length() == 3
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.keys, k[[2, 2, 0, 0]])
    keys, _ = layer.update(torch.ones(4, 1, 1, 2), torch.ones(4, 1, 1, 2))
    assert keys.shape == (4, 1, 4, 2) and torch.equal(keys[:, :, :3], k[[2, 2, 0, 0]])
    with pytest.raises(ValueError, match="rows"):
        layer.update(torch.zeros(3, 1, 1, 2), torch.zeros(3, 1, 1, 2))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.keys is None


def test_spare_rows_take_a_joining_cache_and_a_leaving_one_is_filled_from_the_last_rows():
    layer = GrowingLayer()
    k = torch.arange(24.0).view(4, 1, 3, 2)
    keys, values = layer.blank(k, k, rows=4, length=3, room=2, spare_rows=2)
    keys.copy_(k)
    values.copy_(-k)
    assert layer.capacity_rows == 6 and layer.keys.shape == (4, 1, 3, 2)
    short = torch.full((2, 1, 2, 2), 7.0)
    layer.put_rows(4, short, -short)  # right-aligned at length 3, its first position zeroed
    layer.set_rows(6)
    assert torch.equal(layer.keys[4:, :, 0], torch.zeros(2, 1, 2)) and torch.equal(layer.keys[4:, :, 1:], short)
    layer.move_rows(1, 4, 2)  # rows 1-2 leave, the last two take their place
    layer.set_rows(4)
    assert torch.equal(layer.keys[[0, 3]], k[[0, 3]]) and torch.equal(layer.keys[1:3], layer._k[4:6, :, :3])
    assert torch.equal(layer.values[1:3, :, 1:], -short)
    keys, _ = layer.update(torch.ones(4, 1, 1, 2), torch.ones(4, 1, 1, 2))  # appends on the 4 rows in use
    assert keys.shape == (4, 1, 4, 2) and layer.capacity_rows == 6
    with pytest.raises(ValueError, match="overlapping"):
        layer.move_rows(0, 1, 2)
    with pytest.raises(ValueError, match="do not fit"):
        layer.put_rows(5, short, short)  # 2 rows from row 5 of 6
    with pytest.raises(ValueError, match="do not fit"):
        layer.put_rows(4, torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))  # longer than the cache
    with pytest.raises(ValueError, match="holds 6"):
        layer.set_rows(7)


@pytest.mark.parametrize("length, shift", [(9, 2), (9, 4), (9, 5), (9, 8), (9, 9), (3, 1), (5, 0)])
def test_shift_left_drops_the_first_positions_in_place(length, shift):
    """Positions [shift, length) become [0, length - shift) of the rows in use, in the same
    buffer, whether or not the moved part overlaps where it goes (pieces of ``shift``); rows
    beyond those in use are untouched; appends go on after it."""
    layer = GrowingLayer()
    k = torch.randn(3, 2, length, 4)
    layer.update(k, -k)
    layer.set_rows(2)
    spare_row = layer._k[2].clone()
    ptr = layer._k.data_ptr()
    layer.shift_left(shift)
    assert layer._k.data_ptr() == ptr and layer.length == length - shift
    assert torch.equal(layer.keys, k[:2, :, shift:]) and torch.equal(layer.values, -k[:2, :, shift:])
    assert torch.equal(layer._k[2], spare_row)
    keys, _ = layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert keys.shape == (2, 2, length - shift + 1, 4) and torch.equal(keys[:, :, :-1], k[:2, :, shift:])
    with pytest.raises(ValueError, match="cannot drop"):
        layer.shift_left(layer.length + 1)


def test_growing_cache_builds_growing_layers_that_copy_what_they_are_given():
    k = torch.randn(2, 1, 3, 2)
    cache = growing_cache(limit=8)
    cache.update(k, k, 0)
    assert isinstance(cache.layers[0], GrowingLayer) and torch.equal(cache.layers[0].keys, k)
    k.zero_()
    assert not torch.equal(cache.layers[0].keys, k)  # its own buffer


@pytest.mark.parametrize("arch", list(ARCHS))
def test_steady_constant_work_step_appends_in_place(arch, tmp_path):
    """The reused batch cache of a persistent step is written in place (the same buffer from one
    step to the next while capacity lasts, never wider than the model's context) and the
    numbers equal each row's full forward."""
    make, targets, fifo = ARCHS[arch]
    rt = EnsembleRuntime(make(), None, save_adapters(make(), targets, fifo, tmp_path, n=2))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (14, 14)]
    groups = [RowGroup([PUBLIC, 0, 1], tokens=s[:4]) for s in seqs]
    rt.decode(groups, persistent=True)
    ptrs = []
    for _ in range(8):
        for grp, s in zip(groups, seqs):
            grp.tokens = [s[grp.seen]]
        out = rt.decode(groups, persistent=True)
        layer = groups[0]._batch.cache.layers[0]
        assert isinstance(layer, GrowingLayer)
        assert layer._k.shape[2] <= (rt.context_length or 10**9)
        ptrs.append(layer._k.data_ptr())
        for grp, s, o in zip(groups, seqs, out):
            for j, a in enumerate(grp.adapters):
                ref = rt.probs(torch.tensor([s[: grp.seen]]), [a])[0, -1]
                torch.testing.assert_close(o[j], ref, rtol=1e-5, atol=1e-6)
    assert len(set(ptrs)) == 1  # every position up to the context reserved at once: never regrown
    if rt.context_length is not None:
        assert layer._k.shape[2] == rt.context_length


def test_blank_falls_back_to_the_least_room_where_address_space_is_refused(monkeypatch):
    """Strict overcommit refuses a reservation up to the context: the buffer then holds
    ``least_room`` spare positions (and grows by doubling); other errors are not swallowed."""
    real = torch.Tensor.new_empty

    def refusing(self, *size, **kw):
        if size[2] > 20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")
        return real(self, *size, **kw)

    monkeypatch.setattr(torch.Tensor, "new_empty", refusing)
    like = torch.zeros(2, 1, 4, 3)
    layer = GrowingLayer(limit=64)
    keys, _ = layer.blank(like, like, 2, 4, room=60, spare_rows=1, least_room=4)
    assert layer._k.shape == (3, 1, 8, 3) and keys.shape == (2, 1, 4, 3)
    keys.zero_()
    layer.values.zero_()
    k = torch.ones(2, 1, 1, 3)
    assert torch.equal(layer.update(k, k)[0][:, :, -1], k[:, :, 0])
    reserving = GrowingLayer(limit=64, reserve=True)  # a first append reserves the context, else doubles
    reserving.update(like, like)
    assert reserving._k.shape[2] == 16
    with pytest.raises(RuntimeError, match="allocate memory"):
        GrowingLayer(limit=64).blank(like, like, 2, 4, room=60)  # no fallback asked for
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        GrowingLayer(limit=64).blank(like, like, 2, 4, room=60, least_room=4)
