"""`make bench` helpers that need no GPU."""
from effllm_utils import bench


def test_last_period_finds_one_decode_step_not_one_layer():
    layer = ["norm", "gemv", "rope", "sdpa", "gemv", "norm", "gemv", "silu", "gemv"]
    step = ["embedding"] + layer * 4 + ["norm", "lm_head", "max", "argmax"]
    names = ["prefill_a", "prefill_b"] + step * 3
    assert bench.last_period(names) == len(step)
    assert bench.last_period(["a", "b", "c"]) is None
