"""Build facts and launch plans of the CUDA 2D scan kernels, shared by the NVRTC launcher and the nvcc CI check.

Nothing here imports CuPy or touches a GPU: the compile options, the kernel sources (with their local includes
spliced in, so CuPy's on-disk cache key covers all of it), the instantiated kernel names, the tuning knobs
(`ScanTuning`, a frozen value passed down explicitly) and the launch plan of one call (`launch_plan`: a pure
function of the shapes, dtypes and tuning, also used by the fake/meta kernels) all live in this one place.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..resources import resource_dir
from .contract import ScanShape

#: Options given to NVRTC (through CuPy) and, with an -arch added, to nvcc in CI. No fast-math: the float32 path
#: must stay within 1e-5 of a float64 reference.
COMPILE_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: Sources of the scan kernels (in cuda_ops/, shipped as mamba2d._cuda_ops): the per-band kernels and the wavefront
#: kernels, each a translation unit of its own with the common header (scan2d_common.cuh) spliced in.
BAND_SOURCE = "scan2d_band.cu"
WAVE_SOURCE = "scan2d_wave.cu"
SCAN_SOURCES = (BAND_SOURCE, WAVE_SOURCE)
#: The C header declaring the kernels' parameter structs (mirrored by mamba2d.ops.cuda_launch's ctypes structs).
PARAMS_HEADER = "scan2d_params.cuh"

#: Rows of a band kept in registers per thread when each thread owns one column, by default; must equal M2D_R in
#: scan2d_common.cuh. A thread owning K columns keeps ROWS_PER_BAND // K rows (the same registers).
ROWS_PER_BAND = 4

#: Largest block; must equal M2D_MAX_THREADS (the kernels' __launch_bounds__).
MAX_THREADS = 256

#: Most threads per backward block on narrow maps (several slots per warp): the backward sums dB/dC over a block's
#: channel slots one after another, and with more slots per block that chain becomes the long pole. Must equal
#: M2D_NARROW_BWD_MAX_THREADS (the narrow backward's __launch_bounds__).
NARROW_BWD_MAX_THREADS = 128

#: With many states per block the forward loops over them per band and prefers more registers: from LARGE_STATE
#: states per block on, its occupancy target (a template argument) is FWD_MIN_BLOCKS_LARGE_STATE blocks per SM.
FWD_MIN_BLOCKS_LARGE_STATE = 2
LARGE_STATE = 8

MAX_D_STATE = 64  # the kernels' largest N

#: The wavefront kernels take maps with at least WAVE_MIN_ROWS rows where at least WAVE_MIN_BUSY of the wavefront's
#: lane-steps hold a pixel (a band of 32 rows takes W + 31 steps for W columns: 14 x 14 maps keep 23 % of them busy,
#: a 200 x 300 map 81 %), for at most WAVE_MAX_MAPS maps (batch x channels): many maps fill the GPU with per-band
#: blocks, and the wavefront backward's per-map costs (a second forward pass per band, the skewed chunks' idle
#: pixels) then lose. See `uses_wave`.
WAVE_MIN_ROWS = 8
WAVE_MIN_BUSY = 0.5
WAVE_MAX_MAPS = 2048
#: States per lane the wavefront kernels are instantiated for (each adds 2 * wave_steps registers: the forward's
#: staged loads, the backward's recomputed states).
WAVE_LANE_STATES = (1, 2, 4)
#: Most shared memory a wavefront block takes (under every sm_80+ card's per-block limit, 99 KB on sm_86, and two
#: blocks an SM on sm_90): N up to 24 states.
WAVE_MAX_SMEM = 96 * 1024
#: Thread-block clusters (the wavefront backward's dB/dC sum across blocks) need sm_90.
WAVE_CLUSTER_MIN_ARCH = 90


@dataclass(frozen=True)
class ScanTuning:
    """Knobs of the scan kernels' work split and compilation. The library always runs the defaults (`DEFAULT_TUNING`);
    benchmarks and tests pass another value explicitly (tools/scan_tuning.py builds one from MAMBA2D_SCAN_TUNE).

    Args:
        rows_per_band: rows of a band per thread with one column per thread (R; `-DM2D_R` when not the default).
        max_cols_per_thread: most consecutive columns per thread (KMAX): maps up to 32 * this wide are scanned along
            a row by a single warp. 1: one column per thread everywhere.
        row_lanes: maps wider than this many columns take several columns per thread (LANES).
        fwd_min_blocks: the forward's occupancy target in blocks per SM with few states per block (FWD; a template
            argument: it caps the registers).
        bwd_max_threads: most threads per backward block (BTHR); narrow maps take at most NARROW_BWD_MAX_THREADS.
        fwd_max_threads: most threads per forward block, as channel slots (FTHR): smaller blocks fill the register
            file in finer steps; a wide row's own warps are never split.
        split_target_blocks: a launch with fewer (batch, group, channel chunk) blocks than this splits its N states
            over several blocks when N > R (SPLIT; 0: never split).
        wide_cols_per_thread: columns per thread on maps wider than 32 * max_cols_per_thread (WIDEK): more columns
            mean fewer lane-scan steps per pixel and fewer tiles (one tile up to 1024 columns with four), fewer rows
            per band. Maps lower than a band take max_cols_per_thread and one row per band.
        narrow_pairs: maps 9-16 wide take two columns per thread (8 lanes per map, four maps per warp) (PAIRS).
        tile_warps: most warps across one tile of a map of one band (a 1D scan's (1, L) map) whose row is wider
            than a warp's columns, in a launch of many maps (TW); the row takes several tiles, one after another.
            Narrow tiles leave room in a block for more channels, whose dB and dC the backward sums in the block
            before it writes one partial sum per block, instead of one per channel. Maps of several bands take
            tiles as wide as a block holds (each band walks its tiles: narrow ones would multiply the serial steps),
            and so do launches that would then have fewer than `split_target_blocks` blocks (a batch-1 bag's long
            1D scan needs its parallelism across the row).
        vector_access: a thread's K columns move as one 8/16-byte access where the map rows allow it (VEC).
        bwd_min_blocks: `-DM2D_BWD_MIN_BLOCKS`, the backward's occupancy target (BWD; None: the header's).
        reduction_buffers: `-DM2D_RED_DBUF`, 1 for two dB/dC reduction buffers (one barrier per band and state),
            0 for one (DBUF; None: the header's).
        narrow_bwd_min_blocks: `-DM2D_NARROW_BWD_MIN_BLOCKS`, the narrow backward's occupancy target in blocks of
            NARROW_BWD_MAX_THREADS threads (BWDN; None: the header's).
        prefetch_rows: `-DM2D_PREFETCH`, bands of at most this many rows prefetch the next band into L1, 0 never
            (PF; None: the header's).
        lean_pointers: `-DM2D_LEAN`, 0 lets the compiler reassociate pointer arithmetic (LEAN; None: the header's).
        wave_min_states: the wavefront kernels take maps with at least this many states (WAVE=0 sets
            MAX_D_STATE + 1: never).
        force_wavefront: the wavefront kernels on every shape whose tiles fit (WAVE=1).
        wave_states_per_lane: fewest states a wavefront lane scans at once (WNS).
        wave_steps: steps of the wavefront staged in shared memory at once (WT; `-DM2D_WAVE_T` when not 8).
        wave_cluster: blocks per thread-block cluster of the wavefront backward on sm_90+ cards (WCL; 1: none).
    """

    rows_per_band: int = ROWS_PER_BAND
    max_cols_per_thread: int = 4
    row_lanes: int = 32
    fwd_min_blocks: int = 3
    bwd_max_threads: int = MAX_THREADS
    fwd_max_threads: int = 128
    split_target_blocks: int = 1024
    wide_cols_per_thread: int = 4
    narrow_pairs: bool = True
    tile_warps: int = 1
    vector_access: bool = True
    bwd_min_blocks: int | None = None
    reduction_buffers: int | None = None
    narrow_bwd_min_blocks: int | None = None
    prefetch_rows: int | None = None
    lean_pointers: int | None = None
    wave_min_states: int = 8
    force_wavefront: bool = False
    wave_states_per_lane: int = 2
    wave_steps: int = 8
    wave_cluster: int = 2

    def __post_init__(self) -> None:
        if self.tile_warps < 1:
            raise ValueError(f"ScanTuning: tile_warps must be at least 1, got {self.tile_warps}")
        # every launch looks its plan up by tuning: hash the fields once
        object.__setattr__(self, "_hash", hash(dataclasses.astuple(self)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def defines(self) -> tuple[str, ...]:
        """The `-D` compile options these knobs ask for (empty for the defaults of the kernels' header)."""
        out = []
        if self.rows_per_band != ROWS_PER_BAND:
            out.append(f"-DM2D_R={self.rows_per_band}")
        for macro, value in (("M2D_BWD_MIN_BLOCKS", self.bwd_min_blocks), ("M2D_RED_DBUF", self.reduction_buffers),
                             ("M2D_NARROW_BWD_MIN_BLOCKS", self.narrow_bwd_min_blocks),
                             ("M2D_PREFETCH", self.prefetch_rows), ("M2D_LEAN", self.lean_pointers)):
            if value is not None:
                out.append(f"-D{macro}={int(value)}")
        if self.wave_steps != 8:
            out.append(f"-DM2D_WAVE_T={self.wave_steps}")
        return tuple(out)

    @property
    def compile_options(self) -> tuple[str, ...]:
        """NVRTC's options for kernels built with these knobs."""
        return COMPILE_OPTIONS + self.defines


#: The tuning the library runs.
DEFAULT_TUNING = ScanTuning()


def band_shapes(tuning: ScanTuning = DEFAULT_TUNING) -> tuple[tuple[int, int], ...]:
    """Every (rows per band R, columns per thread K) the kernels are instantiated for.

    Args:
        tuning: The kernels' knobs.
    """
    shapes = [(tuning.rows_per_band, 1)]
    k = 2
    while k <= tuning.max_cols_per_thread:
        shapes.append((max(1, tuning.rows_per_band // k), k))
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
    return resource_dir("mamba2d._cuda_ops", "cuda_ops", BAND_SOURCE)


@lru_cache(maxsize=None)
def kernel_source(name: str) -> str:
    """The kernel source `name` with its local `#include "x.cuh"` lines replaced by the files' text (each file once).

    Args:
        name: A source file of `kernel_dir()` (e.g. BAND_SOURCE).
    """
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
    """(input, output) C++ storage types of a launch on `dtype` inputs, with a float32 output or one like the input.

    Args:
        dtype: The dtype of u, delta, B, C and z (a key of DTYPE_TAGS).
        out_fp32: The output is float32 (else the input's type).
    """
    tag = DTYPE_TAGS[dtype]
    return tag, ("float" if out_fp32 else tag)


def kernel_names(in_tag: str, out_tag: str, rows: int, cols: int, layout: int, has_z: bool,
                 fwd_min_blocks: int, float_grads: bool = False) -> tuple[str, str]:
    """Name expressions (NVRTC) of the per-band forward and backward kernels of one variant.

    Args:
        in_tag: C++ storage type of the inputs (DTYPE_TAGS).
        out_tag: C++ storage type of y (and of dout in the backward).
        rows: rows per band R.
        cols: columns per thread K.
        layout: how a slot's row maps onto a block (LAYOUTS).
        has_z: the z gate is applied in the kernels.
        fwd_min_blocks: the forward's occupancy target.
        float_grads: the backward writes du and ddelta in float32 (the partial sums of a state split) whatever the
            input dtype.

    Returns:
        (forward, backward) name expressions.
    """
    args = f"{in_tag}, {out_tag}, {rows}, {cols}, {layout}, {'true' if has_z else 'false'}"
    grad_tag = "float" if float_grads else in_tag
    return (f"mamba2d_scan2d_fwd<{args}, {fwd_min_blocks}>", f"mamba2d_scan2d_bwd<{args}, {grad_tag}>")


def fwd_min_blocks_options(tuning: ScanTuning = DEFAULT_TUNING) -> tuple[int, ...]:
    """Occupancy targets the forward kernels are instantiated for.

    Args:
        tuning: The kernels' knobs.
    """
    return tuple(dict.fromkeys((tuning.fwd_min_blocks, FWD_MIN_BLOCKS_LARGE_STATE)))


#: How a slot's row maps onto a block (the kernels' LAYOUT argument; M2D_NARROW/WARP_ROW/WIDE in scan2d_common.cuh):
#: several slots per warp (maps up to 16 thread columns), one full warp, or several warps or tiles.
LAYOUTS = {"narrow": 0, "warp_row": 1, "wide": 2}


def layout_options(cols: int, tuning: ScanTuning = DEFAULT_TUNING) -> tuple[int, ...]:
    """Row layouts a band shape is instantiated for (what launch_config can choose): several slots per warp or one
    warp per row for one column per thread (maps up to 32 wide), one warp or several per row for K > 1 (33-128
    columns, and wide maps), several slots per warp for K = 2 (maps 9-16 wide); wide rows of one column per thread
    only where the tuning asks for them.

    Args:
        cols: Columns per thread K of the band shape.
        tuning: The kernels' knobs.
    """
    if cols == 2 and tuning.narrow_pairs:
        return tuple(LAYOUTS.values())
    if cols > 1:
        return LAYOUTS["warp_row"], LAYOUTS["wide"]
    one_column_wide = tuning.max_cols_per_thread == 1 or tuning.wide_cols_per_thread == 1
    return tuple(LAYOUTS.values()) if one_column_wide else (LAYOUTS["narrow"], LAYOUTS["warp_row"])


def all_variants() -> list[tuple[str, str]]:
    """Every (input, output) dtype pair the launcher may compile: output float32 or the input dtype."""
    out = []
    for tag in DTYPE_TAGS.values():
        for out_tag in dict.fromkeys(("float", tag)):
            out.append((tag, out_tag))
    return out


def source_kernel_names(source: str, arch: int = 90, tuning: ScanTuning = DEFAULT_TUNING) -> list[str]:
    """Every kernel instantiation of a scan source that a launch on an sm_`arch` card may ask for.

    Args:
        source: BAND_SOURCE or WAVE_SOURCE.
        arch: The card's compute capability times ten (sm_90 and later add the clustered wavefront backward).
        tuning: The kernels' knobs.

    Raises:
        ValueError: When `source` is not one of SCAN_SOURCES.
    """
    if source == BAND_SOURCE:
        # a state split runs without the z gate (the launcher applies it) and with float32 partial gradients
        names = [name for variant in all_variants() for shape in band_shapes(tuning)
                 for layout in layout_options(shape[1], tuning) for has_z in (False, True)
                 for minb in fwd_min_blocks_options(tuning) for split in ((False, True) if not has_z else (False,))
                 for name in kernel_names(*variant, *shape, layout, has_z, minb, split)]
    elif source == WAVE_SOURCE:
        names = [name for variant in all_variants() for ns in WAVE_LANE_STATES for has_z in (False, True)
                 for cluster in wave_cluster_options(arch, tuning)
                 for name in wave_kernel_names(*variant, ns, has_z, cluster)]
    else:
        raise ValueError(f"unknown scan kernel source {source!r}; expected one of {SCAN_SOURCES}")
    return list(dict.fromkeys(names))  # the backward does not depend on the forward's occupancy target


def nvcc_translation_unit(source: str, arch: int = 90, tuning: ScanTuning = DEFAULT_TUNING) -> str:
    """Source for an nvcc check of scan source `source` for sm_`arch`: its kernels plus host code taking each
    instantiation's address (forces codegen).

    Args:
        source: BAND_SOURCE or WAVE_SOURCE.
        arch: The card's compute capability times ten.
        tuning: The kernels' knobs.
    """
    return _with_instantiations(source, source_kernel_names(source, arch, tuning))


def _with_instantiations(source: str, names) -> str:
    """The kernel source `source` followed by a reference to each kernel of `names` (nvcc then instantiates them,
    as NVRTC does for its name expressions)."""
    refs = ",\n    ".join(f"(void*)&{name}" for name in names)
    return kernel_source(source) + f"\n\nvoid* mamba2d_force_instantiation[] = {{\n    {refs}\n}};\n"


#: Source of the short-row layer-norm forward and backward (mamba2d.ops.cuda_layer_norm) and the longest row they
#: take (32 lanes x 32 values in registers); longer rows go to PyTorch's kernels.
LAYER_NORM_SOURCE = "layer_norm.cu"
LAYER_NORM_MAX_C = 1024
LAYER_NORM_THREADS = 256  # the kernels' __launch_bounds__
#: Most blocks of a layer-norm backward: each leaves one row of partial weight and bias gradients, summed after it.
LAYER_NORM_BWD_MAX_BLOCKS = 1024


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@lru_cache(maxsize=None)  # asked at every norm's launch, forward and backward
def layer_norm_lanes(channels: int) -> tuple[int, int]:
    """(lanes per row, values per lane) of the layer-norm kernel for rows of `channels` values: about 8 values per
    lane, lanes a power of two up to 32 (several rows per warp for short rows), values a power of two from 4.

    Args:
        channels: Values per row (the normalised dimension).
    """
    lanes = min(32, _pow2_at_least(_ceil_div(channels, 8)))
    return lanes, max(4, _pow2_at_least(_ceil_div(channels, lanes)))


def layer_norm_kernel_name(in_tag: str, out_tag: str, channels: int, branch_tag: str | None = None) -> str:
    """Name expression (NVRTC) of the layer-norm forward instantiation for rows of `channels` values.

    Args:
        in_tag: C++ storage type of the input (DTYPE_TAGS), and of the residual sum the fused variant writes.
        out_tag: C++ storage type of the output.
        channels: Values per row (`layer_norm_lanes` picks the template's lanes and values per lane).
        branch_tag: C++ storage type of the branch added to the input first (a residual sum's norm); None for a
            plain layer norm.
    """
    lanes, values = layer_norm_lanes(channels)
    return f"mamba2d_layer_norm_fwd<{in_tag}, {branch_tag or in_tag}, {out_tag}, {lanes}, {values}>"


def layer_norm_bwd_kernel_name(kept_tag: str, in_tag: str, channels: int, branch_tag: str | None = None) -> str:
    """Name expression (NVRTC) of the layer-norm backward instantiation for rows of `channels` values.

    Args:
        kept_tag: C++ storage type of the input as the forward kept it and of the output's gradient.
        in_tag: C++ storage type of the input (the input gradient's).
        channels: Values per row (the forward's lanes and values per lane).
        branch_tag: C++ storage type of the branch gradient of a residual sum's norm; None for a plain layer norm.
    """
    lanes, values = layer_norm_lanes(channels)
    return f"mamba2d_layer_norm_bwd<{kept_tag}, {in_tag}, {branch_tag or in_tag}, {lanes}, {values}>"


def nvcc_layer_norm_translation_unit() -> str:
    """The layer-norm kernels with every instantiation a row length up to LAYER_NORM_MAX_C and a dtype triple use."""
    tags = list(DTYPE_TAGS.values())
    names = dict.fromkeys(name for i in tags for o in tags for b in tags for c in range(1, LAYER_NORM_MAX_C + 1)
                          for name in (layer_norm_kernel_name(i, o, c, b), layer_norm_bwd_kernel_name(o, i, c, b),
                                       layer_norm_bwd_kernel_name(i, i, c, b)))
    return _with_instantiations(LAYER_NORM_SOURCE, names)


#: Source of the layout copies (mamba2d.ops.cuda_layout), the element types they move by element size, and their
#: threads per block (the kernel's __launch_bounds__).
LAYOUT_SOURCE = "layout.cu"
LAYOUT_ELEMENT_TYPES = {2: "unsigned short", 4: "unsigned int"}
LAYOUT_THREADS = 256


def layout_tile(itemsize: int) -> int:
    """Elements per side of the layout copy's square tile (128 bytes a side) for elements of `itemsize` bytes.

    Args:
        itemsize: Bytes per element (a key of LAYOUT_ELEMENT_TYPES).
    """
    return 128 // itemsize


def layout_kernel_name(itemsize: int) -> str:
    """Name expression (NVRTC) of the layout copy of elements of `itemsize` bytes.

    Args:
        itemsize: Bytes per element (a key of LAYOUT_ELEMENT_TYPES).
    """
    return f"mamba2d_layout_swap<{LAYOUT_ELEMENT_TYPES[itemsize]}>"


#: Group counts the groups' sum written channels_last (float32 maps) is instantiated for: the 2D mixer's four
#: routes, and pairs.
GROUP_SUM_GROUPS = (2, 4)


def group_sum_kernel_name(groups: int) -> str:
    """Name expression (NVRTC) of the groups' sum written channels_last.

    Args:
        groups: G, one of GROUP_SUM_GROUPS.
    """
    return f"mamba2d_group_sum_cl<{groups}>"


def silu_kernel_names(tag: str) -> tuple[str, str]:
    """Name expressions (NVRTC) of the SiLU written in both layouts, (forward, backward), on maps of `tag`.

    Args:
        tag: C++ storage type of the map (DTYPE_TAGS).
    """
    return f"mamba2d_silu_both_fwd<{tag}>", f"mamba2d_silu_both_bwd<{tag}>"


def nvcc_layout_translation_unit() -> str:
    """The layout copy, the groups' sum written channels_last and the SiLU in both layouts with each of their
    instantiations."""
    names = [layout_kernel_name(size) for size in LAYOUT_ELEMENT_TYPES]
    names += [group_sum_kernel_name(g) for g in GROUP_SUM_GROUPS]
    names += [name for tag in DTYPE_TAGS.values() for name in silu_kernel_names(tag)]
    return _with_instantiations(LAYOUT_SOURCE, names)


@dataclass(frozen=True)
class LaunchConfig:
    """Work split of one per-band launch (see the comment at the top of scan2d_band.cu).

    Args:
        S: Lanes per slot segment (a power of two up to 32).
        WPM: Warps per slot (above 1 only when S == 32).
        R: Rows per band.
        K: Consecutive columns per thread.
        parts: Blocks per channel chunk, each owning `states_per_part` of the N states (grid y).
        states_per_part: States per block.
        fwd_min_blocks: The forward's occupancy target (a template argument of the forward kernel).
        CH: Channel slots per block.
        ntiles: Column tiles walked by each block.
        nbands: Row bands of R rows.
        threads: Threads per block.
        blocks: Grid x: batch x groups x channel chunks.
        cpg: Channel chunks (blocks) per (batch, group).
        smem_fwd: Bytes of dynamic shared memory of the forward.
        smem_bwd: Bytes of dynamic shared memory of the backward.
    """

    S: int
    WPM: int
    R: int
    K: int
    parts: int
    states_per_part: int
    fwd_min_blocks: int
    CH: int
    ntiles: int
    nbands: int
    threads: int
    blocks: int
    cpg: int
    smem_fwd: int
    smem_bwd: int

    @property
    def tile_width(self) -> int:
        """Pixel columns one tile of a block covers: S lanes x WPM warps x K columns per thread."""
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
                  backward: bool = False, tuning: ScanTuning = DEFAULT_TUNING) -> LaunchConfig:
    """Work split of the per-band forward (or, with `backward`, backward) launch; both walk the same bands and tiles
    and split the states alike, so the checkpoints written by one are read by the other whatever their channel
    slots per block.

    Args:
        batch: Batch size.
        dim: Channels.
        height: Rows H of the map.
        width: Columns W of the map.
        groups: B/C groups G.
        d_state: States N per channel.
        backward: Split the backward launch (else the forward).
        tuning: The kernels' knobs.
    """
    batch, dim, height, width, groups, d_state = (int(v) for v in (batch, dim, height, width, groups, d_state))
    whole = _launch_config(batch, dim, height, width, groups, d_state, 1, False, tuning)
    parts = state_parts(whole.blocks, d_state, whole.R, tuning.split_target_blocks)
    if parts == 1 and not backward:
        return whole
    return _launch_config(batch, dim, height, width, groups, d_state, parts, backward, tuning)


def state_parts(blocks: int, d_state: int, rows: int, target_blocks: int = DEFAULT_TUNING.split_target_blocks) -> int:
    """Blocks per channel chunk when `blocks` chunks are too few for the GPU: as many parts as bring the launch to
    `target_blocks`, none empty. Only for N > R, where the backward rebuilds the checkpoints with the forward
    kernel anyway (so a split never costs a saved checkpoint).

    Args:
        blocks: Channel-chunk blocks of the launch without a split.
        d_state: States N per channel.
        rows: Rows per band R.
        target_blocks: The block count a split aims for.
    """
    if d_state <= rows or blocks >= target_blocks:
        return 1
    per_part = _ceil_div(d_state, min(d_state, _ceil_div(target_blocks, blocks)))
    return _ceil_div(d_state, per_part)


def _launch_config(batch: int, dim: int, height: int, width: int, groups: int, d_state: int, parts: int,
                   backward: bool, t: ScanTuning) -> LaunchConfig:
    dg = dim // groups
    states = _ceil_div(d_state, parts)  # states per block
    kmax = t.max_cols_per_thread
    # Up to 32 * kmax columns: one warp per row, K consecutive columns per thread, R * K pixels per thread as with
    # one column (registers stay the same).
    K = 1
    if t.row_lanes < width <= 32 * kmax:
        K = min(kmax, 1 << (_ceil_div(width, t.row_lanes) - 1).bit_length())
    elif t.narrow_pairs and kmax > 1 and 8 < width <= 16:
        K = 2
    elif width > 32 * kmax and t.wide_cols_per_thread > 1:
        # fewer lanes per row: fewer lane-scan steps per pixel and fewer tiles
        K = min(kmax, t.wide_cols_per_thread if height >= t.rows_per_band else kmax)
    R = max(1, t.rows_per_band // K) if K > 1 else t.rows_per_band
    cols = _ceil_div(width, K)  # thread columns
    # Shared memory per thread in the backward: an [N][K] float and an [N] double array (+ the two dB/dC reduction
    # buffers); keep a block under ~96 KB so that two blocks fit an SM. MAX_THREADS is the kernels' __launch_bounds__.
    max_threads = max(64, min(MAX_THREADS, (98304 // ((4 * K + 8) * states + 16 * R * K + 48)) // 32 * 32))
    # Forward and backward take their own channel slots per block; the tiles depend on max_threads only, so the
    # backward walks the forward's (shared checkpoints).
    slot_threads = min(max_threads, t.bwd_max_threads if backward else t.fwd_max_threads)
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
        tile_warps = max_threads // 32
        # narrow tiles only on a one-band map, and only where the launch keeps enough blocks (see tile_warps)
        if height <= R and batch * dim // max(1, tile_warps // t.tile_warps) >= t.split_target_blocks:
            tile_warps = min(tile_warps, t.tile_warps)
        ntiles = _ceil_div(warps, tile_warps)
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
    fwd_min_blocks = FWD_MIN_BLOCKS_LARGE_STATE if states >= LARGE_STATE else t.fwd_min_blocks
    return LaunchConfig(S=S, WPM=WPM, R=R, K=K, parts=parts, states_per_part=states, fwd_min_blocks=fwd_min_blocks,
                        CH=CH, ntiles=ntiles, nbands=nbands, threads=threads, blocks=batch * groups * cpg, cpg=cpg,
                        smem_fwd=smem_fwd, smem_bwd=smem_bwd)


def uses_wave(batch: int, dim: int, height: int, width: int, groups: int, d_state: int,
              tuning: ScanTuning = DEFAULT_TUNING) -> bool:
    """Whether this launch runs the wavefront kernels (`mamba2d_scan2d_fwd_wave` and `_bwd_wave`: one block per map,
    one lane per row, no lane scans) rather than the per-band ones.

    They take few, large maps with many states, where the per-band forward would run short of blocks and split its
    states (a slide's grid in 2DMambaMIL): at least `tuning.wave_min_states` states and WAVE_MIN_ROWS rows, at least
    WAVE_MIN_BUSY of the lane-steps busy, at most WAVE_MAX_MAPS maps, and tiles that fit WAVE_MAX_SMEM (forward and
    backward). `tuning.force_wavefront`: every shape whose tiles fit. A launch takes both wavefront kernels or
    neither.

    Args:
        batch: Batch size.
        dim: Channels.
        height: Rows H of the map.
        width: Columns W of the map.
        groups: B/C groups G.
        d_state: States N per channel.
        tuning: The kernels' knobs.
    """
    force = tuning.force_wavefront
    if not force and (d_state < tuning.wave_min_states or height < WAVE_MIN_ROWS):
        return False
    wave = wave_config(d_state, tuning)
    if max(wave.smem(d_state), wave.smem_bwd(d_state, True)) > WAVE_MAX_SMEM:
        return False
    if force:
        return True
    return (wave_busy(height, width) >= WAVE_MIN_BUSY and batch * dim <= WAVE_MAX_MAPS
            and launch_config(batch, dim, height, width, groups, d_state, False, tuning).parts > 1)


def wave_busy(height: int, width: int) -> float:
    """Share of the wavefront's lane-steps that hold a pixel: rows over 32-row bands, columns over steps.

    Args:
        height: Rows H of the map.
        width: Columns W of the map.
    """
    bands = _ceil_div(height, 32)
    return height / (32 * bands) * width / (width + min(32, height) - 1)


@dataclass(frozen=True)
class WaveConfig:
    """Launch of the wavefront kernels: one block per map, each lane of a warp one row of a 32-row band.

    Args:
        states_per_lane: States each lane scans at once (the warp's share of the N states).
        warps: Warps per block.
        steps: Steps of the wavefront staged in shared memory at once (M2D_WAVE_T).
    """

    states_per_lane: int
    warps: int
    steps: int = DEFAULT_TUNING.wave_steps

    @property
    def threads(self) -> int:
        """Threads per block."""
        return 32 * self.warps

    def smem(self, d_state: int) -> int:
        """Bytes of the forward's staged tiles: dt, dt * u and D * u; B, C and the vertical states per state (and a
        zero state); each warp's partial y; the band's top row per state (layout at the top of the kernel).

        Args:
            d_state: States N per channel.
        """
        row = self.steps + 1
        return 4 * ((3 + 3 * (d_state + 1) + self.warps) * 32 * row + (d_state + 1) * row)

    def smem_bwd(self, d_state: int, has_z: bool) -> int:
        """Bytes of the backward's tiles: dt, dt * u, u, dy and the softplus slope; B and C per state (and a zero
        state); each warp's shares of d u, d dt (with z: and of the ungated y, and dz's factor); three rows per
        state of band edges.

        Args:
            d_state: States N per channel.
            has_z: The z gate is applied in the kernel.
        """
        row = self.steps + 1
        tiles = 5 + 2 * (d_state + 1) + 2 * self.warps + (self.warps + 1 if has_z else 0)
        return 4 * (tiles * 32 * row + 3 * (d_state + 1) * row)


def wave_config(d_state: int, tuning: ScanTuning = DEFAULT_TUNING) -> WaveConfig:
    """The wavefront launch of maps with `d_state` states: at least `tuning.wave_states_per_lane` states a lane, and
    no more warps than a block holds.

    Args:
        d_state: States N per channel.
        tuning: The kernels' knobs.
    """
    per_lane = max(min(tuning.wave_states_per_lane, _pow2_at_least(d_state)),
                   _pow2_at_least(_ceil_div(d_state, MAX_THREADS // 32)))
    return WaveConfig(states_per_lane=per_lane, warps=_ceil_div(d_state, per_lane), steps=tuning.wave_steps)


def wave_kernel_names(in_tag: str, out_tag: str, states_per_lane: int, has_z: bool,
                      cluster: int = 1) -> tuple[str, str]:
    """Name expressions (NVRTC) of the wavefront forward and backward kernels of one variant.

    Args:
        in_tag: C++ storage type of the inputs (DTYPE_TAGS).
        out_tag: C++ storage type of y (and of dout in the backward).
        states_per_lane: States a lane scans at once (WAVE_LANE_STATES).
        has_z: The z gate is applied in the kernels.
        cluster: Blocks per thread-block cluster of the backward (1: none).

    Returns:
        (forward, backward) name expressions.
    """
    args = f"{in_tag}, {out_tag}, {states_per_lane}, {'true' if has_z else 'false'}"
    return f"mamba2d_scan2d_fwd_wave<{args}>", f"mamba2d_scan2d_bwd_wave<{args}, {cluster}>"


def wave_cluster_options(arch: int, tuning: ScanTuning = DEFAULT_TUNING) -> tuple[int, ...]:
    """Cluster sizes of the wavefront backward compiled for sm_`arch` (clusters need sm_90).

    Args:
        arch: The card's compute capability times ten.
        tuning: The kernels' knobs.
    """
    cluster = tuning.wave_cluster
    return (1, cluster) if arch >= WAVE_CLUSTER_MIN_ARCH and cluster > 1 else (1,)


def wave_cluster(dim: int, groups: int, arch: int, tuning: ScanTuning = DEFAULT_TUNING) -> int:
    """Blocks per thread-block cluster of a wavefront backward launch on an sm_`arch` card: `tuning.wave_cluster`
    consecutive channels of a group where the card has clusters and each group's channels fill whole clusters (the
    cluster adds their dB/dC tiles in shared memory before they leave the SMs), else 1.

    Args:
        dim: Channels.
        groups: B/C groups G.
        arch: The card's compute capability times ten.
        tuning: The kernels' knobs.
    """
    cluster = max(wave_cluster_options(arch, tuning))
    return cluster if (dim // groups) % cluster == 0 else 1


def wave_band_tops(height: int, width: int, d_state: int) -> int:
    """Float32 elements per map of the wavefront forward's band tops (the vertical states of each band's last row
    but the bottom band's), which its backward restarts every band from.

    Args:
        height: Rows H of the map.
        width: Columns W of the map.
        d_state: States N per channel.
    """
    return (height - 1) // 32 * d_state * width


def wave_chunks(height: int, width: int, steps: int = DEFAULT_TUNING.wave_steps) -> int:
    """Staged chunks of the longest band of the wavefront kernels (W + 31 steps for a full band of 32 rows).

    Args:
        height: Rows H of the map.
        width: Columns W of the map.
        steps: Steps per staged chunk.
    """
    return _ceil_div(width + min(32, height) - 1, steps)


def wave_tile_index(height: int, width: int, d_state: int, code: int, device=None,
                    steps: int = DEFAULT_TUNING.wave_steps) -> torch.Tensor:
    """Where the wavefront backward's tile-ordered dB / dC of a map ([band][chunk][N][32 rows][`steps` steps],
    `wave_chunks` chunks a band) holds each (state, row, column) of the map in direction `code`: an int64 index of
    N * H * W entries (on `device`). Lane r of a band's tile at step t holds the scan-frame pixel (32 * band + r,
    t - r).

    Args:
        height: Rows H of the map.
        width: Columns W of the map.
        d_state: States N per channel.
        code: The direction's `direction_code` (its flips place the scan frame's origin).
        device: Where the index is built (None: PyTorch's default device).
        steps: Steps per staged chunk.
    """
    fr, fc = code & 1, (code >> 1) & 1
    i = torch.arange(height, device=device).view(-1, 1)
    j = torch.arange(width, device=device).view(1, -1)
    p = height - 1 - i if fr else i
    q = width - 1 - j if fc else j
    band, r = p // 32, p % 32
    chunk, step = (q + r) // steps, (q + r) % steps
    tile = 32 * steps
    base = (band * wave_chunks(height, width, steps) + chunk) * d_state * tile + r * steps + step
    return (base.reshape(1, -1) + torch.arange(d_state, device=device).view(-1, 1) * tile).reshape(-1)


def wave_tile_elements(height: int, width: int, d_state: int, steps: int = DEFAULT_TUNING.wave_steps) -> int:
    """Float32 elements per map of the wavefront backward's tile-ordered dB (or dC).

    Args:
        height: Rows H of the map.
        width: Columns W of the map.
        d_state: States N per channel.
        steps: Steps per staged chunk.
    """
    return _ceil_div(height, 32) * wave_chunks(height, width, steps) * d_state * 32 * steps


@dataclass(frozen=True)
class LaunchPlan:
    """One launch of the scan's forward or backward kernel, decided once per call by `launch_plan`.

    Args:
        backward: a backward launch (else a forward one).
        wave: the wavefront kernels (scan2d_wave.cu), else the per-band ones (scan2d_band.cu).
        band: the per-band work split (None for the wavefront kernels).
        wave_cfg: the wavefront launch (None for the per-band kernels).
        split: the N states are split over `band.parts` blocks: the kernel writes float32 partial sums (y forward;
            du, ddelta, dD, d(delta_bias) backward) without the z gate, which the launcher sums and gates.
        gate_in_kernel: the kernel applies the z gate (z given and the states not split).
        out_fp32: the kernel's y (forward) or dout (backward) is float32.
        ckv_numel: float32 elements of the first checkpoint: the vertical state at each band start (per-band) or the
            band tops (wavefront).
        ckh_numel: float32 elements of the second: the row state at each tile start (per-band maps of several tiles),
            else 0.
        keeps_checkpoint: the forward keeps its checkpoint for the backward when asked to (per-band: only while no
            larger than u in float32; the wavefront's band tops always are).
        largest_offset: the largest in-map element offset the kernels index with 32-bit integers.
        vector_cols: K where a thread's K columns may move as one vector access (W a multiple of K), else 0.
        wave_chunks: staged chunks of the wavefront's longest band (0 for the per-band kernels).
        wave_tile_elements: float32 elements per map of the wavefront backward's tile-ordered dB (or dC).
        cluster: blocks per thread-block cluster of the wavefront backward (1 elsewhere).
        source: the kernel source file (SCAN_SOURCES).
        kernels: the (forward, backward) name expressions of the variant, compiled together.
        kernel: the name expression this launch runs.
        compile_options: NVRTC's options for these kernels.
        grid: (x, y) blocks.
        threads: threads per block.
        smem: bytes of dynamic shared memory per block.
    """

    backward: bool
    wave: bool
    band: LaunchConfig | None
    wave_cfg: WaveConfig | None
    split: bool
    gate_in_kernel: bool
    out_fp32: bool
    ckv_numel: int
    ckh_numel: int
    keeps_checkpoint: bool
    largest_offset: int
    vector_cols: int
    wave_chunks: int
    wave_tile_elements: int
    cluster: int
    source: str
    kernels: tuple[str, str]
    kernel: str
    compile_options: tuple[str, ...]
    grid: tuple[int, int]
    threads: int
    smem: int


@lru_cache(maxsize=1024)
def launch_plan(shape: ScanShape, dtype: torch.dtype, *, backward: bool, has_z: bool, out_fp32: bool, arch: int = 0,
                tuning: ScanTuning = DEFAULT_TUNING) -> LaunchPlan:
    """The launch of one forward or backward call of the scan.

    Args:
        shape: the call's sizes (mamba2d.ops.contract.ScanShape).
        dtype: the dtype of u, delta, B, C and z (DTYPE_TAGS).
        backward: plan the backward kernel (else the forward).
        has_z: the z gate is given.
        out_fp32: forward: y is float32; backward: the incoming gradient dout is float32.
        arch: the card's compute capability times ten (decides the wavefront backward's clusters); 0 where no card
            is involved (fake tensors).
        tuning: the kernels' knobs.

    Returns:
        The frozen plan.
    """
    b, dim, h, w, g, n = shape.batch, shape.dim, shape.height, shape.width, shape.groups, shape.d_state
    in_tag = DTYPE_TAGS[dtype]
    options = tuning.compile_options
    if uses_wave(b, dim, h, w, g, n, tuning):
        wave = wave_config(n, tuning)
        cluster = wave_cluster(dim, g, arch, tuning) if backward else 1
        kernels = wave_kernel_names(in_tag, "float" if out_fp32 else in_tag, wave.states_per_lane, has_z, cluster)
        return LaunchPlan(
            backward=backward, wave=True, band=None, wave_cfg=wave, split=False, gate_in_kernel=has_z,
            out_fp32=out_fp32, ckv_numel=b * dim * wave_band_tops(h, w, n), ckh_numel=0, keeps_checkpoint=True,
            largest_offset=n * h * w, vector_cols=0, wave_chunks=wave_chunks(h, w, wave.steps),
            wave_tile_elements=wave_tile_elements(h, w, n, wave.steps), cluster=cluster, source=WAVE_SOURCE,
            kernels=kernels, kernel=kernels[int(backward)], compile_options=options, grid=(b * dim, 1),
            threads=wave.threads, smem=wave.smem_bwd(n, has_z) if backward else wave.smem(n))
    fwd = launch_config(b, dim, h, w, g, n, False, tuning)
    cfg = launch_config(b, dim, h, w, g, n, True, tuning) if backward else fwd
    split = cfg.parts > 1
    gate = has_z and not split
    # a split writes float32 partial y; its backward takes the gated gradient in float32 (gated by the launcher)
    kernel_fp32 = out_fp32 or (split and (not backward or has_z))
    kernels = kernel_names(in_tag, "float" if kernel_fp32 else in_tag, cfg.R, cfg.K, cfg.layout, gate,
                           cfg.fwd_min_blocks, split)
    vector_cols = cfg.K if cfg.K > 1 and w % cfg.K == 0 and tuning.vector_access else 0
    return LaunchPlan(
        backward=backward, wave=False, band=cfg, wave_cfg=None, split=split, gate_in_kernel=gate,
        out_fp32=kernel_fp32, ckv_numel=b * dim * fwd.nbands * n * w,
        ckh_numel=b * dim * fwd.ntiles * n * h if fwd.ntiles > 1 else 0, keeps_checkpoint=n <= fwd.R,
        largest_offset=max(n * h * w, fwd.nbands * n * w), vector_cols=vector_cols, wave_chunks=0,
        wave_tile_elements=0, cluster=1, source=BAND_SOURCE, kernels=kernels, kernel=kernels[int(backward)],
        compile_options=options, grid=(cfg.blocks, cfg.parts), threads=cfg.threads,
        smem=cfg.smem_bwd if backward else cfg.smem_fwd)


def direction_code(name: str) -> int:
    """The kernels' integer code of a direction name.

    Bit 0: start at the bottom row, bit 1: start at the right column, bit 2: columns first ("vh").

    Args:
        name: One of `DIRECTIONS` (`{tl,tr,bl,br}_{hv,vh}`).
    """
    corner, order = name.split("_")
    return int(corner[0] == "b") | (int(corner[1] == "r") << 1) | (int(order == "vh") << 2)
