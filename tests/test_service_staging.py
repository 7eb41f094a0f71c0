"""The host staging of a checkpoint (``service.staging.HostBuffers``): every tensor of a nested state
dict copied into reused host buffers, and on GPUs the copies of every device waited for."""
from __future__ import annotations

import pytest
import torch

from service.staging import HostBuffers


def test_stage_copies_every_tensor_into_reused_buffers() -> None:
    live = {"w": torch.arange(6.0), "groups": [{"v": torch.ones(3)}], "lr": 0.1, "name": "x"}
    buffers = HostBuffers()
    first = buffers.stage("opt", live)
    buffers.ready()
    assert torch.equal(first["w"], live["w"]) and first["lr"] == 0.1 and first["name"] == "x"
    assert first["w"].data_ptr() != live["w"].data_ptr()  # a copy: the loop may move on
    live["w"] += 1  # the next step changes the live tensor in place...
    assert torch.equal(first["w"], torch.arange(6.0))  # ...not the staged copy
    second = buffers.stage("opt", live)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same host buffer, refilled
    assert torch.equal(second["groups"][0]["v"], torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ready_waits_for_the_copies_of_a_device_that_is_not_the_current_one() -> None:
    """State on cuda:1 while cuda:0 is current (``--device cuda:1``, the towers layout): the
    asynchronous copies into pinned memory run on cuda:1's stream, and ready() must wait for them."""
    torch.cuda.set_device(0)
    buffers = HostBuffers()
    for value in (1.0, 2.0, 3.0):
        source = {"a": torch.full((64 << 20,), value, device="cuda:0"),
                  "b": torch.full((64 << 20,), value, device="cuda:1")}
        torch.cuda.synchronize(1)
        staged = buffers.stage("model", source)
        buffers.ready()
        assert staged["b"].is_pinned() and bool((staged["b"] == value).all()) and bool((staged["a"] == value).all())
