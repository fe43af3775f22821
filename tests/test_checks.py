import math

import numpy as np
import pytest

from trl_qhead.checks import check_beta


@pytest.mark.parametrize("good", [1, 0.5, 1e-30, 1e30, np.float32(2.0), np.int64(3)])
def test_check_beta_returns_a_float(good):
    value = check_beta(good)
    assert type(value) is float and value == float(good)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_check_beta_refuses_out_of_range_values(bad):
    with pytest.raises(ValueError, match="`target_beta` must be a finite number > 0"):
        check_beta(bad, name="target_beta")


@pytest.mark.parametrize("bad", ["1", None, True, [1.0], object()])
def test_check_beta_refuses_non_numbers_with_a_type_error(bad):
    with pytest.raises(TypeError, match="`beta` must be a number > 0"):
        check_beta(bad)


def test_check_beta_infinity_only_where_allowed():
    assert math.isinf(check_beta(float("inf"), allow_inf=True))
    with pytest.raises(ValueError, match=r"float\('inf'\) disables the tilt"):
        check_beta(-float("inf"), allow_inf=True)
    with pytest.raises(ValueError, match="finite"):
        check_beta(float("inf"))
