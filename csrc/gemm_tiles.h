// Register tiles of the decode GEMM (csrc/decode_gemm.cpp, its only includer), written once over a vector type:
// `Avx2` (8 float lanes, 16 registers) and `Avx512` (16 lanes, 32 registers). Each function carries its ISA's
// target attribute and is entered only after the run-time check of cpu_features.
//
// A tile is NR weight rows (output columns) x MR activation rows: NR*MR accumulators of W lanes, streamed along K.
// The weight rows are read from memory by the first pass over a tile's activation rows and from L1/L2 by the
// others, so a tile's passes would leave memory idle after the first: `Prefetcher` requests a later tile's cache
// lines evenly across all passes, keeping memory busy while the FMAs run (measured: 1.3-1.5x on weights streamed
// from DRAM, AMD EPYC Zen 4). The epilogue reduces the NR=4 accumulators of one activation row together (3 hadds)
// into 4 adjacent outputs.
#pragma once
#include "gemm_vectors.h"

#if PRMKERN_X86
namespace prmkern {
namespace {

constexpr int NB = 4;  // weight rows per tile, both ISAs (the 4-way epilogue reduction)

// Each ISA's copy of the tile loops (tile, tile_rows, gemm_range), in its own namespace.
#define PK_FN PRMKERN_AVX2
namespace avx2_tiles {
using V = Avx2;
#include "gemm_tile_loops.inc"
}  // namespace avx2_tiles
#undef PK_FN
#define PK_FN PRMKERN_AVX512
namespace avx512_tiles {
using V = Avx512;
#include "gemm_tile_loops.inc"
}  // namespace avx512_tiles
#undef PK_FN

}  // namespace
}  // namespace prmkern
#endif
