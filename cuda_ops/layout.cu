// Layout copies of feature maps: channels_last <-> NCHW, and a map's columns as rows (VMamba's column-major
// routes). Each is one swap of a contiguous tensor's outer and inner axes around a middle one that stays,
// dst[b][c][m][r] = src[b][r][m][c]. PyTorch's copy of a permuted tensor writes in the output's order and reads the
// input with a stride of a whole row: every warp touches 32 lines for 64-128 useful bytes (on an H100 a fraction of
// the bandwidth, and its time grows 10x from 512² to 1024² maps). Here a block moves one square tile, 128 bytes a
// side, through shared memory: reads and writes are both whole lines.
#include "scan2d_common.cuh"

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
    const m2d_i64 tiles_c = (cols + TILE - 1) / TILE, tiles_r = (rows + TILE - 1) / TILE;
    m2d_i64 t = blockIdx.x;
    const m2d_i64 c0 = (t % tiles_c) * TILE;
    t /= tiles_c;
    const m2d_i64 r0 = (t % tiles_r) * TILE;
    t /= tiles_r;
    const m2d_i64 m = t % mid, b = t / mid;
    const int tx = threadIdx.x % TILE, ty = threadIdx.x / TILE;
    const T* s = src + (b * rows * mid + m) * cols;  // element (r, c) at s[r * mid * cols + c]
    T* d = dst + (b * cols * mid + m) * rows;        // element (c, r) at d[c * mid * rows + r]
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
