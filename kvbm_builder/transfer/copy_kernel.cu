// The batched copy kernel of kvbm_builder.transfer: one launch moves every piece of a transfer.
//
// table holds n pieces as (src, dst, size) triples of 64-bit words; the addresses are device pointers (GPU memory,
// or the device alias of mapped pinned host memory, which the GPU reads and writes over PCIe directly).
// Each thread block copies whole pieces (grid-stride over pieces when the grid is smaller than n), with the widest
// access that the piece's two addresses allow (16, 8, 4 or 1 byte; a tail shorter than that, byte by byte).
// KVBM_UNROLL independent loads are issued before the first store, so that enough reads are in flight to cover
// PCIe latency. Loads and stores are global and streaming (evict-first): every byte is touched once.
//
// Built by cupy's NVRTC at first use; `nvcc -arch=sm_90 -cubin -Xptxas -v` reads its registers and spills.

#ifndef KVBM_UNROLL
#define KVBM_UNROLL 4
#endif

typedef unsigned long long u64;

template <typename T>
__device__ __forceinline__ void copy_words(const char* __restrict__ src, char* __restrict__ dst, u64 bytes) {
    const T* __restrict__ s = reinterpret_cast<const T*>(src);
    T* __restrict__ d = reinterpret_cast<T*>(dst);
    const u64 n = bytes / sizeof(T);
    const u64 stride = blockDim.x;
    u64 i = threadIdx.x;
    for (; i + (KVBM_UNROLL - 1) * stride < n; i += KVBM_UNROLL * stride) {
        T v[KVBM_UNROLL];
#pragma unroll
        for (int k = 0; k < KVBM_UNROLL; ++k) v[k] = __ldcs(s + i + k * stride);
#pragma unroll
        for (int k = 0; k < KVBM_UNROLL; ++k) __stcs(d + i + k * stride, v[k]);
    }
    for (; i < n; i += stride) __stcs(d + i, __ldcs(s + i));
}

__device__ __forceinline__ void copy_piece(u64 src, u64 dst, u64 size) {
    const u64 both = src | dst;
    const char* s = reinterpret_cast<const char*>(src);
    char* d = reinterpret_cast<char*>(dst);
    u64 bulk;
    if ((both & 15) == 0) {
        bulk = size & ~15ull;
        copy_words<uint4>(s, d, bulk);
    } else if ((both & 7) == 0) {
        bulk = size & ~7ull;
        copy_words<uint2>(s, d, bulk);
    } else if ((both & 3) == 0) {
        bulk = size & ~3ull;
        copy_words<unsigned int>(s, d, bulk);
    } else {
        bulk = 0;
    }
    if (bulk < size) copy_words<unsigned char>(s + bulk, d + bulk, size - bulk);
}

extern "C" __global__ void kvbm_copy(const u64* __restrict__ table, unsigned int n) {
    for (unsigned int p = blockIdx.x; p < n; p += gridDim.x) {
        const u64 src = table[3 * (u64)p];
        const u64 dst = table[3 * (u64)p + 1];
        const u64 size = table[3 * (u64)p + 2];
        copy_piece(src, dst, size);
    }
}

// The structured form: the GPU works out every address itself from the two layouts' strides and the block ids,
// so the host writes a few hundred bytes per launch instead of a table of every region.
//
// p (mapped pinned memory, read once per thread block) holds, as 64-bit words:
//   [0] n_pairs        [1] chunks per block  [2] pieces per chunk  [3] chunk bytes  [4] piece bytes
//   [5] outer_dim      [6] chunk mode (0: a chunk is one region, 1: all outer regions of a layer, 2: a whole block)
//   [7..10]  source block stride, layer stride (0 when each layer is its own allocation), outer stride, separate
//   [11..14] target block stride, layer stride, outer stride, separate
//   [15] offset of the source bases, [16] of the target bases, [17] of the source ids, [18] of the target ids
// then the bases (one per layer when separate, else one) and the block ids, at the offsets given (in words).

__device__ __forceinline__ u64 side_address(const u64* __restrict__ p, int side, u64 block, u64 layer, u64 outer) {
    const u64* q = p + 7 + 4 * side;  // block stride, layer stride, outer stride, separate
    const u64* bases = p + p[15 + side];
    const u64 base = q[3] ? bases[layer] : bases[0];
    return base + block * q[0] + layer * q[1] + outer * q[2];
}

extern "C" __global__ void kvbm_copy_blocks(const u64* __restrict__ p, unsigned int n) {
    __shared__ u64 job[4];  // src, dst, size of this thread block's piece
    for (unsigned int g = blockIdx.x; g < n; g += gridDim.x) {
        if (threadIdx.x == 0) {
            const u64 chunks = p[1], pieces = p[2], chunk_bytes = p[3], piece_bytes = p[4], outer_dim = p[5];
            const u64 per_block = chunks * pieces;
            const u64 pair = g / per_block;
            const u64 rest = g - pair * per_block;
            const u64 chunk = rest / pieces;
            const u64 piece = rest - chunk * pieces;
            u64 layer = 0, outer = 0;
            if (p[6] == 0) {
                layer = chunk / outer_dim;
                outer = chunk - layer * outer_dim;
            } else if (p[6] == 1) {
                layer = chunk;
            }
            const u64 offset = piece * piece_bytes;
            const u64 left = chunk_bytes - offset;
            job[0] = side_address(p, 0, p[p[17] + pair], layer, outer) + offset;
            job[1] = side_address(p, 1, p[p[18] + pair], layer, outer) + offset;
            job[2] = left < piece_bytes ? left : piece_bytes;
        }
        __syncthreads();
        copy_piece(job[0], job[1], job[2]);
        __syncthreads();
    }
}
