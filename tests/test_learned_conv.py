"""ppreg.learned.conv: a 3D convolution as depth-batched 2D convolutions equals Equinox's own."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppreg.learned.conv import apply

CASES = [  # in, out, kernel, stride, padding, dilation, spatial
    (2, 8, 3, 1, 1, 1, (8, 6, 5)),
    (4, 6, 3, 2, 1, 1, (8, 6, 6)),
    (3, 4, 5, 1, 2, 2, (11, 9, 7)),
    (3, 4, 2, 2, 0, 1, (9, 8, 7)),
    (3, 5, 3, 3, ((1, 0), (0, 1), (2, 1)), 1, (10, 11, 9)),
]


@pytest.mark.parametrize("c_in,c_out,kernel,stride,padding,dilation,spatial", CASES)
def test_equals_the_equinox_convolution_and_its_gradient(c_in, c_out, kernel, stride, padding, dilation, spatial):
    key = jax.random.key(3)
    conv = eqx.nn.Conv(3, c_in, c_out, kernel_size=kernel, stride=stride, padding=padding, dilation=dilation,
                       key=key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (c_in, *spatial))
    np.testing.assert_allclose(apply(conv, x), conv(x), atol=2e-5)

    def objective(f):
        return lambda c, v: jnp.sum(jnp.sin(f(c, v)))

    ours = jax.grad(objective(apply), argnums=(0, 1))(conv, x)
    theirs = jax.grad(objective(lambda c, v: c(v)), argnums=(0, 1))(conv, x)
    np.testing.assert_allclose(ours[0].weight, theirs[0].weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[0].bias, theirs[0].bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours[1], theirs[1], atol=1e-5)


def test_other_convolutions_are_the_module_itself_and_bad_input_is_refused():
    key = jax.random.key(0)
    conv2d = eqx.nn.Conv(2, 2, 3, kernel_size=3, padding=1, key=key)
    x = jax.random.normal(key, (2, 8, 8))
    np.testing.assert_array_equal(apply(conv2d, x), conv2d(x))
    conv3d = eqx.nn.Conv(3, 2, 3, kernel_size=3, padding=1, key=key)
    with pytest.raises(ValueError, match="conv input must be"):
        apply(conv3d, jnp.zeros((3, 4, 4, 4)))
