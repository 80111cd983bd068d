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

extern "C" __global__ void kvbm_copy(const u64* __restrict__ table, unsigned int n) {
    for (unsigned int p = blockIdx.x; p < n; p += gridDim.x) {
        const u64 src = table[3 * (u64)p];
        const u64 dst = table[3 * (u64)p + 1];
        const u64 size = table[3 * (u64)p + 2];
        const u64 both = src | dst;
        const char* s = reinterpret_cast<const char*>(src);
        char* d = reinterpret_cast<char*>(dst);
        u64 bulk;  // bytes copied with the wide access; the tail, if any, byte by byte
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
}
