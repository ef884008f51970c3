"""The scribble-seeded random walk: toy images with a known answer, and its invariants."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla

from cdsp_core.refine import affinity_graph, random_walk


def two_regions(h: int = 12, w: int = 16, split: int = 7) -> np.ndarray:
    """A flat dark region left of column `split` and a flat bright one right of it, (H, W, 3)."""
    image = np.zeros((h, w, 3))
    image[:, split:] = 200.0
    return image


@pytest.mark.parametrize("connectivity", [4, 8])
def test_one_seed_in_each_flat_region_gives_the_exact_partition(connectivity):
    image = two_regions()
    seeds = np.full(image.shape[:2], -1)
    seeds[2, 1] = 0  # one seed in the dark region
    seeds[9, 14] = 1  # one in the bright one
    # A uniform prior: only the edges decide.
    probs = random_walk(image, seeds, np.full((2, 12, 16), 0.5), beta=4.0, prior_weight=1e-3, connectivity=connectivity)
    expected = np.zeros((12, 16), int)
    expected[:, 7:] = 1
    np.testing.assert_array_equal(probs.argmax(0), expected)
    assert probs[0, :, :7].min() > 0.9 and probs[1, :, 7:].min() > 0.9  # confidently, not by a hair


def test_without_a_prior_flat_regions_take_their_seed():
    image = two_regions()
    seeds = np.full(image.shape[:2], -1)
    seeds[0, 0], seeds[-1, -1] = 1, 0
    probs = random_walk(image, seeds, None, beta=4.0)
    assert (probs.argmax(0)[:, :7] == 1).all() and (probs.argmax(0)[:, 7:] == 0).all()


def test_the_prior_decides_where_no_seed_reaches():
    """Three flat regions, seeds in two: the unseeded one follows the prior."""
    image = np.zeros((10, 15, 3))
    image[:, 5:10] = 100.0
    image[:, 10:] = 200.0
    seeds = np.full((10, 15), -1)
    seeds[5, 1], seeds[5, 7] = 0, 1
    prior = np.zeros((2, 10, 15))
    prior[1, :, 10:] = 0.8  # the right region looks like label 1 to the class maps
    prior[0] = 1 - prior[1]
    label = random_walk(image, seeds, prior, beta=4.0, prior_weight=0.05).argmax(0)
    assert (label[:, :5] == 0).all() and (label[:, 5:10] == 1).all() and (label[:, 10:] == 1).all()


def test_seeds_are_kept_and_probabilities_sum_to_one():
    rng = np.random.default_rng(0)
    image = rng.random((9, 11, 3))
    seeds = np.full((9, 11), -1)
    seeds[0, :4], seeds[8, 6:], seeds[4, 5] = 0, 2, 1
    prior = rng.random((3, 9, 11))
    prior /= prior.sum(0)
    probs = random_walk(image, seeds, prior, beta=2.0, prior_weight=0.1)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-9)
    seeded = seeds >= 0
    np.testing.assert_array_equal(probs.argmax(0)[seeded], seeds[seeded])
    np.testing.assert_allclose(probs.max(0)[seeded], 1.0)
    assert probs.min() >= -1e-12


def test_solution_is_the_minimum_of_the_energy():
    """Parity with an independent formulation: the minimiser of sum w (x_i - x_j)^2 + g sum (x_i - p_i)^2
    with the seeds fixed, found by a generic solver on the gradient, equals the closed form."""
    rng = np.random.default_rng(1)
    image = rng.random((5, 6, 3))
    seeds = np.full((5, 6), -1)
    seeds[0, 0], seeds[4, 5] = 0, 1
    prior = rng.random((2, 5, 6))
    prior /= prior.sum(0)
    g = 0.3
    probs = random_walk(image, seeds, prior, beta=1.0, prior_weight=g, connectivity=4)
    w = affinity_graph(image, 1.0, 4).toarray()
    lap = np.diag(w.sum(1)) - w
    free = (seeds.ravel() < 0).nonzero()[0]
    fixed = (seeds.ravel() >= 0).nonzero()[0]
    x_fixed = np.eye(2)[seeds.ravel()[fixed]]  # (S, 2)
    for k in range(2):
        # Gradient of the energy in the free variables: 2 L_UU x + 2 L_US x_S + 2 g (x - p) = 0.
        system = lap[np.ix_(free, free)] + g * np.eye(len(free))
        rhs = g * prior[k].ravel()[free] - lap[np.ix_(free, fixed)] @ x_fixed[:, k]
        x, info = spla.cg(system, rhs, rtol=1e-12, atol=0, maxiter=10_000)
        assert info == 0
        np.testing.assert_allclose(probs[k].ravel()[free], x, atol=1e-8)


def test_the_walk_is_deterministic():
    rng = np.random.default_rng(2)
    image = rng.random((16, 16, 3))
    seeds = np.full((16, 16), -1)
    seeds[3, 3], seeds[12, 12] = 0, 1
    prior = np.full((2, 16, 16), 0.5)
    a = random_walk(image, seeds, prior)
    b = random_walk(image.copy(), seeds.copy(), prior.copy())
    np.testing.assert_array_equal(a, b)


def test_bad_inputs_are_named():
    image = np.zeros((4, 4, 3))
    seeds = np.full((4, 4), -1)
    with pytest.raises(ValueError, match="connectivity"):
        random_walk(image, seeds, np.full((2, 4, 4), 0.5), connectivity=6)
    with pytest.raises(ValueError, match="prior is"):
        random_walk(image, seeds, np.full((2, 3, 4), 0.5))
    seeds[0, 0] = 2
    with pytest.raises(ValueError, match="label index below 2"):
        random_walk(image, seeds, np.full((2, 4, 4), 0.5))
