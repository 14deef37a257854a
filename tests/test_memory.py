"""The FIFO pixel memory of cross-image querying (supp. Table S4)."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from instunique.objectives import PixelMemory

DIM = 3


def rows(start, stop):
    """Entries numbered start..stop-1: feats (n, DIM), labels (n,), image ids (n,)."""
    k = torch.arange(start, stop)
    feats = k[:, None].float() + torch.tensor([0.0, 0.25, 0.5])
    return feats, k % 5 - 1, 100 + k


def assert_contents(memory, start, stop):
    feats, labels, ids = memory.contents()
    exp_feats, exp_labels, exp_ids = rows(start, stop)
    assert len(memory) == stop - start
    assert torch.equal(feats, exp_feats)
    assert torch.equal(labels, exp_labels)
    assert torch.equal(ids, exp_ids)
    assert feats.dtype == torch.float32 and labels.dtype == ids.dtype == torch.long


def test_fifo_order_and_wrap_around():
    memory = PixelMemory(capacity=5, dim=DIM)
    assert_contents(memory, 0, 0)
    memory.enqueue(*rows(0, 2))
    assert_contents(memory, 0, 2)
    memory.enqueue(*rows(2, 4))
    assert_contents(memory, 0, 4)
    memory.enqueue(*rows(4, 7))  # wraps: 0 and 1 dropped
    assert_contents(memory, 2, 7)
    assert int(memory.ptr) == 2 and int(memory.size) == 5
    memory.enqueue(*rows(7, 8))
    assert_contents(memory, 3, 8)
    memory.enqueue(*rows(8, 8))  # nothing
    assert_contents(memory, 3, 8)


def test_enqueue_more_than_capacity_keeps_the_newest():
    memory = PixelMemory(capacity=5, dim=DIM)
    memory.enqueue(*rows(0, 3))
    memory.enqueue(*rows(3, 11))
    assert_contents(memory, 6, 11)
    memory.enqueue(*rows(11, 16))  # exactly the capacity
    assert_contents(memory, 11, 16)
    memory.enqueue(*rows(16, 18))
    assert_contents(memory, 13, 18)


def test_enqueue_converts_and_detaches():
    memory = PixelMemory(capacity=4, dim=DIM)
    feats = torch.randn(2, DIM, dtype=torch.float64, requires_grad=True)
    memory.enqueue(feats * 2, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([7, 8]))
    got, labels, ids = memory.contents()
    assert not got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got, (feats.detach() * 2).float())
    assert labels.dtype == torch.long and labels.tolist() == [1, 2]
    assert ids.tolist() == [7, 8]


def test_capacity_zero_is_a_no_op():
    memory = PixelMemory(capacity=0, dim=DIM)
    memory.enqueue(*rows(0, 4))
    assert len(memory) == 0
    feats, labels, ids = memory.contents()
    assert feats.shape == (0, DIM) and labels.shape == ids.shape == (0,)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="capacity"):
        PixelMemory(capacity=-1, dim=DIM)
    memory = PixelMemory(capacity=4, dim=DIM)
    feats, labels, ids = rows(0, 3)
    with pytest.raises(ValueError, match="feats"):
        memory.enqueue(feats[:, :2], labels, ids)
    with pytest.raises(ValueError, match="labels"):
        memory.enqueue(feats, labels[:2], ids)
    with pytest.raises(ValueError, match="image_ids"):
        memory.enqueue(feats, labels, ids[:, None])
    assert len(memory) == 0


def test_state_dict_round_trip_continues_fifo(tmp_path):
    memory = PixelMemory(capacity=5, dim=DIM)
    memory.enqueue(*rows(0, 4))
    memory.enqueue(*rows(4, 7))  # wrapped: ptr 2
    path = tmp_path / "memory.pth"
    torch.save({"model": memory.state_dict()}, path)
    assert set(memory.state_dict()) == {"feats", "labels", "image_ids", "ptr", "size"}

    restored = PixelMemory(capacity=5, dim=DIM)
    restored.load_state_dict(torch.load(path, weights_only=True)["model"])
    assert int(restored.ptr) == int(memory.ptr) == 2
    assert int(restored.size) == int(memory.size) == 5
    assert_contents(restored, 2, 7)
    for a, b in zip(memory.contents(), restored.contents()):
        assert torch.equal(a, b)

    for start, stop in ((7, 10), (10, 11), (11, 19)):
        memory.enqueue(*rows(start, stop))
        restored.enqueue(*rows(start, stop))
        for a, b in zip(memory.state_dict().values(), restored.state_dict().values()):
            assert torch.equal(a, b)
    assert_contents(restored, 14, 19)


def test_memory_is_saved_inside_a_model(tmp_path):
    model = torch.nn.Module()
    model.memory = PixelMemory(capacity=6, dim=DIM)
    model.memory.enqueue(*rows(0, 4))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    fresh = torch.nn.Module()
    fresh.memory = PixelMemory(capacity=6, dim=DIM)
    fresh.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    assert_contents(fresh.memory, 0, 4)


@pytest.mark.parametrize("capacity,start,ptr", [(3, 4, 0), (8, 2, 5), (0, 7, 0)])
def test_load_saved_with_another_capacity_keeps_the_newest(capacity, start, ptr):
    memory = PixelMemory(capacity=5, dim=DIM)
    memory.enqueue(*rows(0, 4))
    memory.enqueue(*rows(4, 7))  # holds 2..6, wrapped
    other = PixelMemory(capacity=capacity, dim=DIM)
    other.load_state_dict(memory.state_dict())
    assert_contents(other, start, 7)
    assert int(other.ptr) == ptr and other.feats.shape == (capacity, DIM)
    other.enqueue(*rows(7, 9))
    assert_contents(other, max(start, 9 - capacity), 9)


def test_detectron2_checkpointer_with_another_capacity_starts_empty(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    model = torch.nn.Module()
    model.memory = PixelMemory(capacity=5, dim=DIM)
    model.memory.enqueue(*rows(0, 4))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    # detectron2 drops the buffers whose shape changed; ptr/size alone must not survive.
    fresh = torch.nn.Module()
    fresh.memory = PixelMemory(capacity=3, dim=DIM)
    DetectionCheckpointer(fresh).load(str(tmp_path / "model.pth"))
    assert_contents(fresh.memory, 0, 0)
    assert int(fresh.memory.ptr) == 0
    fresh.memory.enqueue(*rows(0, 4))
    assert_contents(fresh.memory, 1, 4)
    same = torch.nn.Module()
    same.memory = PixelMemory(capacity=5, dim=DIM)
    DetectionCheckpointer(same).load(str(tmp_path / "model.pth"))
    assert_contents(same.memory, 0, 4)


# ------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        memory = PixelMemory(capacity=8, dim=DIM)
        # Different rows and different counts per rank.
        first = rows(0, 3) if rank == 0 else rows(10, 12)
        memory.enqueue(*first)
        after_first = [t.clone() for t in memory.contents()]
        second = rows(20, 22) if rank == 0 else rows(30, 33)
        memory.enqueue(*second)  # 5 + 5 > 8: wraps
        torch.save(
            {"first": after_first, "second": list(memory.contents()),
             "ptr": memory.ptr.clone(), "size": memory.size.clone()},
            f"{out_dir}/rank{rank}.pth",
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_identical_queues(tmp_path):
    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pth", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pth", weights_only=True)

    def cat(*parts):
        return [torch.cat(ts) for ts in zip(*parts)]

    expected_first = cat(rows(0, 3), rows(10, 12))  # rank 0's rows, then rank 1's
    # 10 entries through a queue of 8: the 2 oldest (rank 0's first two rows) are gone.
    expected_second = [t[2:] for t in cat(rows(0, 3), rows(10, 12), rows(20, 22), rows(30, 33))]
    for r in (r0, r1):
        for got, exp in zip(r["first"], expected_first):
            assert torch.equal(got, exp)
        for got, exp in zip(r["second"], expected_second):
            assert torch.equal(got, exp)
        assert int(r["size"]) == 8 and int(r["ptr"]) == 2
