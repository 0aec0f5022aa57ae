"""Step buffers: one allocation per buffer, reused step after step, padded with zeros."""

import pytest
import torch

from app.engine.buffers import StepBuffers
from tests.engine.conftest import sample_work


def test_gather_concatenates_into_one_reused_buffer_and_pads_with_zeros():
    buffers = StepBuffers(torch.device("cpu"))
    first = buffers.gather("x", [torch.full((2, 3), 1.0), torch.full((1, 3), 2.0)], rows=4)
    assert first.tolist() == [[1.0] * 3, [1.0] * 3, [2.0] * 3, [0.0] * 3]
    first.fill_(7.0)  # what a step left behind: overwritten, padding zeroed again
    second = buffers.gather("x", [torch.full((3, 3), 5.0)], rows=4)
    assert second.tolist() == [[5.0] * 3] * 3 + [[0.0] * 3]
    narrower = buffers.gather("x", [torch.full((1, 3), 6.0)])
    assert narrower.shape == (1, 3) and narrower.data_ptr() == first.data_ptr() == second.data_ptr()
    assert buffers.allocations == 1


def test_gather_grows_a_buffer_only_for_a_wider_step_or_another_shape():
    buffers = StepBuffers(torch.device("cpu"))
    buffers.gather("x", [torch.ones(2, 3)])
    wider = buffers.gather("x", [torch.ones(3, 3)])  # doubles: room for 4
    assert wider.shape == (3, 3) and buffers.allocations == 2
    buffers.gather("x", [torch.ones(4, 3)])
    assert buffers.allocations == 2
    buffers.gather("x", [torch.ones(9, 3)])  # wider than double: just enough
    buffers.gather("x", [torch.ones(9, 3)])
    assert buffers.allocations == 3
    buffers.gather("x", [torch.ones(4, 2)])  # another row shape
    buffers.gather("t", [torch.ones(4, dtype=torch.long)])  # another name
    assert buffers.allocations == 5
    with pytest.raises(ValueError, match="cannot gather 4 rows into 3"):
        buffers.gather("x", [torch.ones(4, 2)], rows=3)
    with pytest.raises(TypeError, match="several dtypes"):
        buffers.gather("x", [torch.ones(1, 2), torch.ones(1, 2, dtype=torch.float64)])


def test_images_are_kept_in_the_forwards_memory_format():
    buffers = StepBuffers(torch.device("cpu"), torch.channels_last)
    x = buffers.gather("x", [torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4)], rows=4)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert buffers.gather("t", [torch.arange(3)], rows=4).tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("fast", [None, {"channels_last": True}])
def test_the_engine_allocates_its_step_buffers_once_per_job_not_per_step(engine_factory, fast):
    from app.engine.fastpath import FastPath
    from tests.tiny import tiny_checkpoint

    # channels_last converts the engine's U-Net in place: its own copy, not the shared one
    ckpt = tiny_checkpoint(timesteps=40, variance_type="fixed_large") if fast else None
    engine, rec = engine_factory(ckpt=ckpt, fast=FastPath(**fast) if fast else None)
    engine.start()
    engine.submit(sample_work("a", n=3, steps=40))
    assert rec.wait("a")[0] == "finished"
    assert engine.forwards == 40
    assert engine.buffers.allocations == 4  # x_t, t, z and the coefficients, each once for 40 steps
