"""The run stops at a non-finite loss or gradient norm (DeepSpeed's -1 sentinel included):
the shipped DeepSpeed configs leave bf16's per-gradient overflow check off for speed, and this
guard is what stops a poisoned step."""
import glob
import json
import math

import pytest

from nsa_dist.training.loop import check_finite


def test_finite_values_pass():
    check_finite(2.5, 1.0, 3)
    check_finite(2.5, None, 3)  # a layout that reports no norm
    check_finite(2.5, 0.0, 3)


@pytest.mark.parametrize("loss,norm,what", [(math.nan, 1.0, "loss is nan"), (math.inf, 1.0, "loss is inf"),
                                            (2.0, -1.0, "gradient norm is not finite"),
                                            (2.0, math.nan, "gradient norm is nan"),
                                            (2.0, math.inf, "gradient norm is inf")])
def test_non_finite_values_stop_the_run(loss, norm, what):
    with pytest.raises(FloatingPointError, match=what) as err:
        check_finite(loss, norm, 7)
    assert "step 7" in str(err.value)


def test_shipped_configs_skip_the_per_gradient_check():
    paths = sorted(glob.glob("configs/deepspeed/*.json"))
    assert paths
    for path in paths:
        with open(path) as fh:
            assert json.load(fh)["bf16"]["check_grad_overflow"] is False, path
