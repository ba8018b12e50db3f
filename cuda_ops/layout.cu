// Layout changes of feature maps, each a pass through square shared-memory tiles (128 bytes a side) so that reads
// and writes are both whole lines: channels_last <-> NCHW and a map's columns as rows (VMamba's column-major routes),
// as one swap of a contiguous tensor's outer and inner axes around a middle one that stays, dst[b][c][m][r] =
// src[b][r][m][c]; and the 2D mixer's SiLU written in both layouts. PyTorch's copy of a permuted tensor writes in
// the output's order and reads the input with a stride of a whole row: every warp touches 32 lines for 64-128 useful
// bytes (on an H100 a fraction of the bandwidth, and its time grows 10x from 512² to 1024² maps).
#include "scan2d_common.cuh"

// The tile a block owns in a pass over a contiguous (batch, rows, mid, cols) tensor, one block per TILE x TILE tile
// of each (batch, mid) plane: its first row and column, its batch and mid index, and the thread's column in the tile
// (tx) and first row (ty), the block covering 256 / TILE rows per step.
struct M2DTile {
    m2d_i64 r0, c0, b, m;
    int tx, ty;
};

template <int TILE>
__device__ __forceinline__ M2DTile m2d_tile(m2d_i64 rows, m2d_i64 mid, m2d_i64 cols) {
    const m2d_i64 tiles_c = (cols + TILE - 1) / TILE, tiles_r = (rows + TILE - 1) / TILE;
    m2d_i64 t = blockIdx.x;
    M2DTile tile;
    tile.c0 = (t % tiles_c) * TILE;
    t /= tiles_c;
    tile.r0 = (t % tiles_r) * TILE;
    t /= tiles_r;
    tile.m = t % mid;
    tile.b = t / mid;
    tile.tx = threadIdx.x % TILE;
    tile.ty = threadIdx.x / TILE;
    return tile;
}

// T is only moved, never converted: a 16- or 32-bit integer type of the element's width. A tile is TILE x TILE
// elements (128 bytes a side), its rows padded so that a column of it falls in distinct shared-memory banks.
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_layout_swap(const M2DSwapParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int STEP = 256 / TILE;  // tile rows the block covers per pass
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ src = static_cast<const T*>(prm.src);
    T* __restrict__ dst = static_cast<T*>(prm.dst);
    const m2d_i64 rows = prm.rows, mid = prm.mid, cols = prm.cols;
    const M2DTile pos = m2d_tile<TILE>(rows, mid, cols);
    const m2d_i64 r0 = pos.r0, c0 = pos.c0;
    const int tx = pos.tx, ty = pos.ty;
    const T* s = src + (pos.b * rows * mid + pos.m) * cols;  // element (r, c) at s[r * mid * cols + c]
    T* d = dst + (pos.b * cols * mid + pos.m) * rows;        // element (c, r) at d[c * mid * rows + r]
    if (c0 + tx < cols) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (r0 + i < rows) tile[i][tx] = s[(r0 + i) * mid * cols + c0 + tx];
        }
    }
    __syncthreads();
    if (r0 + tx < rows) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (c0 + i < cols) d[(c0 + i) * mid * rows + r0 + tx] = tile[tx][i];
        }
    }
}

// SiLU of a channels_last map x (batch, P pixels, C channels), written channels_last (y) and as its NCHW copy (u):
// the 2D mixer's activation, whose output its projections read channels_last and its scan NCHW. One pass instead of
// the activation's and the copy's. Math as PyTorch's silu in float: x / (1 + exp(-x)), rounded to T.
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_silu_both_fwd(const M2DSiluParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int STEP = 256 / TILE;
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    T* __restrict__ y = static_cast<T*>(prm.y);
    T* __restrict__ u = static_cast<T*>(prm.u);
    const m2d_i64 pixels = prm.pixels, channels = prm.channels;
    const M2DTile pos = m2d_tile<TILE>(pixels, 1, channels);
    const m2d_i64 p0 = pos.r0, c0 = pos.c0, base = pos.b * pixels * channels;
    const int tx = pos.tx, ty = pos.ty;
    if (c0 + tx < channels) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (p0 + i < pixels) {
                const m2d_i64 at = base + (p0 + i) * channels + c0 + tx;
                const float v = m2d_to_f(x[at]);
                const T out = m2d_from_f<T>(v / (1.f + expf(-v)));
                y[at] = out;
                tile[i][tx] = out;
            }
        }
    }
    __syncthreads();
    if (p0 + tx < pixels) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (c0 + i < channels) u[base + (c0 + i) * pixels + p0 + tx] = tile[tx][i];
        }
    }
}

// Its backward: dx = silu'(x) * g with g = dy + du (dy channels_last, du NCHW, read through the tile; either may be
// null), g rounded to T before use as autograd's sum of the two is; silu' as PyTorch's in float,
// s * (1 + x * (1 - s)) with s = 1 / (1 + exp(-x)).
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_silu_both_bwd(const M2DSiluParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int STEP = 256 / TILE;
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    const T* __restrict__ dy = static_cast<const T*>(prm.dy);
    const T* __restrict__ du = static_cast<const T*>(prm.du);
    T* __restrict__ dx = static_cast<T*>(prm.dx);
    const m2d_i64 pixels = prm.pixels, channels = prm.channels;
    const M2DTile pos = m2d_tile<TILE>(pixels, 1, channels);
    const m2d_i64 p0 = pos.r0, c0 = pos.c0, base = pos.b * pixels * channels;
    const int tx = pos.tx, ty = pos.ty;
    if (du != nullptr && p0 + tx < pixels) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (c0 + i < channels) tile[tx][i] = du[base + (c0 + i) * pixels + p0 + tx];
        }
    }
    __syncthreads();
    if (c0 + tx < channels) {
#pragma unroll
        for (int i = ty; i < TILE; i += STEP) {
            if (p0 + i < pixels) {
                const m2d_i64 at = base + (p0 + i) * channels + c0 + tx;
                float g;
                if (dy != nullptr && du != nullptr) {
                    g = m2d_to_f(m2d_from_f<T>(m2d_to_f(dy[at]) + m2d_to_f(tile[i][tx])));
                } else {
                    g = dy != nullptr ? m2d_to_f(dy[at]) : m2d_to_f(tile[i][tx]);
                }
                const float v = m2d_to_f(x[at]);
                const float s = 1.f / (1.f + expf(-v));
                dx[at] = m2d_from_f<T>(g * s * (1.f + v * (1.f - s)));
            }
        }
    }
}
