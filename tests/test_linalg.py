"""weightpca.linalg against exact answers: scikit-learn's PCA, LAPACK's SVD, planted spectra, optimal errors."""

import numpy as np
import pytest
import torch

from weightpca.linalg import (
    PCABasis,
    WhitenedBasis,
    best_rank_approximation,
    exact_svd,
    factored_params,
    input_cholesky,
    lower_inverse,
    rank_for_fraction,
    rank_for_threshold,
)

from test_surgery import THRESHOLDS, decaying


@pytest.mark.parametrize("shape", [(64, 48), (48, 96), (192, 576)])
def test_matches_sklearn_pca_at_every_threshold(shape):
    from sklearn.decomposition import PCA

    w = decaying(*shape, seed=shape[0])
    basis = PCABasis.fit(w)
    for t in THRESHOLDS:
        ref = PCA(n_components=t, svd_solver="full").fit(w)
        r = rank_for_threshold(basis.s, t)
        assert r == ref.n_components_, t
        np.testing.assert_allclose(basis.reconstruct(r), ref.inverse_transform(ref.transform(w)), atol=1e-10)


def test_matches_sklearn_on_real_weights(tiny_data, tmp_path):
    from sklearn.decomposition import PCA

    from weightpca.io import load_tensors

    from conftest import tiny_run, train_to

    train_to(tiny_run(max_steps=8), tiny_data, tmp_path / "d", tmp_path / "w")
    c_attn = load_tensors(tmp_path / "d" / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    for w in (c_attn[16:32].double().numpy(), c_attn.double().numpy()):
        basis = PCABasis.fit(w)
        for t in THRESHOLDS:
            ref = PCA(n_components=t, svd_solver="full").fit(w)
            r = rank_for_threshold(basis.s, t)
            assert r == ref.n_components_
            np.testing.assert_allclose(basis.reconstruct(r), ref.inverse_transform(ref.transform(w)), atol=1e-8)


def test_threshold_edges():
    s = np.array([3.0, 2.0, 1.0])
    assert rank_for_threshold(s, 1.0) == 3
    assert rank_for_threshold(s, 9 / 14) == 2  # exactly the first component's share -> one more
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
            rank_for_threshold(s, bad)


def test_activation_aware_minimises_output_error():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 32))
    x = rng.standard_normal((2000, 32)) * np.linspace(0.05, 3.0, 32)  # anisotropic inputs
    c = x.T @ x / len(x)
    chol = input_cholesky(c, eps=0.0)
    aware = WhitenedBasis.fit(w, chol, np.linalg.inv(chol))
    plain = PCABasis.fit(w)
    for r in (4, 8, 16):
        err_aware = np.linalg.norm(x @ (w - aware.reconstruct(r)).T)
        err_plain = np.linalg.norm(x @ (w - plain.reconstruct(r)).T)
        assert err_aware < err_plain
        # optimal: equals the tail of the whitened spectrum
        assert err_aware**2 / len(x) == pytest.approx(np.sum(aware.s[r:] ** 2), rel=1e-6)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (20, 20)])
def test_thin_svd_matches_lapack(shape):
    from weightpca.linalg import thin_svd

    x = decaying(*shape, seed=7)
    us, s, vt = thin_svd(x)
    s_ref = np.linalg.svd(x, compute_uv=False)
    np.testing.assert_allclose(s, s_ref, rtol=1e-8, atol=1e-10 * s_ref[0])
    np.testing.assert_allclose(us @ vt, x, atol=1e-9)
    r = min(shape)
    np.testing.assert_allclose(vt[: r - 1] @ vt[: r - 1].T, np.eye(r - 1), atol=1e-6)


def test_cholesky_of_rank_deficient_moment():
    x = np.random.default_rng(0).standard_normal((10, 40)).astype(np.float32)  # 10 tokens, 40 dims
    c = (x.T @ x / 10).astype(np.float64)
    chol = input_cholesky(c)
    np.testing.assert_allclose(chol @ chol.T, c, atol=1e-3 * np.abs(c).max())
    inv = lower_inverse(chol)  # of this ill-conditioned factor too
    np.testing.assert_allclose(inv @ chol, np.eye(40), atol=1e-6)
    assert np.allclose(np.triu(inv, 1), 0.0)


def test_exact_svd_centred_is_pca_of_the_rows():
    w = decaying(40, 12, seed=3) + 2.0
    mean, u, s, vt = exact_svd(w, centered=True)
    np.testing.assert_allclose(mean, w.mean(axis=0))
    np.testing.assert_allclose((u * s) @ vt + mean, w, atol=1e-10)
    assert exact_svd(w)[0] is None and np.all(np.diff(s) <= 0)
    with pytest.raises(ValueError, match=r"expected a \[n, m\] matrix"):
        exact_svd(np.zeros(3))


def test_best_rank_approximation_has_the_eckart_young_error():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    s = 2.0 ** -torch.arange(20, dtype=torch.float64)  # a planted spectrum
    w = (u[:, :20] * s) @ v.T
    for r in (1, 5, 12):
        approx = best_rank_approximation(w.float(), r)
        assert approx.dtype == torch.float32 and torch.linalg.matrix_rank(approx.double(), rtol=1e-6) == r
        err = torch.linalg.norm(w - approx.double())
        assert err.item() == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-4)


def test_rank_for_fraction_and_factored_params():
    assert rank_for_fraction((64, 16), 0.25) == 4 and rank_for_fraction((16, 64), 0.01) == 1
    assert rank_for_fraction((10, 10), 1.0) == 10
    assert factored_params(24, 16, 5) == 24 * 5 + 5 * 16
    assert factored_params(24, 16, 5, mean=True) == 24 * 5 + 5 * 16 + 16
