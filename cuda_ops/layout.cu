// Layout changes of feature maps, each a pass through square shared-memory tiles (128 bytes a side) so that reads
// and writes are both whole lines: channels_last <-> NCHW and a map's columns as rows (VMamba's column-major routes),
// as one swap of a contiguous tensor's outer and inner axes around a middle one that stays, dst[b][c][m][r] =
// src[b][r][m][c]; the 2D mixer's routes summed into channels_last; and its SiLU written in both layouts. PyTorch's
// copy of a permuted tensor writes in the output's order and reads the input with a stride of a whole row: every
// warp touches 32 lines for 64-128 useful bytes (on an H100 a fraction of the bandwidth, and its time grows 10x from
// 512² to 1024² maps).
#include "scan2d_common.cuh"

// The tile a block owns in a pass over a contiguous (batch, rows, mid, cols) tensor, one block per TILE x TILE tile
// of each (batch, mid) plane: its first row and column, its batch and mid index, and the thread's first tile column
// (cx; in a transposed pass its first tile row) and first tile row (ty). A tile row is 32 lanes of VEC elements each
// (`M2DRun`), so the block's 256 threads cover 8 rows per step.
struct M2DTile {
    m2d_i64 r0, c0, b, m;
    int cx, ty;
};
constexpr int M2D_TILE_STEP = 256 / 32;

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
    tile.cx = (threadIdx.x % 32) * (TILE / 32);
    tile.ty = threadIdx.x / 32;
    return tile;
}

// The run of elements one lane moves along a line: 4 bytes, two 16-bit values or one 32-bit value, so that a warp
// reads or writes a whole 128-byte line per instruction whatever the width (with one 16-bit value per lane it moves
// half a line, and the copies ran at about half the bandwidth of their 32-bit twins).
template <typename T>
struct alignas(4) M2DRun {
    static constexpr int VEC = 4 / sizeof(T);
    T v[VEC];
};

// The elements left of a line from `at` on (its length minus at), clamped to a run: how many a lane's run holds.
template <typename T>
__device__ __forceinline__ int m2d_run_len(m2d_i64 at, m2d_i64 length) {
    const m2d_i64 left = length - at;
    return left <= 0 ? 0 : (left < M2DRun<T>::VEC ? (int)left : M2DRun<T>::VEC);
}

// n elements from p (the rest of the run zero): one 4-byte access where the run is whole and p aligned, else one
// element at a time (odd line lengths or storage offsets leave every other line unaligned).
template <typename T>
__device__ __forceinline__ M2DRun<T> m2d_load_run(const T* p, int n) {
    M2DRun<T> r;
    if (n == M2DRun<T>::VEC && (reinterpret_cast<unsigned long long>(p) & 3) == 0) {
        r = *reinterpret_cast<const M2DRun<T>*>(p);
    } else {
#pragma unroll
        for (int k = 0; k < M2DRun<T>::VEC; ++k) r.v[k] = k < n ? p[k] : T{};
    }
    return r;
}

template <typename T>
__device__ __forceinline__ void m2d_store_run(T* p, int n, const M2DRun<T>& r) {
    if (n == M2DRun<T>::VEC && (reinterpret_cast<unsigned long long>(p) & 3) == 0) {
        *reinterpret_cast<M2DRun<T>*>(p) = r;
    } else {
#pragma unroll
        for (int k = 0; k < M2DRun<T>::VEC; ++k) {
            if (k < n) p[k] = r.v[k];
        }
    }
}

// The tile's columns as lines of memory, line i (from `first`, `stride` elements apart, `lines` of them) holding
// column i: stored from the tile (m2d_tile_columns_out) or loaded into it (m2d_tile_columns_in). The lane moves the
// column's rows cx to cx + n, 8 columns a step per warp. (WIDE: a tile row with its padding.)
template <typename T, int TILE, int WIDE>
__device__ __forceinline__ void m2d_tile_columns_out(const T (&tile)[TILE][WIDE], const M2DTile& pos, T* first,
                                                     m2d_i64 stride, m2d_i64 lines, int n) {
    if (n <= 0) return;
#pragma unroll
    for (int i = pos.ty; i < TILE; i += M2D_TILE_STEP) {
        if (i < lines) {
            M2DRun<T> run;
#pragma unroll
            for (int k = 0; k < M2DRun<T>::VEC; ++k) run.v[k] = tile[pos.cx + k][i];
            m2d_store_run(first + i * stride, n, run);
        }
    }
}

template <typename T, int TILE, int WIDE>
__device__ __forceinline__ void m2d_tile_columns_in(T (&tile)[TILE][WIDE], const M2DTile& pos, const T* first,
                                                    m2d_i64 stride, m2d_i64 lines, int n) {
    if (n <= 0) return;
#pragma unroll
    for (int i = pos.ty; i < TILE; i += M2D_TILE_STEP) {
        if (i < lines) {
            const M2DRun<T> run = m2d_load_run(first + i * stride, n);
#pragma unroll
            for (int k = 0; k < M2DRun<T>::VEC; ++k) tile[pos.cx + k][i] = run.v[k];
        }
    }
}

// T is only moved, never converted: a 16- or 32-bit integer type of the element's width. A tile is TILE x TILE
// elements (128 bytes a side), its rows padded so that a column of it falls in distinct shared-memory banks.
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_layout_swap(const M2DSwapParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int VEC = M2DRun<T>::VEC;
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ src = static_cast<const T*>(prm.src);
    T* __restrict__ dst = static_cast<T*>(prm.dst);
    const m2d_i64 rows = prm.rows, mid = prm.mid, cols = prm.cols;
    const M2DTile pos = m2d_tile<TILE>(rows, mid, cols);
    const m2d_i64 r0 = pos.r0, c0 = pos.c0;
    const int cx = pos.cx;
    const T* s = src + (pos.b * rows * mid + pos.m) * cols;  // element (r, c) at s[r * mid * cols + c]
    T* d = dst + pos.b * prm.dst_batch + pos.m * rows;       // element (c, r) at d[c * mid * rows + r]
    const int n_load = m2d_run_len<T>(c0 + cx, cols), n_store = m2d_run_len<T>(r0 + cx, rows);
    if (n_load > 0) {
#pragma unroll
        for (int i = pos.ty; i < TILE; i += M2D_TILE_STEP) {
            if (r0 + i < rows) {
                const M2DRun<T> run = m2d_load_run(s + (r0 + i) * mid * cols + c0 + cx, n_load);
#pragma unroll
                for (int k = 0; k < VEC; ++k) tile[i][cx + k] = run.v[k];
            }
        }
    }
    __syncthreads();
    m2d_tile_columns_out(tile, pos, d + c0 * mid * rows + r0 + cx, mid * rows, cols - c0, n_store);
}

// The G maps of each channel summed and written channels_last in one pass: dst[b][p][c] = src[b][0][c][p] + ... +
// src[b][G-1][c][p], added in that order: a 2D mixer's four routes, which the scan writes NCHW one map per channel
// and route, as the residual stream's layout. Apart, the sum and the layout copy each pass over the summed map once
// more. A thread issues the loads of all its rows and groups (G a compile-time constant) before the sums wait on
// them. float32 maps only: the 16-bit twin of this kernel (two values per lane, summed in float) moved a third of
// the bandwidth on an H100, slower than the sum and the layout copy apart.
template <int G>
__global__ void __launch_bounds__(256)
    mamba2d_group_sum_cl(const M2DGroupSumParams prm) {
    constexpr int TILE = 32;  // 128 bytes of float a side, one float per lane's run, padded by one column
    __shared__ float tile[TILE][TILE + 1];
    const float* __restrict__ src = static_cast<const float*>(prm.src);
    const m2d_i64 channels = prm.channels, pixels = prm.pixels, plane = channels * pixels;
    const M2DTile pos = m2d_tile<TILE>(channels, 1, pixels);
    const m2d_i64 c0 = pos.r0, p0 = pos.c0;
    const int n_pixels = m2d_run_len<float>(p0 + pos.cx, pixels);
    if (n_pixels > 0) {
        constexpr int ROWS = TILE / M2D_TILE_STEP;
        const float* s = src + pos.b * G * plane + p0 + pos.cx;
        float v[ROWS][G];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const m2d_i64 c = c0 + pos.ty + r * M2D_TILE_STEP;
#pragma unroll
            for (int g = 0; g < G; ++g) {
                if (c < channels) v[r][g] = s[g * plane + c * pixels];
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int i = pos.ty + r * M2D_TILE_STEP;
            if (c0 + i < channels) {
                float acc = 0.f;
#pragma unroll
                for (int g = 0; g < G; ++g) acc += v[r][g];
                tile[i][pos.cx] = acc;
            }
        }
    }
    __syncthreads();
    m2d_tile_columns_out(tile, pos, static_cast<float*>(prm.dst) + (pos.b * pixels + p0) * channels + c0 + pos.cx,
                         channels, pixels - p0, m2d_run_len<float>(c0 + pos.cx, channels));
}

// SiLU of a channels_last map x (batch, P pixels, C channels), written channels_last (y) and as its NCHW copy (u):
// the 2D mixer's activation, whose output its projections read channels_last and its scan NCHW. One pass instead of
// the activation's and the copy's. Math as PyTorch's silu in float: x / (1 + exp(-x)), rounded to T.
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_silu_both_fwd(const M2DSiluParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int VEC = M2DRun<T>::VEC;
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    T* __restrict__ y = static_cast<T*>(prm.y);
    T* __restrict__ u = static_cast<T*>(prm.u);
    const m2d_i64 pixels = prm.pixels, channels = prm.channels;
    const M2DTile pos = m2d_tile<TILE>(pixels, 1, channels);
    const m2d_i64 p0 = pos.r0, c0 = pos.c0, base = pos.b * pixels * channels;
    const int cx = pos.cx;
    const int n_channels = m2d_run_len<T>(c0 + cx, channels), n_pixels = m2d_run_len<T>(p0 + cx, pixels);
    if (n_channels > 0) {
#pragma unroll
        for (int i = pos.ty; i < TILE; i += M2D_TILE_STEP) {
            if (p0 + i < pixels) {
                const m2d_i64 at = base + (p0 + i) * channels + c0 + cx;
                const M2DRun<T> in = m2d_load_run(x + at, n_channels);
                M2DRun<T> out;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    const float v = m2d_to_f(in.v[k]);
                    out.v[k] = m2d_from_f<T>(v / (1.f + expf(-v)));
                    tile[i][cx + k] = out.v[k];
                }
                m2d_store_run(y + at, n_channels, out);
            }
        }
    }
    __syncthreads();
    m2d_tile_columns_out(tile, pos, u + base + c0 * pixels + p0 + cx, pixels, channels - c0, n_pixels);
}

// Its backward: dx = silu'(x) * g with g = dy + du (dy channels_last, du NCHW, read through the tile; either may be
// null), g rounded to T before use as autograd's sum of the two is; silu' as PyTorch's in float,
// s * (1 + x * (1 - s)) with s = 1 / (1 + exp(-x)).
template <typename T>
__global__ void __launch_bounds__(256)
    mamba2d_silu_both_bwd(const M2DSiluParams prm) {
    constexpr int TILE = 128 / sizeof(T);
    constexpr int VEC = M2DRun<T>::VEC;
    constexpr int PAD = 4 / sizeof(T);
    __shared__ T tile[TILE][TILE + PAD];
    const T* __restrict__ x = static_cast<const T*>(prm.x);
    const T* __restrict__ dy = static_cast<const T*>(prm.dy);
    const T* __restrict__ du = static_cast<const T*>(prm.du);
    T* __restrict__ dx = static_cast<T*>(prm.dx);
    const m2d_i64 pixels = prm.pixels, channels = prm.channels;
    const M2DTile pos = m2d_tile<TILE>(pixels, 1, channels);
    const m2d_i64 p0 = pos.r0, c0 = pos.c0, base = pos.b * pixels * channels;
    const int cx = pos.cx;
    const int n_channels = m2d_run_len<T>(c0 + cx, channels), n_pixels = m2d_run_len<T>(p0 + cx, pixels);
    if (du != nullptr) {
        m2d_tile_columns_in(tile, pos, du + base + c0 * pixels + p0 + cx, pixels, channels - c0, n_pixels);
    }
    __syncthreads();
    if (n_channels > 0) {
#pragma unroll
        for (int i = pos.ty; i < TILE; i += M2D_TILE_STEP) {
            if (p0 + i < pixels) {
                const m2d_i64 at = base + (p0 + i) * channels + c0 + cx;
                const M2DRun<T> xs = m2d_load_run(x + at, n_channels);
                M2DRun<T> dys, out;
                if (dy != nullptr) dys = m2d_load_run(dy + at, n_channels);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    float g;
                    if (dy != nullptr && du != nullptr) {
                        g = m2d_to_f(m2d_from_f<T>(m2d_to_f(dys.v[k]) + m2d_to_f(tile[i][cx + k])));
                    } else {
                        g = dy != nullptr ? m2d_to_f(dys.v[k]) : m2d_to_f(tile[i][cx + k]);
                    }
                    const float v = m2d_to_f(xs.v[k]);
                    const float sg = 1.f / (1.f + expf(-v));
                    out.v[k] = m2d_from_f<T>(g * sg * (1.f + v * (1.f - sg)));
                }
                m2d_store_run(dx + at, n_channels, out);
            }
        }
    }
}
