"""CPU-side checks of the CUDA scan backend: errors without CuPy/GPU, lazy import, launch geometry, op registration."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys

import pytest
import torch

from mamba2d.ops import DIRECTIONS, cuda_build, cuda_scan, selective_scan_2d
from mamba2d.ops.contract import ScanShape, direction_transform
from mamba2d.ops.cuda_build import DEFAULT_TUNING, ScanTuning
from mamba2d.ops.cuda_launch import ScanParams, make_params

T = DEFAULT_TUNING


@functools.lru_cache(maxsize=None)
def _compiled_names(source: str, arch: int) -> frozenset[str]:
    return frozenset(cuda_build.source_kernel_names(source, arch))


def _inputs(device="cpu", dtype=torch.float32):
    u = torch.randn(1, 4, 3, 5, device=device, dtype=dtype)
    B = torch.randn(1, 2, 2, 3, 5, device=device, dtype=dtype)
    return dict(u=u, delta=u.clone(), A=-torch.rand(4, 2, device=device), B=B, C=B.clone())


@pytest.mark.skipif(cuda_scan.cupy_importable(), reason="CuPy is installed here")
def test_cuda_backend_without_cupy_names_the_extra():
    with pytest.raises(RuntimeError, match=r"mamba2d\[cuda12\].*mamba2d\[cuda13\]"):
        selective_scan_2d(**_inputs(), backend="cuda")


@pytest.mark.skipif(not cuda_scan.cupy_importable(), reason="needs CuPy")
def test_cuda_backend_with_cpu_tensors():
    with pytest.raises(ValueError, match="expected a CUDA tensor"):
        selective_scan_2d(**_inputs(), backend="cuda")


def test_auto_backend_on_cpu_uses_reference():
    inputs = _inputs()
    from mamba2d.ops import selective_scan_2d_ref

    assert torch.equal(selective_scan_2d(**inputs), selective_scan_2d_ref(**inputs))


def test_import_does_not_import_cupy():
    code = "import sys; import mamba2d.ops; import mamba2d.ops.library; assert 'cupy' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_custom_ops_registered():
    assert hasattr(torch.ops.mamba2d, "scan2d_fwd") and hasattr(torch.ops.mamba2d, "scan2d_bwd")


def test_direction_codes_match_contract():
    for name in DIRECTIONS:
        code = cuda_build.direction_code(name)
        flip_rows, flip_cols, transpose = direction_transform(name)
        assert code == int(flip_rows) | (int(flip_cols) << 1) | (int(transpose) << 2)
    assert len({cuda_build.direction_code(n) for n in DIRECTIONS}) == 8


@pytest.mark.parametrize("H", [1, 2, 5, 56, 200, 2048, 4096])
@pytest.mark.parametrize("W", [1, 2, 3, 7, 14, 16, 17, 33, 56, 70, 128, 300, 600, 2048, 4_000_000])
@pytest.mark.parametrize("N,dim,G", [(1, 384, 4), (16, 256, 1), (64, 8, 2), (4, 2, 2)])
def test_launch_config_invariants(H, W, N, dim, G):
    """The per-band work split covers the map, stays within the kernels' bounds, and every launch plan (forward and
    backward, every dtype, with and without the gate, on sm_80 and sm_90) names a kernel that the build of its
    source instantiates (what the nvcc CI check compiles)."""
    cfg = cuda_build.launch_config(2, dim, H, W, G, N)
    dg = dim // G
    assert cfg.threads % 32 == 0 and 32 <= cfg.threads <= cuda_build.MAX_THREADS
    assert cfg.S & (cfg.S - 1) == 0 and 1 <= cfg.S <= 32
    assert cfg.WPM == 1 or cfg.S == 32
    assert cfg.tile_width * cfg.ntiles >= W > cfg.tile_width * (cfg.ntiles - 1)
    assert cfg.nbands * cfg.R >= H > (cfg.nbands - 1) * cfg.R
    assert cfg.K in (1, 2, 4) and cfg.R * cfg.K == cuda_build.ROWS_PER_BAND
    assert (cfg.R, cfg.K) in cuda_build.band_shapes()
    assert cfg.fwd_min_blocks in cuda_build.fwd_min_blocks_options()
    assert cfg.layout in cuda_build.layout_options(cfg.K)
    shape = ScanShape(2, dim, H, W, G, N)
    for arch in (80, 90):
        for dtype in cuda_build.DTYPE_TAGS:
            for backward, has_z, out_fp32 in itertools.product((False, True), repeat=3):
                plan = cuda_build.launch_plan(shape, dtype, backward=backward, has_z=has_z, out_fp32=out_fp32,
                                              arch=arch)
                compiled = _compiled_names(plan.source, arch)
                assert plan.kernel == plan.kernels[int(backward)] and set(plan.kernels) <= compiled, plan
    wide = cfg.WPM > 1 or cfg.ntiles > 1  # only wide rows combine across warps and tiles (compiled out elsewhere)
    assert (cfg.layout == cuda_build.LAYOUTS["wide"]) == wide
    assert (cfg.layout == cuda_build.LAYOUTS["narrow"]) == (cfg.S < 32)
    assert (cfg.fwd_min_blocks == cuda_build.FWD_MIN_BLOCKS_LARGE_STATE) == (
        cfg.states_per_part >= cuda_build.LARGE_STATE)
    # the states split into non-empty parts, only where the backward rebuilds the checkpoints anyway
    assert cfg.parts * cfg.states_per_part >= N > (cfg.parts - 1) * cfg.states_per_part
    assert cfg.parts == 1 or (N > cfg.R and cfg.blocks < T.split_target_blocks)
    band = cuda_build.launch_plan(shape, torch.float32, backward=False, has_z=False, out_fp32=False)
    assert band.wave or (band.band == cfg and band.split == (cfg.parts > 1))
    assert not (band.split and band.keeps_checkpoint)
    if 32 < W <= 32 * T.max_cols_per_thread:  # one warp per row: no cross-warp combine
        assert cfg.K > 1 and cfg.WPM == 1 and cfg.ntiles == 1
    if W > 32 * T.max_cols_per_thread:  # wide maps: K columns per thread, one row per band when H < R * K
        assert cfg.K == (T.wide_cols_per_thread if H >= cuda_build.ROWS_PER_BAND else cfg.R * cfg.K)
    assert cfg.CH * cfg.cpg >= dg and cfg.blocks == 2 * G * cfg.cpg
    assert cfg.threads == cfg.CH * cfg.S * cfg.WPM
    assert cfg.smem_bwd <= 160 * 1024 and cfg.smem_fwd <= 160 * 1024
    bwd = cuda_build.launch_config(2, dim, H, W, G, N, backward=True)
    if bwd.layout == cuda_build.LAYOUTS["narrow"]:  # within the narrow backward's __launch_bounds__
        assert bwd.threads <= cuda_build.NARROW_BWD_MAX_THREADS


@pytest.mark.parametrize("tile_warps", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("batch,H,W,N,dim,G", [(128, 1, 3136, 1, 192, 2), (128, 1, 49, 1, 1536, 2),
                                               (16, 1, 1000, 8, 64, 2), (1, 1, 4_000_000, 1, 4, 1),
                                               (1, 1, 40_000, 16, 512, 1), (128, 56, 56, 1, 384, 4),
                                               (1, 1024, 1024, 1, 512, 4), (128, 3, 1000, 8, 8, 2)])
def test_tile_warps_split_one_band_rows(tile_warps, batch, H, W, N, dim, G):
    """In a launch of many maps, the row of a one-band map wider than a warp's columns spreads over at most
    `tile_warps` warps per tile, its tiles still cover it and the backward walks the forward's tiles; rows one warp
    covers, maps of several bands and launches of few maps (a batch-1 bag's long row) keep block-wide tiles."""
    tuning = ScanTuning(tile_warps=tile_warps)
    fwd = cuda_build.launch_config(batch, dim, H, W, G, N, tuning=tuning)
    bwd = cuda_build.launch_config(batch, dim, H, W, G, N, backward=True, tuning=tuning)
    widest = ScanTuning(tile_warps=64)
    wide_fwd = cuda_build.launch_config(batch, dim, H, W, G, N, tuning=widest)
    for cfg in (fwd, bwd):
        assert cfg.threads <= cuda_build.MAX_THREADS and cfg.CH * cfg.cpg >= dim // G
        assert cfg.tile_width * cfg.ntiles >= W > cfg.tile_width * (cfg.ntiles - 1)
    assert (bwd.WPM, bwd.ntiles, bwd.K, bwd.R, bwd.parts) == (fwd.WPM, fwd.ntiles, fwd.K, fwd.R, fwd.parts)
    many_maps = batch * dim // max(1, wide_fwd.WPM // tile_warps) >= T.split_target_blocks
    if fwd.nbands > 1 or wide_fwd.WPM <= tile_warps or not many_maps:
        assert fwd == wide_fwd
    else:  # fewer warps per map: more channels per block, fewer partial sums of dB and dC
        assert fwd.WPM <= tile_warps and fwd.ntiles > wide_fwd.ntiles
        assert bwd.cpg < cuda_build.launch_config(batch, dim, H, W, G, N, backward=True, tuning=widest).cpg


def test_one_band_maps_take_one_warp_tiles():
    """By default the 1D twin's (1, L) maps walk one-warp tiles with several channels a block (its first stage at
    batch 128: 8 channels a backward block instead of 1); a 2D map and a batch-1 bag's long 1D row take block-wide
    tiles."""
    one_band = cuda_build.launch_config(128, 192, 1, 3136, 2, 1, backward=True)
    assert (one_band.WPM, one_band.ntiles, one_band.CH) == (1, 25, 8)
    tall = cuda_build.launch_config(1, 512, 1024, 1024, 4, 1)
    assert (tall.WPM, tall.ntiles) == (8, 1)
    bag = cuda_build.launch_config(1, 512, 1, 40_000, 1, 16)
    assert (bag.WPM, bag.ntiles) == (8, 40)


def test_tile_warps_below_one_is_an_error():
    with pytest.raises(ValueError, match="tile_warps must be at least 1, got 0"):
        ScanTuning(tile_warps=0)


@pytest.mark.parametrize("bwd_threads", [64, 128, 256])
@pytest.mark.parametrize("H,W,N,dim,G", [(56, 56, 1, 384, 4), (14, 14, 1, 1536, 4), (200, 300, 16, 256, 1),
                                         (5, 2048, 4, 8, 2), (1, 4_000_000, 1, 4, 1), (7, 3, 64, 6, 3)])
def test_backward_geometry_shares_the_forward_tiles(bwd_threads, H, W, N, dim, G):
    """Forward and backward blocks take their own channel slots (fwd_max_threads, bwd_max_threads): the bands and
    tiles, and so the checkpoints the forward writes, stay the forward's."""
    tuning = ScanTuning(bwd_max_threads=bwd_threads)
    fwd = cuda_build.launch_config(2, dim, H, W, G, N, tuning=tuning)
    bwd = cuda_build.launch_config(2, dim, H, W, G, N, backward=True, tuning=tuning)
    assert (bwd.S, bwd.WPM, bwd.R, bwd.K, bwd.ntiles, bwd.nbands, bwd.parts, bwd.states_per_part) == (
        fwd.S, fwd.WPM, fwd.R, fwd.K, fwd.ntiles, fwd.nbands, fwd.parts, fwd.states_per_part)
    assert bwd.threads <= max(bwd_threads, bwd.S * bwd.WPM, 32 // bwd.S * bwd.S)
    assert fwd.threads <= max(T.fwd_max_threads, fwd.S * fwd.WPM, 32)
    assert bwd.CH * bwd.cpg >= dim // G and bwd.blocks == 2 * G * bwd.cpg
    if bwd.S < 32:  # narrow maps: a shorter chain of slots in the backward's dB/dC channel sum
        assert bwd.threads <= max(cuda_build.NARROW_BWD_MAX_THREADS, 32)


def test_state_split_fills_the_gpu_only_when_blocks_are_few():
    """Shape c of the benchmark (1 x 256 channels, 16 states, one block per channel) splits its states; the
    backbone shapes (thousands of blocks, N = 1) never do."""
    few = cuda_build.launch_config(1, 256, 200, 300, 1, 16)
    assert few.parts > 1 and few.blocks * few.parts >= T.split_target_blocks
    assert few.blocks * (few.parts - 1) < T.split_target_blocks or few.states_per_part == 1
    assert cuda_build.launch_config(128, 384, 56, 56, 4, 1).parts == 1
    assert cuda_build.launch_config(16, 384, 128, 128, 4, 1).parts == 1
    assert cuda_build.launch_config(1, 4, 9, 7, 1, 4).parts == 1  # N <= R: checkpoints kept, no split
    for blocks in (1, 3, 100, 1023):
        for n in (2, 5, 16, 64):
            parts = cuda_build.state_parts(blocks, n, 1, T.split_target_blocks)
            per_part = -(-n // parts)
            assert 1 < parts <= n and -(-n // per_part) == parts


def test_wavefront_only_for_few_large_maps_with_many_states():
    """The wavefront kernels take few large maps with many states (a 2DMambaMIL slide grid, where the per-band launch
    would split its states), not the backbone shapes (N = 1), many small maps, many maps, short maps, or N whose
    staged tiles exceed the shared memory cap (the forward's and the backward's, with the z gate, fit wherever the
    kernels are used)."""
    assert cuda_build.uses_wave(1, 256, 200, 300, 1, 16)
    assert cuda_build.uses_wave(1, 256, 100, 150, 1, 16) and cuda_build.uses_wave(1, 256, 200, 300, 1, 8)
    assert not cuda_build.uses_wave(128, 384, 56, 56, 4, 1) and not cuda_build.uses_wave(1, 256, 200, 300, 1, 4)
    assert not cuda_build.uses_wave(64, 128, 14, 14, 1, 16)  # thousands of blocks: no split
    assert cuda_build.uses_wave(4, 128, 64, 64, 1, 16) and not cuda_build.uses_wave(32, 96, 56, 56, 1, 16)  # maps
    assert not cuda_build.uses_wave(1, 256, 4, 300, 1, 16)  # fewer rows than WAVE_MIN_ROWS
    assert not cuda_build.uses_wave(1, 256, 200, 300, 1, 64)
    for n in range(1, cuda_build.MAX_D_STATE + 1):
        cfg = cuda_build.wave_config(n)
        assert cfg.states_per_lane in cuda_build.WAVE_LANE_STATES or cfg.smem(n) > cuda_build.WAVE_MAX_SMEM
        assert cfg.warps * cfg.states_per_lane >= n and cfg.threads <= cuda_build.MAX_THREADS
        if cfg.smem(n) <= cuda_build.WAVE_MAX_SMEM:
            assert (cfg.warps - 1) * cfg.states_per_lane < n  # no idle warp
        fits = max(cfg.smem(n), cfg.smem_bwd(n, True)) <= cuda_build.WAVE_MAX_SMEM
        assert cuda_build.uses_wave(1, 256, 200, 300, 1, n) == (fits and n >= T.wave_min_states)
    assert cuda_build.wave_config(16).smem_bwd(16, False) < cuda_build.wave_config(16).smem_bwd(16, True)


def test_wavefront_checkpoint_is_the_band_tops():
    """What the wavefront forward keeps for its backward: the last row of every band but the bottom one, N floats
    per column (at most N / 32 per pixel: less than u in float32 for any N the kernels take); nothing for one band."""
    def sizes(*shape):
        plan = cuda_build.launch_plan(ScanShape(*shape), torch.float32, backward=False, has_z=True, out_fp32=False)
        assert plan.wave and plan.keeps_checkpoint
        return plan.ckv_numel, plan.ckh_numel

    assert sizes(1, 256, 200, 300, 1, 16) == (256 * 6 * 16 * 300, 0)
    assert sizes(2, 8, 32, 300, 1, 16) == (0, 0)
    assert sizes(2, 8, 63, 300, 1, 16) == (2 * 8 * 16 * 300, 0)
    assert cuda_build.wave_chunks(200, 300) == -(-331 // T.wave_steps)
    assert cuda_build.wave_chunks(5, 300) == -(-304 // T.wave_steps)


def test_wavefront_clusters_only_on_sm90_and_whole_clusters():
    """The backward's clusters: `wave_cluster` consecutive channels of a group on sm_90+ cards where each group's
    channels fill whole clusters (a 2DMambaMIL grid), one block a cluster otherwise; the nvcc check builds
    the cluster kernels for sm_90 only (sm_80 has no clusters)."""
    size = T.wave_cluster
    assert size > 1
    assert cuda_build.wave_cluster(256, 1, 90) == size and cuda_build.wave_cluster(512, 1, 100) == size
    assert cuda_build.wave_cluster(2 * 8 * size, 2, 90) == size  # two groups
    assert cuda_build.wave_cluster(256, 1, 80) == 1 and cuda_build.wave_cluster(256, 1, 86) == 1
    assert cuda_build.wave_cluster(2 * (size + 1), 2, 90) == 1 and cuda_build.wave_cluster(size - 1, 1, 90) == 1
    cluster_name = cuda_build.wave_kernel_names("float", "float", 2, False, size)[1]
    assert cluster_name.endswith(f", {size}>")
    assert cluster_name not in cuda_build.nvcc_translation_unit(cuda_build.WAVE_SOURCE, 80)
    assert cluster_name in cuda_build.nvcc_translation_unit(cuda_build.WAVE_SOURCE, 90)
    assert cluster_name not in cuda_build.nvcc_translation_unit(cuda_build.BAND_SOURCE, 90)
    shape = ScanShape(1, 256, 200, 300, 1, 16)
    for arch, cluster in ((80, 1), (90, size)):
        plan = cuda_build.launch_plan(shape, torch.float32, backward=True, has_z=True, out_fp32=True, arch=arch)
        assert plan.wave and plan.cluster == cluster and plan.kernel.endswith(f", {cluster}>")
    assert cuda_build.launch_plan(shape, torch.float32, backward=True, has_z=True, out_fp32=True, arch=90,
                                  tuning=ScanTuning(wave_cluster=1)).cluster == 1


def test_vector_flags_follow_width_strides_and_alignment():
    """K-wide vector stores need W % K == 0 (the outputs are ours, contiguous); vector loads also need every input's
    columns contiguous and its address and other strides multiples of K (a dimension of size one does not count)."""
    def flags(u, B, tensors=None, tuning=DEFAULT_TUNING):
        plan = cuda_scan.plan_for(u, B, backward=False, has_z=False, out_fp32=False, tuning=tuning)
        return plan.band.K, cuda_scan._vector_flags(plan, tensors or (u, B))

    B = torch.zeros(2, 4, 1, 9, 128)
    assert flags(torch.zeros(2, 8, 9, 128), B) == (4, 3)
    assert flags(torch.zeros(2, 8, 9, 128).to(memory_format=torch.channels_last), B) == (4, 2)  # columns strided
    assert flags(torch.zeros(2, 8, 9, 129)[..., 1:], B) == (4, 2)  # misaligned by one element
    assert flags(torch.zeros(2, 8, 9, 130)[..., :128], B) == (4, 2)  # rows 130 apart
    assert flags(torch.zeros(1, 8, 9, 128), B[:1, :, :, :, :].expand(1, 4, 1, 9, 128)) == (4, 3)
    assert flags(torch.zeros(2, 8, 9, 126), torch.zeros(2, 4, 1, 9, 126)) == (4, 0)  # W % K != 0
    assert flags(torch.zeros(2, 8, 9, 14), torch.zeros(2, 4, 1, 9, 14)) == (2, 3)  # two columns per thread
    assert flags(torch.zeros(2, 8, 9, 7), torch.zeros(2, 4, 1, 9, 7))[1] == 0  # one column per thread
    assert flags(torch.zeros(2, 8, 9, 14), torch.zeros(2, 4, 1, 9, 14), tensors=(None,)) == (2, 3)
    assert flags(torch.zeros(2, 8, 9, 128), B, tuning=ScanTuning(vector_access=False)) == (4, 0)


def test_supports_dtypes_and_states():
    u = torch.zeros(1, 2, 3, 4)
    assert cuda_scan.supports(u, torch.zeros(1, 1, 64, 3, 4))
    assert not cuda_scan.supports(u, torch.zeros(1, 1, 65, 3, 4))
    assert not cuda_scan.supports(u.double(), torch.zeros(1, 1, 4, 3, 4))


@pytest.mark.parametrize("H,W", [(1, 1), (5, 7), (40, 45), (70, 9), (200, 300)])
def test_wave_tile_index_matches_the_kernels_tiles(H, W):
    """Every (state, pixel) of a map has one place in the wavefront backward's dB / dC tiles, the one the kernel
    writes: band b's tile of chunk c, lane r at step tt holds scan-frame pixel (32 b + r, c * M2D_WAVE_T + tt - r)."""
    tq, N = T.wave_steps, 3
    chunks = cuda_build.wave_chunks(H, W)
    for code in (0, 1, 2, 3, 4, 7):
        fr, fc = code & 1, (code >> 1) & 1
        index = cuda_build.wave_tile_index(H, W, N, code).view(N, H, W)
        expected = torch.full((N, H, W), -1, dtype=torch.long)
        for band in range(-(-H // 32)):
            steps = W + min(32, H - 32 * band) - 1
            assert steps <= chunks * tq
            for t in range(steps):
                for r in range(min(32, H - 32 * band)):
                    p, q = 32 * band + r, t - r
                    if 0 <= q < W:
                        i, j = (H - 1 - p if fr else p), (W - 1 - q if fc else q)
                        for n in range(N):
                            expected[n, i, j] = ((band * chunks + t // tq) * N + n) * 32 * tq + r * tq + t % tq
        assert (expected >= 0).all() and torch.equal(index, expected)
        assert index.max() < cuda_build.wave_tile_elements(H, W, N)


@pytest.mark.parametrize("shape,save", [((2, 8, 9, 40, 2, 1), True), ((2, 8, 9, 40, 2, 16), True),
                                        ((1, 256, 200, 300, 1, 16), True), ((1, 256, 200, 300, 1, 16), False),
                                        ((2, 8, 5, 600, 2, 2), True)])
def test_fake_forward_takes_its_sizes_from_the_launch_plan(shape, save):
    """The custom op's fake kernel (torch.compile's shapes) allocates what the launcher's plan says: the checkpoints
    the forward keeps (none when not asked or when larger than u), the row checkpoint of multi-tile maps."""
    from mamba2d.ops import library

    batch, dim, H, W, G, N = shape
    u = torch.empty(batch, dim, H, W, device="meta")
    B = torch.empty(batch, G, N, H, W, device="meta")
    y, ckv, ckh = library._scan2d_fwd_fake(u, u, torch.empty(dim, N, device="meta"), B, B, None, None, None, True,
                                           [0] * G, True, save)
    plan = cuda_build.launch_plan(ScanShape(*shape), torch.float32, backward=False, has_z=False, out_fp32=True)
    assert y.shape == u.shape and y.dtype == torch.float32
    assert ckv.numel() == (plan.ckv_numel if save and plan.keeps_checkpoint else 0)
    assert ckh.numel() == plan.ckh_numel
    if shape == (2, 8, 9, 40, 2, 1):  # N <= R: the per-band forward keeps its band starts
        assert ckv.numel() == batch * dim * plan.band.nbands * N * W > 0
    if shape[-1] == 16 and H == 9:  # a state split: nothing kept (the backward rebuilds)
        assert plan.split and ckv.numel() == 0


def _low_rank_inputs(device, dtype=torch.float32, shared_u=True, batch=2, groups=4, per_group=3, rank=2, N=2, H=5,
                     W=7, proj_dtype=torch.float32):
    """Scan inputs with a low-rank delta (a strided view, as SS2D's x_dbl gives it) and its float32 projection."""
    g = torch.Generator().manual_seed(3)
    dim = groups * per_group

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    return dict(
        u=rand(batch, per_group if shared_u else dim, H, W).requires_grad_(),
        delta=rand(groups, rank, batch, H, W).permute(2, 0, 1, 3, 4).detach().requires_grad_(),
        A=(-torch.rand(dim, N, generator=g) - 0.5).to(device).requires_grad_(),
        B=rand(batch, groups, N, H, W).requires_grad_(),
        C=rand(batch, groups, N, H, W).requires_grad_(),
        D=rand(dim, dt=torch.float32).requires_grad_(),
        delta_bias=rand(dim, dt=torch.float32).requires_grad_(),
        delta_proj=(rand(groups, per_group, rank, dt=proj_dtype) * 0.3).detach().requires_grad_(),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared_u,sum_groups,channels_last",
                         [(False, False, False), (True, False, False), (True, True, False), (True, True, True)])
def test_custom_op_keeps_the_low_rank_delta_not_the_full_one(dtype, shared_u, sum_groups, channels_last):
    """mamba2d::scan2d_fwd on a low-rank delta (meta tensors: the fake kernels and the registered autograd) keeps
    its inputs and checkpoints for the backward, no full (batch, dim, H, W) delta; the backward gives the low-rank
    delta its gradient in its shape and dtype, and delta_proj one in the weight's dtype (float32 here). With y
    summed over the groups, y has dim / G channels; asked for channels_last, it is so laid out."""
    from mamba2d.ops import library

    inputs = _low_rank_inputs("meta", dtype, shared_u)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, ckv, ckh = torch.ops.mamba2d.scan2d_fwd(
            inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"], None,
            inputs["delta_bias"], True, [0, 4, 3, 7], False, True, inputs["delta_proj"], sum_groups, channels_last)
    assert y.shape == (2, 3 if sum_groups else 12, 5, 7) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    kept = sorted(t.numel() for t in saved)
    assert kept == sorted([*(t.numel() for t in inputs.values()), ckv.numel(), ckh.numel()])
    grads = torch.autograd.grad(y.sum(), list(inputs.values()))
    for (name, t), grad in zip(inputs.items(), grads):
        assert grad.shape == t.shape and grad.dtype == t.dtype, name
    # without delta_proj, the full delta is what it keeps
    saved.clear()
    full = torch.empty(2, 12, 5, 7, device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        library.scan2d_fwd(inputs["u"], full.requires_grad_(), inputs["A"], inputs["B"], inputs["C"], None, None,
                           None, True, [0, 4, 3, 7], False, True)
    assert full.numel() in [t.numel() for t in saved]


def _reference_launchers(monkeypatch):
    """Stand in for the CUDA launchers with the float64 reference (forward: y; backward: autograd's gradients),
    so that the eager autograd.Function's plumbing runs on the CPU."""
    from mamba2d.ops import library, selective_scan_2d_ref

    names = {cuda_build.direction_code(name): name for name in DIRECTIONS}

    def fwd(u, delta, A, B, C, D, z, delta_bias, softplus, directions, out_fp32, save_ckpt, sum_groups=False,
            channels_last=False, **_):
        assert delta.shape == (u.shape[0], A.shape[0], *u.shape[2:]) and delta.is_contiguous()
        y = selective_scan_2d_ref(u, delta, A, B, C, D, z, delta_bias, softplus, [names[c] for c in directions],
                                  sum_groups=sum_groups, channels_last=channels_last)
        return y, None, None

    def bwd(dout, u, delta, A, B, C, D, z, delta_bias, ckv, ckh, softplus, directions, **_):
        leaves = [t if t is None else t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():  # a gradient of dim / G channels is that of y summed over the groups
            y = selective_scan_2d_ref(*leaves, softplus, [names[c] for c in directions],
                                      sum_groups=dout.shape[1] != A.shape[0])
            given = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], dout))
        return tuple(None if t is None else next(given) for t in leaves)

    monkeypatch.setattr(library, "fwd_impl", fwd)
    monkeypatch.setattr(library, "bwd_impl", bwd)


@pytest.mark.parametrize("sum_groups,channels_last", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("shared_u", [False, True])
def test_eager_scan_recomputes_the_low_rank_delta(monkeypatch, shared_u, sum_groups, channels_last):
    """The eager autograd.Function on a low-rank delta (launchers stood in for by the reference, float64): y and
    every gradient, the low-rank delta's and delta_proj's included, equal the reference's on the same inputs (y
    summed over the groups or not, channels_last or not), and it keeps no tensor but its inputs for the
    backward."""
    from mamba2d.ops import library, selective_scan_2d_ref

    _reference_launchers(monkeypatch)
    inputs = _low_rank_inputs("cpu", torch.float64, shared_u, proj_dtype=torch.float64)
    directions = ("tl_hv", "tl_vh", "br_hv", "br_vh")
    codes = tuple(cuda_build.direction_code(name) for name in directions)
    args = [inputs[name] for name in ("u", "delta", "A", "B", "C", "D")] + [None, inputs["delta_bias"]]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = library._EagerScan2d.apply(*args, inputs["delta_proj"],
                                       (True, codes, False, sum_groups, channels_last, DEFAULT_TUNING, False))
    inputs_at = {(t.data_ptr(), t.shape) for t in inputs.values()}
    assert len(saved) == len(inputs) and all((t.data_ptr(), t.shape) in inputs_at for t in saved)
    want = selective_scan_2d_ref(**inputs, direction=directions, sum_groups=sum_groups)
    assert y.shape == (2, 3 if sum_groups else 12, 5, 7)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    got = torch.autograd.grad(y, list(inputs.values()), dy)
    expected = torch.autograd.grad(want, list(inputs.values()), dy)
    for name, g, e in zip(inputs, got, expected):
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-11, msg=f"d{name} differs")


@pytest.mark.parametrize("names", [["tl_hv"], ["br_vh"] * 6, ["tl_hv", "tl_vh", "br_hv", "br_vh"],
                                   ["tl_hv", "br_vh"] * 5, [DIRECTIONS[(g * g + g // 3) % 8] for g in range(21)]])
def test_direction_codes_travel_by_value(names):
    """Directions that repeat within 21 groups are packed into the parameter struct (no device tensor, which CUDA
    graphs' memory pool would not let the op cache); the kernels' decoding gives each group its own code."""
    codes = [cuda_build.direction_code(n) for n in names]
    fields = cuda_scan.direction_fields(codes, torch.device("cuda"))  # by value: the device is never touched
    assert fields["dirs"] is None and 1 <= fields["dir_period"] <= cuda_scan.MAX_PACKED_DIRECTIONS
    decoded = [(fields["dir_codes"] >> (3 * (g % fields["dir_period"]))) & 7 for g in range(len(codes))]
    assert decoded == codes
    assert fields["dir_period"] == (21 if len(codes) == 21 else len(set(codes)))
    params = make_params(ScanParams, **fields)
    assert (params.dir_codes, params.dir_period) == (fields["dir_codes"], fields["dir_period"])
