// Parameters of the 2D scan, layer-norm, layout-copy and SiLU kernels, each kernel's passed by value as one struct.
//
// Plain C++ (no CUDA keyword), so that a host compiler can check the layout: mamba2d/ops/cuda_launch.py mirrors each
// struct field by field as a ctypes.Structure and fills it by name, and tests/ops/test_scan_cuda_cpu.py compares
// sizeof and every offsetof printed by a host program built from this header with ctypes' layout. Keep the two in
// the same order; a pointer field the kernel does not use is null.
#pragma once

typedef long long m2d_i64;

// One struct for the four scan kernels (per-band and wavefront, forward and backward): each reads the fields it
// needs. Tensor pointers are untyped where their element type is a template argument of the kernel (T, TO, TG).
// Strides are in elements: the leading two (batch, channel or group) 64-bit, the in-map ones 32-bit.
struct M2DScanParams {
    // inputs
    const void* u;      // T [batch][dim][H][W] (strided)
    const void* delta;  // T, like u
    const void* z;      // T, like u, or null: no gate
    const void* dout;   // TO, like u (backward)
    const void* Bm;     // T [batch][G][N][H][W] (strided)
    const void* Cm;     // T, like B
    const float* A;     // [dim][N]
    const float* Dv;    // [dim] or null
    const float* dbias;  // [dim] or null
    const int* dirs;     // [G] direction codes (mamba2d.ops.cuda_build.direction_code), or null: dir_codes
    // outputs and checkpoints (float32 unless typed by the kernel)
    void* y;       // TO [parts][batch][dim][H][W] (forward)
    float* ckv;    // per-band: vertical state at each band start (written forward, read backward)
    float* ckh;    // per-band: row state at each tile start
    float* dck;    // per-band backward: scratch of the row adjoints at tile starts
    float* tops;   // wavefront: band tops (written forward, read backward)
    float* ck;     // wavefront backward: scratch of each lane's states at chunk ends
    float* bot;    // wavefront backward: the column adjoint leaving a band's top row
    void* du;      // TG (per-band) or T (wavefront)
    void* ddelta;  // like du
    void* dz;      // T or null
    float* dBp;    // per-block partial dB
    float* dCp;    // per-block partial dC
    float* dAp;    // [batch][dim][N]
    float* dDp;    // [parts][batch][dim]
    float* dbp;    // [parts][batch][dim]
    // 64-bit strides of u, delta, z, dout, B, C and the number of (batch, channel) maps
    m2d_i64 su_b, su_d, sd_b, sd_d, sz_b, sz_d, so_b, so_d, sB_b, sB_g, sC_b, sC_g;
    // u's offset per group on top of su_d: 0 when u has dim channels, -(dim / G) * su_d when groups share u's maps:
    // a u of u_period * dim / G channels, group g reading block g % u_period of them (channel d of group g reads u's
    // channel d - (g - g % u_period) * dim / G; one u of dim / G channels shared by all G groups: u_period 1)
    m2d_i64 su_g;
    // dout's offset per group on top of so_d, in the same way: 0 when dout has dim channels, -(dim / G) * so_d when y
    // is summed over the groups that share u's maps (o_period blocks of one gradient map per channel of a group)
    m2d_i64 so_g;
    m2d_i64 nmaps;
    // the direction codes by value, 3 bits each: group g's is bits 3 * (g % dir_period) and up (used where dirs is
    // null; by value, the launch reads no device tensor that a caller would have to keep alive, as CUDA graphs need)
    m2d_i64 dir_codes;
    // sizes and flags
    int dim, H, W, G, N, softplus;
    // 32-bit in-map strides
    int su_h, su_w, sd_h, sd_w, sz_h, sz_w, so_h, so_w, sB_n, sB_h, sB_w, sC_n, sC_h, sC_w;
    // per-band work split (mamba2d.ops.cuda_build.LaunchConfig) and vector accesses
    int S, WPM, CH, ntiles, nbands, NP, vec;
    // wavefront: keep every band's top (forward), staged chunks of the longest band (backward)
    int keep_tops, ck_chunks;
    int dir_period;  // codes in dir_codes, repeated over the groups
    int u_period, o_period;  // see su_g and so_g
};

// The layer-norm backward (layer_norm.cu).
struct M2DLayerNormBwdParams {
    const void* x;        // T [rows][C], the input as kept for the backward
    const void* dy;       // T [rows][C], the output's gradient
    const float* weight;  // [C] or null
    const float* mean;    // [rows], or null where x holds the deviations x - mean
    const float* rstd;    // [rows]
    void* dx;             // TX [rows][C]
    float* dw_part;       // [gridDim.x][C] per-block sums of dy * (x - mean) * rstd
    float* db_part;       // [gridDim.x][C] per-block sums of dy
    // A residual sum's norm (the forward's branch given): dx += dres, and dbranch = dx * scale of the row's sample.
    const void* dres;     // TX [rows][C] or null: the gradient of the sum from where else it goes
    void* dbranch;        // TB [rows][C] or null
    const float* scale;   // [rows / rows_per_sample] or null (1)
    m2d_i64 rows;
    m2d_i64 rows_per_sample;
    int C;
};

// The layer-norm forward (layer_norm.cu).
struct M2DLayerNormParams {
    const void* x;        // T [rows][C]
    const float* weight;  // [C] or null
    const float* bias;    // [C] or null
    void* y;              // TO [rows][C]
    float* mean_out;      // [rows] or null
    float* rstd_out;      // [rows] or null
    void* dev_low;        // TO [rows][C] or null: x - mean, rounded to TO
    // A residual sum's norm: normalise x + scale * branch (scale of the row's sample) and write that sum to x_out.
    const void* branch;   // TB [rows][C] or null (plain layer norm of x)
    const float* scale;   // [rows / rows_per_sample] or null (1)
    void* x_out;          // T [rows][C], written where branch is given
    m2d_i64 rows;
    m2d_i64 rows_per_sample;
    int C;
    float eps;
};

// The layout copy (layout.cu): dst[b][c][m][r] = src[b][r][m][c], both contiguous.
struct M2DSwapParams {
    const void* src;  // T [batch][rows][mid][cols]
    void* dst;        // T [batch][cols][mid][rows], each batch item contiguous
    m2d_i64 batch;
    m2d_i64 rows;
    m2d_i64 mid;
    m2d_i64 cols;
    m2d_i64 dst_batch;  // elements from one batch item of dst to the next (cols * mid * rows where dst is contiguous)
};

// The groups' sum written channels_last (layout.cu): dst[b][p][c] = sum over g of src[b][g][c][p], G a template
// argument of the kernel.
struct M2DGroupSumParams {
    const void* src;  // float [batch][G][channels][pixels]
    void* dst;        // float [batch][pixels][channels]
    m2d_i64 batch;
    m2d_i64 channels;
    m2d_i64 pixels;
};

// SiLU with both layouts (layout.cu): forward y = silu(x) channels_last and u, its NCHW copy; backward
// dx = silu'(x) * (dy + du), the two gradients added in T first (as autograd adds them).
struct M2DSiluParams {
    const void* x;   // T [batch][pixels][channels] (channels_last)
    void* y;         // T, like x (forward)
    void* u;         // T [batch][channels][pixels] (forward)
    const void* dy;  // T, like x, or null (backward)
    const void* du;  // T, like u, or null (backward)
    void* dx;        // T, like x (backward)
    m2d_i64 batch;
    m2d_i64 pixels;
    m2d_i64 channels;
};
