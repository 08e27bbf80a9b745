import json
import os
import time

import numpy as np
import pytest
import torch

from weightpca.sketch import (
    METHODS,
    NpySamples,
    SketchError,
    SyntheticSamples,
    TensorSamples,
    centering_matrix,
    fwht,
    hadamard_rows,
    range_test_matrix,
    run_method,
)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_matches_scipy_hadamard(n):
    hadamard = pytest.importorskip("scipy.linalg").hadamard
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    ref = x @ hadamard(n).T / np.sqrt(n)
    np.testing.assert_allclose(fwht(x), ref, atol=1e-5)
    np.testing.assert_allclose(fwht(torch.from_numpy(x)).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(hadamard_rows(np.arange(n), n), hadamard(n) / np.sqrt(n), atol=1e-7)


def test_fwht_orthonormal_and_involutive():
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    y = fwht(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(fwht(y), x, atol=1e-5)  # H is symmetric and orthogonal
    with pytest.raises(ValueError, match="power of two"):
        fwht(np.ones(12))


def test_synthetic_blocks_consistent():
    src = SyntheticSamples(5, 1000, rank=3, seed=1, gen_block=128)
    whole = src.block(0, 1000)
    np.testing.assert_array_equal(np.concatenate([src.block(0, 300), src.block(300, 1000)], axis=1), whole)
    np.testing.assert_array_equal(src.block(250, 700), whole[:, 250:700])


class CountingSamples(SyntheticSamples):
    """Synthetic samples that count how often each coordinate is read."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads = np.zeros(self.D, dtype=np.int64)

    def block(self, b0, b1, out=None):
        self.reads[b0:b1] += 1
        return super().block(b0, b1, out)


@pytest.fixture(scope="module")
def synthetic_results(tmp_path_factory):
    """The seed experiment's check: 64 samples, D = 16384, rank-8 structure plus noise, k = 8, r = 32.

    Blocks of 1024 coordinates; the range finders' pilot is one block (1/16 of D)."""
    out = tmp_path_factory.mktemp("sketch")
    src = CountingSamples(64, 16384, rank=8, noise=0.05, seed=0)
    opt = run_method("exact", src, 8, 32, out / "exact" / "W.npy", out / "exact" / "errors.json", True, 1024, 0)
    res, reads, elapsed = {}, {}, {}
    for m in ("seed_srht", "srht", "gaussian"):
        src.reads[:] = 0
        t0 = time.perf_counter()
        res[m] = run_method(
            m, src, 8, 32, out / m / "W.npy", out / m / "errors.json", True, 1024, 0, optimum=opt, pilot_blocks=1
        )
        elapsed[m] = time.perf_counter() - t0
        reads[m] = src.reads.copy()
    res["elapsed"] = elapsed
    return src, opt, res, out, reads


def test_exact_is_the_optimum(synthetic_results):
    src, opt, _, out, _ = synthetic_results
    x = src.block(0, src.D).T.astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    best = np.linalg.norm(x - u[:, :8] @ (u[:, :8].T @ x), axis=0)
    np.testing.assert_allclose(opt["l2_error"], best, rtol=1e-3)
    W = np.load(out / "exact" / "W.npy")
    np.testing.assert_allclose(W.T @ W, np.eye(8), atol=1e-4)


def test_seed_srht_lift_stays_in_row_space_of_r(synthetic_results):
    _, opt, res, _, _ = synthetic_results
    # the seed design's lift is data-independent: almost nothing is reconstructed
    assert res["seed_srht"]["median_relative_error"] > 0.99
    assert opt["median_relative_error"] < 0.05


def test_range_finders_within_five_percent_of_exact(synthetic_results):
    src, opt, res, out, reads = synthetic_results
    for m in ("srht", "gaussian"):
        assert 0.999 < res[m]["mean_error_ratio_to_optimum"] < 1.05, m
        assert res[m]["median_relative_error"] < 1.05 * opt["median_relative_error"], m
        W = np.load(out / m / "W.npy")
        np.testing.assert_allclose(W.T @ W, np.eye(8), atol=1e-4)
        # one pass to fit (the pilot block is kept, not read twice), one to evaluate
        assert reads[m].min() == reads[m].max() == 2, m


@pytest.mark.parametrize("kind", ["srht", "gaussian"])
def test_range_finder_without_pilot_is_rayleigh_ritz_in_its_range(tmp_path, kind):
    """With pilot_blocks=0 the estimate is the best rank-k approximation inside span(A Ω), computed
    here with a dense QR and SVD; the data-oblivious Ω alone stays well above 1.05x exact PCA."""
    src = SyntheticSamples(64, 16384, rank=8, noise=0.05, seed=0)
    opt = run_method(
        "exact", src, 8, 32, tmp_path / "exact" / "W.npy", tmp_path / "exact" / "errors.json", True, 1024, 0
    )
    rep = run_method(
        kind,
        src,
        8,
        32,
        tmp_path / kind / "W.npy",
        tmp_path / kind / "errors.json",
        True,
        1024,
        0,
        optimum=opt,
        pilot_blocks=0,
    )
    a = src.block(0, src.D).T.astype(np.float64) @ centering_matrix(src.n, True)
    q, _ = np.linalg.qr(a @ range_test_matrix(kind, src.n, 32, 0))
    u, _, _ = np.linalg.svd(q.T @ a, full_matrices=False)
    w = q @ u[:, :8]
    floor = np.linalg.norm(a - w @ (w.T @ a), axis=0)
    np.testing.assert_allclose(rep["l2_error"], floor, rtol=2e-3)
    assert floor.mean() / np.mean(opt["l2_error"]) > 1.05


@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("kind", ["srht", "gaussian"])
def test_range_finder_with_r_above_the_rank_is_exact(tmp_path, kind, centered):
    """6 samples, r = 8: the range sketch holds every direction (after centring, 5), so the estimate is
    exact PCA; surplus test-matrix columns must not inject rounding noise into W."""
    src = SyntheticSamples(6, 5000, rank=3, seed=4)
    opt = run_method(
        "exact", src, 2, 8, tmp_path / "exact" / "W.npy", tmp_path / "exact" / "errors.json", centered, 1024, 0
    )
    for pilot in (0, 2):
        rep = run_method(
            kind,
            src,
            2,
            8,
            tmp_path / kind / "W.npy",
            tmp_path / kind / "errors.json",
            centered,
            1024,
            0,
            optimum=opt,
            pilot_blocks=pilot,
        )
        np.testing.assert_allclose(rep["l2_error"], opt["l2_error"], rtol=1e-4)
        W = np.load(tmp_path / kind / "W.npy")
        np.testing.assert_allclose(W.T @ W, np.eye(2), atol=1e-5)


def test_errors_exact_for_samples_close_to_their_mean(tmp_path):
    """Early snapshots: a large common model plus deviations 1000x smaller. Errors are then small
    differences of large sums; the reported ones must equal float64 recomputations from W.npy, and exact
    PCA must be the float64 optimum (float32 Gram sums had reported errors up to 30 % off)."""
    rng = np.random.default_rng(5)
    n, D = 8, 30000
    common = rng.standard_normal(D)
    deviations = (rng.standard_normal((n, 4)) * [1.0, 0.5, 0.2, 0.05]) @ rng.standard_normal((4, D))
    a64 = common[None, :] + 1e-3 * (deviations + 0.01 * rng.standard_normal((n, D)))
    src = TensorSamples(torch.from_numpy(a64.astype(np.float32)))
    ac = src.data.numpy().T.astype(np.float64) @ centering_matrix(n, True)
    u, _, _ = np.linalg.svd(ac, full_matrices=False)
    best = np.linalg.norm(ac - u[:, :2] @ (u[:, :2].T @ ac), axis=0)
    opt = run_method(
        "exact", src, 2, 8, tmp_path / "exact" / "W.npy", tmp_path / "exact" / "errors.json", True, 4096, 0
    )
    np.testing.assert_allclose(opt["l2_error"], best, rtol=1e-4)
    for m in ("exact", "srht", "gaussian"):
        rep = (
            opt
            if m == "exact"
            else run_method(
                m, src, 2, 8, tmp_path / m / "W.npy", tmp_path / m / "errors.json", True, 4096, 0, optimum=opt
            )
        )
        w = np.load(tmp_path / m / "W.npy").astype(np.float64)
        np.testing.assert_allclose(rep["l2_error"], np.linalg.norm(ac - w @ (w.T @ ac), axis=0), rtol=1e-5, err_msg=m)
    assert rep["mean_error_ratio_to_optimum"] < 1.01


def test_pilot_blocks_spread_over_the_model():
    from weightpca.sketch import pilot_starts

    starts = pilot_starts(100 * 64, 64, 4, seed=0)
    assert len(starts) == 4 and all(s % 64 == 0 for s in starts)
    assert np.all(np.diff(starts) == 25 * 64)  # one block in every quarter, same phase
    assert pilot_starts(3 * 64 + 5, 64, 10, seed=0) == [0, 64, 128, 192]  # more asked than there are


def test_srht_test_matrix_has_orthogonal_columns():
    om = range_test_matrix("srht", 64, 32, 3)  # n a power of two: columns of a scaled Hadamard matrix
    np.testing.assert_allclose(om.T @ om, (64 / 32) * np.eye(32), atol=1e-9)
    assert set(np.unique(np.abs(om)).round(6)) == {round(np.sqrt(2 / 64), 6)}
    assert range_test_matrix("srht", 30, 24, 0).shape == (30, 24)


def test_tensor_samples_and_device_store_match_files(tmp_path):
    """Samples given as a tensor with W kept in (device) memory give the same W as files on disk."""
    src = SyntheticSamples(12, 5000, rank=3, seed=2)
    data = torch.from_numpy(src.block(0, src.D))
    a = run_method(
        "srht",
        src,
        3,
        12,
        tmp_path / "disk" / "W.npy",
        tmp_path / "disk" / "errors.json",
        True,
        1024,
        0,
        pilot_blocks=1,
    )
    b = run_method(
        "srht",
        TensorSamples(data),
        3,
        12,
        tmp_path / "mem" / "W.npy",
        tmp_path / "mem" / "errors.json",
        True,
        1024,
        0,
        pilot_blocks=1,
        store="device",
    )
    np.testing.assert_allclose(np.load(tmp_path / "mem" / "W.npy"), np.load(tmp_path / "disk" / "W.npy"), atol=1e-5)
    np.testing.assert_allclose(a["l2_error"], b["l2_error"], rtol=1e-5)
    data[4, 77] = float("inf")
    with pytest.raises(SketchError, match="sample_004: non-finite"):
        run_method(
            "gaussian",
            TensorSamples(data),
            3,
            12,
            tmp_path / "bad" / "W.npy",
            tmp_path / "bad" / "errors.json",
            True,
            1024,
            0,
        )
    assert not (tmp_path / "bad" / "errors.json").exists()


def test_errors_json_contents(synthetic_results):
    _, _, res, out, _ = synthetic_results
    rep = json.loads((out / "srht" / "errors.json").read_text())
    assert len(rep["l2_error"]) == len(rep["relative_error"]) == len(rep["ratio_to_optimum"]) == 64
    rel = np.asarray(rep["relative_error"])
    assert rep["mean_relative_error"] == pytest.approx(rel.mean())
    assert rep["median_relative_error"] == pytest.approx(np.median(rel))
    assert rep["bytes_streamed"] == 64 * 16384 * 4  # one pass over the data to fit
    # the fit's time is part of the call's, and the throughput is the bytes over that time
    assert 0 < rep["wall_s"] < res["elapsed"]["srht"]
    assert rep["throughput_bytes_per_s"] == pytest.approx(rep["bytes_streamed"] / rep["wall_s"])
    assert rep["r_requested"] == 32 and rep["r"] == 32 and rep["k"] == 8


def test_npy_samples_and_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = tmp_path / f"s{i}.npy"
        np.save(p, rng.standard_normal(500).astype(np.float32))
        paths.append(p)
    o = tmp_path / "o"
    with NpySamples(paths) as src:
        assert (src.n, src.D) == (6, 500)
        np.testing.assert_array_equal(src.block(10, 20)[3], np.load(paths[3])[10:20])
        with pytest.raises(SketchError, match="r=2 must be at least k=3"):
            run_method("srht", src, 3, 2, o / "W.npy", o / "errors.json", True, 128, 0)
        with pytest.raises(SketchError, match="pilot_blocks=-1 must be 0"):
            run_method("srht", src, 2, 8, o / "W.npy", o / "errors.json", True, 128, 0, pilot_blocks=-1)
        with pytest.raises(SketchError, match="k=6 must be smaller than the number of samples"):
            run_method("exact", src, 6, 24, o / "W.npy", o / "errors.json", True, 128, 0)
        rep = run_method("srht", src, 2, 40, o / "W.npy", o / "errors.json", True, 128, 0, pilot_blocks=1)
        assert rep["r_requested"] == 40 and rep["r"] <= 5  # 6 centred samples span 5 dimensions
        fds = list(src.fds)
    for fd in fds:  # closed on leaving the with block
        with pytest.raises(OSError):
            os.fstat(fd)
    (o / "errors.json").unlink()
    assert not (tmp_path / "o" / "errors.json").exists()
    np.save(tmp_path / "short.npy", np.zeros(400, np.float32))
    with pytest.raises(SketchError, match="short.npy: shape"):
        NpySamples(paths + [tmp_path / "short.npy"])
    np.save(tmp_path / "f64.npy", np.zeros(500, np.float64))
    with pytest.raises(SketchError, match="f64.npy: shape .* dtype float64"):
        NpySamples(paths + [tmp_path / "f64.npy"])
    bad = rng.standard_normal(500).astype(np.float32)
    bad[321] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(SketchError, match="nan.npy: non-finite"):
        with NpySamples(paths + [tmp_path / "nan.npy"]) as src:
            run_method("exact", src, 2, 8, tmp_path / "o2" / "W.npy", tmp_path / "o2" / "errors.json", True, 128, 0)
    assert not (tmp_path / "o2" / "errors.json").exists()
    assert not list((tmp_path / "o2").glob("*.npy"))


def test_safetensors_samples_flatten_in_name_order(tmp_path):
    from safetensors.torch import save_file

    from weightpca.sketch import SafetensorsSamples, flat_layout, flatten_state

    g = torch.Generator().manual_seed(0)
    states = [
        {
            "b.weight": torch.randn(3, 4, generator=g),
            "a.bias": torch.randn(5, generator=g),
            "c": torch.randn(2, 2, 2, generator=g),
        }
        for _ in range(3)
    ]
    for i, st in enumerate(states):
        save_file(st, str(tmp_path / f"step_{i:08d}.safetensors"))
    with SafetensorsSamples(sorted(tmp_path.glob("*.safetensors"))) as src:
        assert (src.n, src.D) == (3, 25)
        full = np.stack([flatten_state(st) for st in states])
        np.testing.assert_array_equal(src.block(0, 25), full)
        np.testing.assert_array_equal(src.block(3, 11), full[:, 3:11])  # spans a.bias and b.weight
    assert src.maps == []
    assert [e["name"] for e in flat_layout(states[0])] == ["a.bias", "b.weight", "c"]
    save_file({"a.bias": torch.randn(5)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SketchError, match="tensors or sizes differ.*other.safetensors|other.safetensors: tensors"):
        SafetensorsSamples(sorted(tmp_path.glob("*.safetensors")))
    (tmp_path / "other.safetensors").write_bytes((tmp_path / "step_00000000.safetensors").read_bytes()[:60])
    with pytest.raises(SketchError, match="other.safetensors: truncated"):
        SafetensorsSamples(sorted(tmp_path.glob("*.safetensors")))


def test_pickled_npy_sample_refused(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(SketchError, match="evil.npy: refused, an object"):
        NpySamples([tmp_path / "evil.npy"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_methods_on_cuda_match_cpu(tmp_path):
    """Every method on CUDA (samples read from files, and samples held on the GPU with W kept
    there) reconstructs like the CPU run; the FWHT on CUDA equals numpy's."""
    x = np.random.default_rng(0).standard_normal((4, 4096)).astype(np.float32)
    np.testing.assert_allclose(fwht(torch.from_numpy(x).cuda()).cpu().numpy(), fwht(x), atol=1e-4)
    synth = SyntheticSamples(16, 40000, rank=4, seed=3)
    paths = []
    for i in range(synth.n):
        np.save(tmp_path / f"s{i:02d}.npy", synth.block(0, synth.D)[i])
        paths.append(tmp_path / f"s{i:02d}.npy")
    on_gpu = TensorSamples(torch.from_numpy(synth.block(0, synth.D)).cuda())

    def fit(src, where, m, **kw):
        return run_method(
            m,
            src,
            4,
            16,
            tmp_path / where / m / "W.npy",
            tmp_path / where / m / "errors.json",
            True,
            4096,
            0,
            pilot_blocks=1,
            **kw,
        )

    with NpySamples(paths) as files:
        for m in METHODS:
            cpu = fit(files, "cpu", m)
            gpu = fit(files, "cuda", m, device="cuda")
            mem = fit(on_gpu, "mem", m, device="cuda", store="device")
            assert gpu["device"] == "cuda"
            for rep in (gpu, mem):
                np.testing.assert_allclose(rep["l2_error"], cpu["l2_error"], rtol=1e-3, err_msg=m)
            w_cpu, w_gpu = np.load(tmp_path / "cpu" / m / "W.npy"), np.load(tmp_path / "mem" / m / "W.npy")
            # the same subspace: all principal cosines between the two bases are 1
            np.testing.assert_allclose(np.linalg.svd(w_cpu.T @ w_gpu, compute_uv=False), 1.0, atol=1e-3, err_msg=m)
