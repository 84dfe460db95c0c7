"""Pipeline stages: the layer split, and the settings it refuses with a message naming them."""

from __future__ import annotations

import pytest

from pagoda.models.pipeline_stages import check_pipeline_parallel, stage_layers


def test_layers_split_contiguously_and_evenly_with_the_remainder_first():
    assert [stage_layers(18, s, 2) for s in range(2)] == [range(0, 9), range(9, 18)]
    assert [stage_layers(30, s, 4) for s in range(4)] == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert [list(stage_layers(3, s, 3)) for s in range(3)] == [[0], [1], [2]]
    for num_layers in range(1, 40):
        for stages in range(1, num_layers + 1):
            covered = [i for s in range(stages) for i in stage_layers(num_layers, s, stages)]
            assert covered == list(range(num_layers))


def test_impossible_splits_are_named():
    with pytest.raises(ValueError, match="pipeline_parallel_size 4 exceeds the model's 3 layers"):
        stage_layers(3, 0, 4)
    with pytest.raises(ValueError, match="stage 2 is not one of 2"):
        stage_layers(8, 2, 2)
    config = {"num_hidden_layers": 18}
    with pytest.raises(ValueError, match="exceeds the model's 18 layers"):
        check_pipeline_parallel(config, 19, False, None, None)
    with pytest.raises(ValueError, match="image models"):
        check_pipeline_parallel(config, 2, True, None, None)
    with pytest.raises(ValueError, match="--kv-store"):
        check_pipeline_parallel(config, 2, False, "cpu:1GiB", None)
    with pytest.raises(ValueError, match="--ec-store"):
        check_pipeline_parallel(config, 2, False, None, "cpu:1GiB")
    check_pipeline_parallel(config, 18, False, None, None)
