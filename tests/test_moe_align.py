"""moe_align on every backend against netmerge_fast.reference, and the reference against its definition."""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from tests.conftest import available_backends, device_for

BACKENDS = available_backends(["torch", "cpu", "triton"])


def _ids(gen, T, k, E, routed_nowhere=0.2):
    ids = torch.randint(0, E, (T, k), generator=gen)
    return torch.where(torch.rand(T, k, generator=gen) < routed_nowhere, -1, ids)


def test_reference_is_a_stable_grouping_by_expert(gen):
    ids = _ids(gen, 50, 3, 7)
    sorted_ids, offsets = reference.moe_align(ids, 7)
    flat = ids.reshape(-1)
    assert sorted(sorted_ids.tolist()) == list(range(150)), "a permutation of the slots"
    for e in range(7):
        segment = sorted_ids[offsets[e] : offsets[e + 1]].long()
        assert segment.tolist() == torch.nonzero(flat == e).flatten().tolist(), "expert e's slots, in slot order"
    tail = sorted_ids[offsets[7] :].long()
    assert tail.tolist() == torch.nonzero(flat == -1).flatten().tolist()


def test_reference_padded_layout(gen):
    ids = _ids(gen, 20, 2, 5)
    block = 4
    dense, offsets = reference.moe_align(ids, 5)
    padded, offsets_p, block_expert, padded_length = reference.moe_align(ids, 5, block)
    assert torch.equal(offsets, offsets_p)
    slots = ids.numel()
    assert padded.numel() == slots + 5 * (block - 1) and block_expert.numel() == padded.numel() // block
    at = 0
    for e in range(5):
        count = int(offsets[e + 1] - offsets[e])
        assert torch.equal(padded[at : at + count], dense[offsets[e] : offsets[e + 1]])
        blocks = -(-count // block)
        assert (padded[at + count : at + blocks * block] == slots).all(), "padding holds the sentinel"
        assert (block_expert[at // block : at // block + blocks] == e).all()
        at += blocks * block
    assert int(padded_length) == at
    assert (padded[at:] == slots).all() and (block_expert[at // block :] == -1).all()


# The torch backend is reference.py, checked against its definition above rather than against itself.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("block_size", [None, 1, 4, 16])
@pytest.mark.parametrize("T,k,E", [(0, 2, 4), (1, 1, 1), (1, 8, 8), (7, 2, 3), (40, 3, 8), (33, 4, 64)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_matches_reference(T, k, E, block_size, backend, id_dtype, gen):
    ids = _ids(gen, T, k, E).to(id_dtype)
    got = nf.moe_align(ids.to(device_for(backend)), E, block_size, backend=backend)
    want = reference.moe_align(ids, E, block_size)
    assert len(got) == len(want) == (2 if block_size is None else 4)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int32
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("T,k,E", [(100, 4, 8), (600, 4, 300)])
def test_more_slots_than_one_chunk(T, k, E, block_size, backend, gen):
    """The Triton kernel works on chunks of 256 slots: 400 slots take two chunks; 2400 slots over 300 experts take
    10 chunks, more than its scan holds at once (8 for 302 buckets), so the counts carry from one block of chunks
    to the next."""
    ids = _ids(gen, T, k, E)
    got = nf.moe_align(ids.to(device_for(backend)), E, block_size, backend=backend)
    for g, w in zip(got, reference.moe_align(ids, E, block_size), strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_slots_to_one_expert_and_none_routed(backend):
    device = device_for(backend)
    ids = torch.full((6, 2), 2)
    sorted_ids, offsets = nf.moe_align(ids.to(device), 4, backend=backend)
    assert sorted_ids.tolist() == list(range(12)) and offsets.tolist() == [0, 0, 0, 12, 12]
    sorted_ids, offsets = nf.moe_align(torch.full((3, 2), -1).to(device), 4, backend=backend)
    assert sorted_ids.tolist() == list(range(6)) and offsets.tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"topk_ids": torch.zeros(2, 2)}, TypeError, "topk_ids"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"num_experts": 2.0}, TypeError, "num_experts"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, needle):
    args = {"topk_ids": torch.zeros(2, 2, dtype=torch.int64), "num_experts": 4}
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        nf.moe_align(**args)
