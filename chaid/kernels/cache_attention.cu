// Cache Attention forward: softmax(q k^T / sqrt(D)) v, per (row, head), online softmax.
//
// Layout (all contiguous): q [N, H, Lq, D], k and v [N, H, Lk, D], out [N, H, Lq, D].
// One block serves WARPS * ROWS_PER_WARP query rows of one (n, h); each warp owns
// ROWS_PER_WARP rows. Key/value tiles of TILE_K (= 32, one per lane) rows are staged in
// shared memory as fp32 with a padded stride so lanes reading different keys hit
// different banks. For a tile, lane j computes the score of key j against the row's
// query (held in shared memory), the warp reduces max and sum with shuffles, and each lane
// accumulates output dims d = lane, lane + 32, ... (at most 4 for D <= 128).
//
// Element types are handled without CUDA headers so NVRTC needs no include path:
// fp16 via PTX cvt, bf16 via bit shifts with round-to-nearest-even.

#define WARPS 8
#define ROWS_PER_WARP 2
#define TILE_K 32
#define MAX_D 128
#define DIMS_PER_LANE (MAX_D / 32)
// -inf without math headers (NVRTC compiles this file with no include path).
#define NEG_INF __int_as_float(0xff800000)

typedef unsigned short raw16;


struct F32 {
    typedef float T;
    __device__ static __forceinline__ float to_f(T x) { return x; }
    __device__ static __forceinline__ T from_f(float x) { return x; }
};

struct F16 {
    typedef raw16 T;
    __device__ static __forceinline__ float to_f(T x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    __device__ static __forceinline__ T from_f(float f) {
        raw16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct BF16 {
    typedef raw16 T;
    __device__ static __forceinline__ float to_f(T x) {
        return __uint_as_float(((unsigned int)x) << 16);
    }
    __device__ static __forceinline__ T from_f(float f) {
        unsigned int u = __float_as_uint(f);
        if ((u & 0x7f800000u) == 0x7f800000u) {  // inf or nan: keep, force a nan bit
            return (raw16)((u >> 16) | ((u & 0xffffu) ? 0x40u : 0u));
        }
        u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
        return (raw16)(u >> 16);
    }
};

__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename E>
__device__ void cache_attention_impl(
    const typename E::T* __restrict__ q,
    const typename E::T* __restrict__ k,
    const typename E::T* __restrict__ v,
    typename E::T* __restrict__ out,
    int lq, int lk, int d, float scale)
{
    extern __shared__ float smem[];
    const int stride = d + 1;                       // padded row stride (bank conflicts)
    float* ks = smem;                               // [TILE_K][stride]
    float* vs = ks + TILE_K * stride;               // [TILE_K][stride]
    float* qs = vs + TILE_K * stride;               // [WARPS * ROWS_PER_WARP][stride]

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nh = blockIdx.y;                      // n * heads + h
    const int rows_per_block = WARPS * ROWS_PER_WARP;
    const int row0 = blockIdx.x * rows_per_block;

    const long q_base = (long)nh * lq * d;
    const long kv_base = (long)nh * lk * d;

    // Stage this block's queries, pre-scaled, as fp32.
    for (int i = threadIdx.x; i < rows_per_block * d; i += blockDim.x) {
        int r = i / d, c = i - r * d;
        int row = row0 + r;
        qs[r * stride + c] = row < lq ? E::to_f(q[q_base + (long)row * d + c]) * scale : 0.0f;
    }

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][DIMS_PER_LANE];
    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.0f;
        for (int j = 0; j < DIMS_PER_LANE; ++j) acc[r][j] = 0.0f;
    }

    for (int tile = 0; tile < lk; tile += TILE_K) {
        const int valid = min(TILE_K, lk - tile);
        __syncthreads();  // previous tile fully consumed (and queries staged, first time)
        for (int i = threadIdx.x; i < TILE_K * d; i += blockDim.x) {
            int r = i / d, c = i - r * d;
            bool in = r < valid;
            long g = kv_base + (long)(tile + r) * d + c;
            ks[r * stride + c] = in ? E::to_f(k[g]) : 0.0f;
            vs[r * stride + c] = in ? E::to_f(v[g]) : 0.0f;
        }
        __syncthreads();

        for (int r = 0; r < ROWS_PER_WARP; ++r) {
            const int local = warp * ROWS_PER_WARP + r;
            const float* qrow = qs + local * stride;
            // 1. score of key `lane` against this row
            float s = NEG_INF;
            if (lane < valid) {
                const float* krow = ks + lane * stride;
                float dot = 0.0f;
                for (int c = 0; c < d; ++c) dot += qrow[c] * krow[c];
                s = dot;
            }
            // 2. online softmax update
            const float m_new = fmaxf(m[r], warp_max(s));
            const float alpha = __expf(m[r] - m_new);   // exp(-inf) = 0 on the first tile
            const float p = lane < valid ? __expf(s - m_new) : 0.0f;
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = m_new;
            // 3. accumulate p_j * v_j into this lane's output dims
            for (int j = 0; j < DIMS_PER_LANE; ++j) acc[r][j] *= alpha;
            for (int key = 0; key < valid; ++key) {
                const float pk = __shfl_sync(0xffffffffu, p, key);
                const float* vrow = vs + key * stride;
                for (int j = 0; j < DIMS_PER_LANE; ++j) {
                    const int c = lane + 32 * j;
                    if (c < d) acc[r][j] += pk * vrow[c];
                }
            }
        }
    }

    for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int row = row0 + warp * ROWS_PER_WARP + r;
        if (row >= lq) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int j = 0; j < DIMS_PER_LANE; ++j) {
            const int c = lane + 32 * j;
            if (c < d) out[q_base + (long)row * d + c] = E::from_f(acc[r][j] * inv);
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
cache_attention_f32(const float* q, const float* k, const float* v, float* out,
                    int lq, int lk, int d, float scale) {
    cache_attention_impl<F32>(q, k, v, out, lq, lk, d, scale);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
cache_attention_f16(const raw16* q, const raw16* k, const raw16* v, raw16* out,
                    int lq, int lk, int d, float scale) {
    cache_attention_impl<F16>(q, k, v, out, lq, lk, d, scale);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
cache_attention_bf16(const raw16* q, const raw16* k, const raw16* v, raw16* out,
                     int lq, int lk, int d, float scale) {
    cache_attention_impl<BF16>(q, k, v, out, lq, lk, d, scale);
}
