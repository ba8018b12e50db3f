"""Build facts of the CUDA 2D scan kernels, shared by the NVRTC launcher and the nvcc CI check.

Nothing here imports CuPy or touches a GPU: the compile options, the kernel source (with its local includes
spliced in, so CuPy's on-disk cache key covers all of it), the instantiated kernel names and the launch geometry
(a pure function of the shapes, also used by the fake/meta kernels) all live in this one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..resources import resource_dir

#: Options given to NVRTC (through CuPy) and, with an -arch added, to nvcc in CI. No fast-math: the float32 path
#: must stay within 1e-5 of a float64 reference.
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: Source files of the kernels (in cuda_ops/, shipped as mamba2d._cuda_ops).
KERNEL_SOURCE = "scan2d.cu"

#: Rows of a band kept in registers per thread when each thread owns one column; must equal M2D_R in
#: scan2d_common.cuh. A thread owning K columns keeps ROWS_PER_BAND // K rows (the same registers).
ROWS_PER_BAND = 4

#: Most columns per thread: maps up to 32 * MAX_COLS_PER_THREAD wide are scanned along a row by a single warp
#: (no cross-warp combine, no barrier), each thread scanning its K consecutive columns sequentially.
MAX_COLS_PER_THREAD = 4

#: Largest block; must equal M2D_MAX_THREADS (the kernels' __launch_bounds__).
MAX_THREADS = 256


#: Columns per thread on maps wider than 32 * MAX_COLS_PER_THREAD (at least ROWS_PER_BAND high; lower maps take
#: MAX_COLS_PER_THREAD and one row per band, so that a 1D scan, H = 1, fills every register with a pixel).
WIDE_COLS_PER_THREAD = 2

#: Maps 9-16 wide take two columns per thread (8 lanes per map, four maps per warp, two rows per band: 14 x 14 maps
#: fill their bands exactly and scan 3 lane steps instead of 4).
NARROW_PAIRS = True

#: Most threads per backward block on narrow maps (several slots per warp): the backward sums dB/dC over a block's
#: channel slots one after another, and 32 slots per 256 threads made that chain the long pole (shape b, H100:
#: fwd+bwd 1.119 -> 1.034 ms fp32, 1.010 -> 0.944 ms bf16 with 16 slots; shapes a and d, 8 slots, lose with fewer).
#: Must equal M2D_NARROW_BWD_MAX_THREADS (the narrow backward's __launch_bounds__, 5 such blocks an SM).
NARROW_BWD_MAX_THREADS = 128

#: Most threads per forward block, as channel slots (a wide row's own warps are never split): 128-thread blocks fill
#: the register file in finer steps (shape b's forward, 72 registers a thread: 7 blocks of 4 warps per SM instead of
#: 3 of 8; H100, in-process A/B against 256: b 0.250 -> 0.233 ms fp32, 0.238 -> 0.222 bf16, a and d 1-2 % faster).
#: The backward keeps larger blocks on warp-row maps (a and d lost 4-5 % with 128).
FWD_MAX_THREADS = 128

#: A launch with fewer (batch, group, channel chunk) blocks than this splits the N states over several blocks when
#: N > R (one block per channel of a batch-1 map with 16 states leaves most of the GPU idle).
SPLIT_TARGET_BLOCKS = 1024


#: A thread's K columns move as one 8/16-byte vector access where the map rows allow it (W % K == 0, unit column
#: stride, aligned addresses): fewer load/store instructions and whole sectors per access.
VECTOR_ACCESS = True


#: The wavefront kernels (`mamba2d_scan2d_fwd_wave` and `_bwd_wave`: one block per map, one lane per row, no lane
#: scans) take maps with at least WAVE_MIN_STATES states and WAVE_MIN_ROWS rows when the per-band forward would run
#: short of blocks (it splits its states: few, large maps such as shape c or a slide's grid in 2DMambaMIL). Many
#: small maps stay with the per-band kernels (H100, N = 16, fwd ms per-band / wavefront: 1 x 256 x 200 x 300
#: 2.15 / 0.96, 1 x 512 x 100 x 150 1.35 / 0.58; 32 x 96 x 56 x 56 0.86 / 0.88, 64 x 128 x 14 x 14 0.14 / 0.44), and
#: only where at least WAVE_MIN_BUSY of its lane-steps hold a pixel (a band of 32 rows takes W + 31 steps for W
#: columns; 14 x 14 maps keep 23 % of them busy, shape c 81 %), and for at most WAVE_MAX_MAPS maps (batch x
#: channels): many maps fill the GPU with per-band blocks, and the wavefront backward's per-map costs (a second,
#: forward pass per band; the skewed chunks' idle pixels) then lose (H100, fwd+bwd ms wavefront / per-band, fp32:
#: 32 x 96 x 56 x 56 3.96 / 3.27, 4 x 128 x 64 x 64 0.81 / 0.78, 1 x 256 x 400 x 400 12.3 / 25.7). A launch takes
#: both wavefront kernels or neither.
#: WAVE_FORCE (tests, benchmarks): every shape whose tiles fit. WAVE_STATES_PER_LANE: fewest states a lane scans at
#: once (a block has at most MAX_THREADS / 32 warps).
WAVE_MIN_STATES = 8
WAVE_MIN_ROWS = 8
WAVE_MIN_BUSY = 0.5
WAVE_MAX_MAPS = 2048
WAVE_FORCE = False
WAVE_STATES_PER_LANE = 2
#: Steps of the wavefront staged in shared memory at once (M2D_WAVE_T in scan2d.cu).
WAVE_STEPS = 8
#: Blocks of a thread-block cluster of the wavefront backward on sm_90+ cards (consecutive channels of one group; the
#: cluster adds their dB/dC tiles in shared memory before they leave the SMs: half the per-channel traffic with 2).
#: Launches whose channels per group are not a multiple, and older cards, take one block a cluster. Larger clusters
#: cost more than they save on an H100 (fwd+bwd ms at shape c, fp32, clusters of 1 / 2 / 4 / 8: 5.02 / 4.47 / 6.54 /
#: 6.53): with two blocks an SM, only 240 blocks fit at once in clusters of 4 or 8 against 264 in clusters of 1 or 2,
#: and c's 256 maps then take two waves.
WAVE_CLUSTER = 2
WAVE_CLUSTER_MIN_ARCH = 90


def _tuning() -> tuple[int, int, int, int, int, int, int, int, bool, bool, tuple[str, ...]]:
    """Benchmark-only override, e.g. MAMBA2D_SCAN_TUNE="R=4,FWD=3,BWD=2,KMAX=2": rows per band (one column per
    thread), occupancy targets (BWDN: the narrow backward's, in blocks of 128 threads; 4 as up to v16), most columns
    per thread (KMAX=1: one column per thread everywhere), LANES (maps wider than this take several columns per
    thread), DBUF=0 (one dB/dC reduction buffer, two barriers), BTHR (most
    threads per backward block; narrow maps take at most NARROW_BWD_MAX_THREADS), FTHR (FWD_MAX_THREADS; 256: as up
    to v12), SPLIT (SPLIT_TARGET_BLOCKS; 0: never split the states), WIDEK (WIDE_COLS_PER_THREAD; 1: one column per
    thread on every wide map, as up to v10), PAIRS=0 (one column per thread on maps 9-16 wide, as up to v10), VEC=0
    (no vector accesses, as up to v11), PF (bands of at most this many rows prefetch the next band into L1: 0 never,
    4 always as up to v11; default 1) and
    LEAN=0 (v8's pointer arithmetic; the softplus stays branch-free). WAVE (0: never the wavefront kernels, 1: on
    every shape whose tiles fit), WNS (WAVE_STATES_PER_LANE), WT (WAVE_STEPS) and WCL (WAVE_CLUSTER; 1: no clusters,
    as up to v15) are read by `_wave_tuning`."""
    import os

    spec = os.environ.get("MAMBA2D_SCAN_TUNE", "")
    if not spec:
        return (ROWS_PER_BAND, MAX_COLS_PER_THREAD, 32, 3, MAX_THREADS, FWD_MAX_THREADS, SPLIT_TARGET_BLOCKS,
                WIDE_COLS_PER_THREAD, NARROW_PAIRS, VECTOR_ACCESS, ())
    vals = dict(item.split("=") for item in spec.split(",") if item)
    rows = int(vals.get("R", ROWS_PER_BAND))
    kmax = int(vals.get("KMAX", MAX_COLS_PER_THREAD))
    defines = [f"-DM2D_R={rows}"]
    if "BWD" in vals:
        defines.append(f"-DM2D_BWD_MIN_BLOCKS={int(vals['BWD'])}")
    if "DBUF" in vals:
        defines.append(f"-DM2D_RED_DBUF={int(vals['DBUF'])}")
    if "BWDN" in vals:
        defines.append(f"-DM2D_NARROW_BWD_MIN_BLOCKS={int(vals['BWDN'])}")
    if "PF" in vals:
        defines.append(f"-DM2D_PREFETCH={int(vals['PF'])}")
    if "LEAN" in vals:
        defines.append(f"-DM2D_LEAN={int(vals['LEAN'])}")
    return (rows, kmax, int(vals.get("LANES", 32)), int(vals.get("FWD", 3)), int(vals.get("BTHR", MAX_THREADS)),
            int(vals.get("FTHR", FWD_MAX_THREADS)), int(vals.get("SPLIT", SPLIT_TARGET_BLOCKS)),
            int(vals.get("WIDEK", WIDE_COLS_PER_THREAD)), vals.get("PAIRS", "1") != "0", vals.get("VEC", "1") != "0",
            tuple(defines))


#: FWD_MIN_BLOCKS: forward occupancy target (blocks per SM; caps its registers at 80), a template argument of the
#: forward kernel. With many states per block the forward loops over them per band and prefers more registers:
#: FWD_MIN_BLOCKS_LARGE_STATE from LARGE_STATE states on (shape c: fwd+bwd 13.7 -> 11.5 ms).
#: ROW_LANES: maps wider than this many columns take K > 1 columns per thread (up to 32 * MAX_COLS_PER_THREAD).
(ROWS_PER_BAND, MAX_COLS_PER_THREAD, ROW_LANES, FWD_MIN_BLOCKS, BWD_MAX_THREADS, FWD_MAX_THREADS,
 SPLIT_TARGET_BLOCKS, WIDE_COLS_PER_THREAD, NARROW_PAIRS, VECTOR_ACCESS, TUNING_OPTIONS) = _tuning()
FWD_MIN_BLOCKS_LARGE_STATE = 2
LARGE_STATE = 8


def _wave_tuning() -> tuple[int, bool, int, int, int]:
    import os

    vals = dict(item.split("=") for item in os.environ.get("MAMBA2D_SCAN_TUNE", "").split(",") if item)
    wave = vals.get("WAVE")
    return (MAX_D_STATE + 1 if wave == "0" else WAVE_MIN_STATES, wave == "1",
            int(vals.get("WNS", WAVE_STATES_PER_LANE)), int(vals.get("WT", WAVE_STEPS)),
            int(vals.get("WCL", WAVE_CLUSTER)))


MAX_D_STATE = 64  # the kernels' largest N
WAVE_MIN_STATES, WAVE_FORCE, WAVE_STATES_PER_LANE, WAVE_STEPS, WAVE_CLUSTER = _wave_tuning()
if WAVE_STEPS != 8:
    TUNING_OPTIONS += (f"-DM2D_WAVE_T={WAVE_STEPS}",)


def band_shapes() -> tuple[tuple[int, int], ...]:
    """Every (rows per band R, columns per thread K) the kernels are instantiated for."""
    shapes = [(ROWS_PER_BAND, 1)]
    k = 2
    while k <= MAX_COLS_PER_THREAD:
        shapes.append((max(1, ROWS_PER_BAND // k), k))
        k *= 2
    return tuple(shapes)


#: C++ storage type of each supported input dtype.
DTYPE_TAGS: dict[torch.dtype, str] = {
    torch.float32: "float",
    torch.float16: "m2d_half",
    torch.bfloat16: "m2d_bf16",
}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def kernel_dir() -> Path:
    """Folder holding the .cu/.cuh files: the installed mamba2d._cuda_ops package, else the repository's cuda_ops/."""
    return resource_dir("mamba2d._cuda_ops", "cuda_ops", KERNEL_SOURCE)


@lru_cache(maxsize=None)
def kernel_source(name: str = KERNEL_SOURCE) -> str:
    """The kernel source with its local `#include "x.cuh"` lines replaced by the files' text (each file once)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        text = (root / fname).read_text()
        text = text.replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


def variant_tags(dtype: torch.dtype, out_fp32: bool) -> tuple[str, str]:
    tag = DTYPE_TAGS[dtype]
    return tag, ("float" if out_fp32 else tag)


def kernel_names(in_tag: str, out_tag: str, rows: int, cols: int, layout: int, has_z: bool,
                 fwd_min_blocks: int, float_grads: bool = False) -> tuple[str, str]:
    """Name expressions (NVRTC) of the forward and backward kernels of one (input, output) dtype variant, one
    band shape (rows per band, columns per thread), one row layout (LAYOUTS), with or without the z gate, and one
    forward occupancy target; `float_grads`: the backward writes du and ddelta in float32 (the partial sums of a
    state split) whatever the input dtype."""
    args = f"{in_tag}, {out_tag}, {rows}, {cols}, {layout}, {'true' if has_z else 'false'}"
    grad_tag = "float" if float_grads else in_tag
    return (f"mamba2d_scan2d_fwd<{args}, {fwd_min_blocks}>", f"mamba2d_scan2d_bwd<{args}, {grad_tag}>")


def fwd_min_blocks_options() -> tuple[int, ...]:
    return tuple(dict.fromkeys((FWD_MIN_BLOCKS, FWD_MIN_BLOCKS_LARGE_STATE)))


#: How a slot's row maps onto a block (the kernels' LAYOUT argument; M2D_NARROW/WARP_ROW/WIDE in scan2d_common.cuh):
#: several slots per warp (maps up to 16 thread columns), one full warp, or several warps or tiles.
LAYOUTS = {"narrow": 0, "warp_row": 1, "wide": 2}


def layout_options(cols: int) -> tuple[int, ...]:
    """Row layouts a band shape is instantiated for (what launch_config can choose): several slots per warp or one
    warp per row for one column per thread (maps up to 32 wide), one warp or several per row for K > 1 (33-128
    columns, and wide maps), several slots per warp for K = 2 (maps 9-16 wide); wide rows of one column per thread
    only where the tuning knobs ask for them."""
    if cols == 2 and NARROW_PAIRS:
        return tuple(LAYOUTS.values())
    if cols > 1:
        return LAYOUTS["warp_row"], LAYOUTS["wide"]
    one_column_wide = MAX_COLS_PER_THREAD == 1 or WIDE_COLS_PER_THREAD == 1
    return tuple(LAYOUTS.values()) if one_column_wide else (LAYOUTS["narrow"], LAYOUTS["warp_row"])


def all_variants() -> list[tuple[str, str]]:
    """Every (input, output) dtype pair the launcher may compile: output float32 or the input dtype."""
    out = []
    for tag in DTYPE_TAGS.values():
        for out_tag in dict.fromkeys(("float", tag)):
            out.append((tag, out_tag))
    return out


def nvcc_translation_unit(arch: int = 90) -> str:
    """Source for an nvcc check for sm_`arch`: the kernels plus host code taking each instantiation's address (forces
    codegen)."""
    # a state split runs without the z gate (the launcher applies it) and with float32 partial gradients
    names = [name for variant in all_variants() for shape in band_shapes() for layout in layout_options(shape[1])
             for has_z in (False, True) for minb in fwd_min_blocks_options()
             for split in ((False, True) if not has_z else (False,))
             for name in kernel_names(*variant, *shape, layout, has_z, minb, split)]
    names += [name for variant in all_variants() for ns in WAVE_LANE_STATES for has_z in (False, True)
              for cluster in wave_cluster_options(arch) for name in wave_kernel_names(*variant, ns, has_z, cluster)]
    names = list(dict.fromkeys(names))  # the backward does not depend on the forward's occupancy target
    refs = ",\n    ".join(f"(void*)&{name}" for name in names)
    return kernel_source() + f"\n\nvoid* mamba2d_force_instantiation[] = {{\n    {refs}\n}};\n"


#: Source of the short-row layer-norm forward (mamba2d.ops.cuda_layer_norm; the backward is PyTorch's) and the
#: longest row it takes (32 lanes x 32 values in registers); longer rows go to PyTorch's kernel.
LAYER_NORM_SOURCE = "layer_norm.cu"
LAYER_NORM_MAX_C = 1024
LAYER_NORM_THREADS = 256  # the kernel's __launch_bounds__


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def layer_norm_lanes(channels: int) -> tuple[int, int]:
    """(lanes per row, values per lane) of the layer-norm kernel for rows of `channels` values: about 8 values per
    lane, lanes a power of two up to 32 (several rows per warp for short rows), values a power of two from 4."""
    lanes = min(32, _pow2_at_least(_ceil_div(channels, 8)))
    return lanes, max(4, _pow2_at_least(_ceil_div(channels, lanes)))


def layer_norm_kernel_name(in_tag: str, out_tag: str, channels: int) -> str:
    lanes, values = layer_norm_lanes(channels)
    return f"mamba2d_layer_norm_fwd<{in_tag}, {out_tag}, {lanes}, {values}>"


def nvcc_layer_norm_translation_unit() -> str:
    """The layer-norm kernel with every instantiation a row length up to LAYER_NORM_MAX_C and a dtype pair use."""
    tags = list(DTYPE_TAGS.values())
    names = dict.fromkeys(layer_norm_kernel_name(i, o, c) for i in tags for o in tags
                          for c in range(1, LAYER_NORM_MAX_C + 1))
    refs = ",\n    ".join(f"(void*)&{name}" for name in names)
    return kernel_source(LAYER_NORM_SOURCE) + f"\n\nvoid* mamba2d_force_instantiation[] = {{\n    {refs}\n}};\n"


@dataclass(frozen=True)
class LaunchConfig:
    """Work split of one launch (see the comment at the top of scan2d.cu)."""

    S: int  # lanes per slot segment (power of two <= 32)
    WPM: int  # warps per slot (> 1 only when S == 32)
    R: int  # rows per band
    K: int  # consecutive columns per thread
    parts: int  # blocks per channel chunk, each owning states_per_part of the N states (grid y)
    states_per_part: int
    fwd_min_blocks: int  # forward occupancy target (template argument of the forward kernel)
    CH: int  # channel slots per block
    ntiles: int  # column tiles walked by each block
    nbands: int  # row bands of ROWS_PER_BAND rows
    threads: int
    blocks: int  # grid x: batch x groups x channel chunks
    cpg: int  # channel chunks (blocks) per (batch, group)
    smem_fwd: int  # bytes of dynamic shared memory
    smem_bwd: int

    @property
    def tile_width(self) -> int:
        return self.S * self.WPM * self.K

    @property
    def layout(self) -> int:
        """The kernels' LAYOUT template argument (LAYOUTS)."""
        if self.S < 32:
            return LAYOUTS["narrow"]
        return LAYOUTS["warp_row"] if self.WPM == 1 and self.ntiles == 1 else LAYOUTS["wide"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=1024)
def launch_config(batch: int, dim: int, height: int, width: int, groups: int, d_state: int,
                  backward: bool = False) -> LaunchConfig:
    """Work split of the forward (or, with `backward`, the backward) launch; both walk the same bands and tiles and
    split the states alike, so the checkpoints written by one are read by the other whatever their channel slots
    per block."""
    batch, dim, height, width, groups, d_state = (int(v) for v in (batch, dim, height, width, groups, d_state))
    whole = _launch_config(batch, dim, height, width, groups, d_state, 1, False)
    parts = state_parts(whole.blocks, d_state, whole.R)
    if parts == 1 and not backward:
        return whole
    return _launch_config(batch, dim, height, width, groups, d_state, parts, backward)


def state_parts(blocks: int, d_state: int, rows: int) -> int:
    """Blocks per channel chunk when `blocks` chunks are too few for the GPU: as many parts as bring the launch to
    SPLIT_TARGET_BLOCKS, none empty. Only for N > R, where the backward rebuilds the checkpoints with the forward
    kernel anyway (so a split never costs a saved checkpoint)."""
    if d_state <= rows or blocks >= SPLIT_TARGET_BLOCKS:
        return 1
    per_part = _ceil_div(d_state, min(d_state, _ceil_div(SPLIT_TARGET_BLOCKS, blocks)))
    return _ceil_div(d_state, per_part)


def _launch_config(batch: int, dim: int, height: int, width: int, groups: int, d_state: int, parts: int,
                   backward: bool) -> LaunchConfig:
    dg = dim // groups
    states = _ceil_div(d_state, parts)  # states per block
    # Up to 32 * MAX_COLS_PER_THREAD columns: one warp per row, K consecutive columns per thread, R * K pixels per
    # thread as with one column (registers stay the same).
    K = 1
    if ROW_LANES < width <= 32 * MAX_COLS_PER_THREAD:
        K = min(MAX_COLS_PER_THREAD, 1 << (_ceil_div(width, ROW_LANES) - 1).bit_length())
    elif NARROW_PAIRS and MAX_COLS_PER_THREAD > 1 and 8 < width <= 16:
        K = 2
    elif width > 32 * MAX_COLS_PER_THREAD and WIDE_COLS_PER_THREAD > 1:
        # fewer lanes per row: fewer lane-scan steps per pixel and fewer tiles (shape c: one tile instead of two)
        K = min(MAX_COLS_PER_THREAD, WIDE_COLS_PER_THREAD if height >= ROWS_PER_BAND else MAX_COLS_PER_THREAD)
    R = max(1, ROWS_PER_BAND // K) if K > 1 else ROWS_PER_BAND
    cols = _ceil_div(width, K)  # thread columns
    # Shared memory per thread in the backward: an [N][K] float and an [N] double array (+ the two dB/dC reduction
    # buffers); keep a block under ~96 KB so that two blocks fit an SM. MAX_THREADS is the kernels' __launch_bounds__.
    max_threads = max(64, min(MAX_THREADS, (98304 // ((4 * K + 8) * states + 16 * R * K + 48)) // 32 * 32))
    # Forward and backward take their own channel slots per block (FTHR, BTHR); the tiles depend on max_threads only,
    # so the backward walks the forward's (shared checkpoints).
    slot_threads = min(max_threads, BWD_MAX_THREADS if backward else FWD_MAX_THREADS)
    if cols <= 16:
        S = 1 << (cols - 1).bit_length()
        WPM = 1
        per_warp = 32 // S
        if backward:
            slot_threads = min(slot_threads, NARROW_BWD_MAX_THREADS)
        CH = max(per_warp, (slot_threads // S) // per_warp * per_warp)
        CH = min(CH, _ceil_div(dg, per_warp) * per_warp)
        ntiles = 1
    else:
        S = 32
        warps = _ceil_div(cols, 32)
        ntiles = _ceil_div(warps, max_threads // 32)
        WPM = _ceil_div(warps, ntiles)  # balanced tiles
        CH = max(1, min(slot_threads // (32 * WPM), dg))
    tps = S * WPM  # threads per slot
    tws = tps * K
    threads = CH * tps
    nbands = _ceil_div(height, R)
    cpg = _ceil_div(dg, CH)
    agg = 3 * CH * WPM * R
    agg_padded = agg - CH * WPM * R + _ceil_div(CH * WPM * R, 4) * 4  # the dB/dC buffers start 16-byte aligned
    smem_fwd = 4 * (states * K * threads + agg)
    smem_bwd = 4 * (states * K * threads + 2 * states * threads + agg_padded + (4 * CH * R * tws if CH > 1 else 0))
    smem_bwd = max(smem_bwd, 16 * threads)  # the final reduction reuses the start as [2][threads] doubles
    fwd_min_blocks = FWD_MIN_BLOCKS_LARGE_STATE if states >= LARGE_STATE else FWD_MIN_BLOCKS
    return LaunchConfig(S=S, WPM=WPM, R=R, K=K, parts=parts, states_per_part=states, fwd_min_blocks=fwd_min_blocks,
                        CH=CH, ntiles=ntiles, nbands=nbands, threads=threads, blocks=batch * groups * cpg, cpg=cpg,
                        smem_fwd=smem_fwd, smem_bwd=smem_bwd)


def uses_wave(batch: int, dim: int, height: int, width: int, groups: int, d_state: int) -> bool:
    """Whether the forward of this launch runs as a wavefront (`mamba2d_scan2d_fwd_wave`; see WAVE_MIN_STATES)."""
    if not WAVE_FORCE and (d_state < WAVE_MIN_STATES or height < WAVE_MIN_ROWS):
        return False
    wave = wave_config(d_state)
    if max(wave.smem(d_state), wave.smem_bwd(d_state, True)) > WAVE_MAX_SMEM:
        return False
    if WAVE_FORCE:
        return True
    return (wave_busy(height, width) >= WAVE_MIN_BUSY and batch * dim <= WAVE_MAX_MAPS
            and launch_config(batch, dim, height, width, groups, d_state).parts > 1)


def wave_busy(height: int, width: int) -> float:
    """Share of the wavefront's lane-steps that hold a pixel: rows over 32-row bands, columns over steps."""
    bands = _ceil_div(height, 32)
    return height / (32 * bands) * width / (width + min(32, height) - 1)


@dataclass(frozen=True)
class WaveConfig:
    """Launch of the wavefront kernels: one block of `warps` warps per map, `states_per_lane` states per warp."""

    states_per_lane: int
    warps: int

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def smem(self, d_state: int) -> int:
        """Bytes of the forward's staged tiles: dt, dt * u and D * u; B, C and the vertical states per state (and a
        zero state); each warp's partial y; the band's top row per state (layout at the top of the kernel)."""
        row = WAVE_STEPS + 1
        return 4 * ((3 + 3 * (d_state + 1) + self.warps) * 32 * row + (d_state + 1) * row)

    def smem_bwd(self, d_state: int, has_z: bool) -> int:
        """Bytes of the backward's tiles: dt, dt * u, u, dy and the softplus slope; B and C per state (and a zero
        state); each warp's shares of d u, d dt (with z: and of the ungated y, and dz's factor); three rows per
        state of band edges."""
        row = WAVE_STEPS + 1
        tiles = 5 + 2 * (d_state + 1) + 2 * self.warps + (self.warps + 1 if has_z else 0)
        return 4 * (tiles * 32 * row + 3 * (d_state + 1) * row)


#: States per lane the wavefront kernels are instantiated for (each adds 2 * WAVE_STEPS registers: the forward's
#: staged loads, the backward's recomputed states).
WAVE_LANE_STATES = (1, 2, 4)
#: Most shared memory a wavefront block takes (under every sm_80+ card's per-block limit, 99 KB on sm_86; two
#: blocks an SM on H100): N up to 24 states.
WAVE_MAX_SMEM = 96 * 1024


def wave_config(d_state: int) -> WaveConfig:
    per_lane = max(min(WAVE_STATES_PER_LANE, _pow2_at_least(d_state)),
                   _pow2_at_least(_ceil_div(d_state, MAX_THREADS // 32)))
    return WaveConfig(states_per_lane=per_lane, warps=_ceil_div(d_state, per_lane))


def wave_kernel_names(in_tag: str, out_tag: str, states_per_lane: int, has_z: bool,
                      cluster: int = 1) -> tuple[str, str]:
    """Name expressions of the wavefront forward and backward kernels of one variant (`cluster`: blocks of the
    backward's thread-block clusters)."""
    args = f"{in_tag}, {out_tag}, {states_per_lane}, {'true' if has_z else 'false'}"
    return f"mamba2d_scan2d_fwd_wave<{args}>", f"mamba2d_scan2d_bwd_wave<{args}, {cluster}>"


def wave_cluster_options(arch: int) -> tuple[int, ...]:
    """Cluster sizes of the wavefront backward compiled for sm_`arch` (clusters need sm_90)."""
    return (1, WAVE_CLUSTER) if arch >= WAVE_CLUSTER_MIN_ARCH and WAVE_CLUSTER > 1 else (1,)


def wave_cluster(dim: int, groups: int, arch: int) -> int:
    """Blocks per thread-block cluster of a wavefront backward launch on an sm_`arch` card: WAVE_CLUSTER where the
    card has clusters and each group's channels fill whole clusters, else 1."""
    cluster = max(wave_cluster_options(arch))
    return cluster if (dim // groups) % cluster == 0 else 1


def wave_band_tops(height: int, width: int, d_state: int) -> int:
    """Float32 elements per map of the wavefront forward's band tops (the vertical states of each band's last row
    but the bottom band's), which its backward restarts every band from."""
    return (height - 1) // 32 * d_state * width


def wave_chunks(height: int, width: int) -> int:
    """Staged chunks of the longest band of the wavefront kernels (W + 31 steps for a full band of 32 rows)."""
    return _ceil_div(width + min(32, height) - 1, WAVE_STEPS)


def wave_tile_index(height: int, width: int, d_state: int, code: int, device=None) -> torch.Tensor:
    """Where the wavefront backward's tile-ordered dB / dC of a map ([band][chunk][N][32 rows][WAVE_STEPS steps],
    `wave_chunks` chunks a band) holds each (state, row, column) of the map in direction `code`: an int64 index of
    N * H * W entries (on `device`). Lane r of a band's tile at step t holds the scan-frame pixel (32 * band + r,
    t - r)."""
    fr, fc = code & 1, (code >> 1) & 1
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    p = height - 1 - i if fr else i
    q = width - 1 - j if fc else j
    band, r = p // 32, p % 32
    chunk, step = (q + r) // WAVE_STEPS, (q + r) % WAVE_STEPS
    tile = 32 * WAVE_STEPS
    base = (band * wave_chunks(height, width) + chunk) * d_state * tile + r * WAVE_STEPS + step
    return (base.reshape(1, -1) + torch.arange(d_state, device=device).view(-1, 1) * tile).reshape(-1)


def wave_tile_elements(height: int, width: int, d_state: int) -> int:
    """Float32 elements per map of the wavefront backward's tile-ordered dB (or dC)."""
    return _ceil_div(height, 32) * wave_chunks(height, width) * d_state * 32 * WAVE_STEPS


def checkpoint_sizes(batch: int, dim: int, height: int, width: int, groups: int, d_state: int) -> tuple[int, int]:
    """Float32 elements of the two backward checkpoints: vertical state per band start, row state per tile start
    (the per-band kernels); the band tops and nothing (the wavefront kernels)."""
    if uses_wave(batch, dim, height, width, groups, d_state):
        return batch * dim * wave_band_tops(height, width, d_state), 0
    cfg = launch_config(batch, dim, height, width, groups, d_state)
    ckv = batch * dim * cfg.nbands * d_state * width
    ckh = batch * dim * cfg.ntiles * d_state * height if cfg.ntiles > 1 else 0
    return ckv, ckh


def direction_code(name: str) -> int:
    """Bit 0: start at the bottom row, bit 1: start at the right column, bit 2: columns first ("vh")."""
    corner, order = name.split("_")
    return int(corner[0] == "b") | (int(corner[1] == "r") << 1) | (int(order == "vh") << 2)
