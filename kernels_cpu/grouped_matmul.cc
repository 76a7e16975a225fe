// Grouped matmuls over the tile-padded expert layout, for XLA:CPU through the XLA FFI.
//
// Why: XLA:CPU runs a dot inside a while loop on one thread (only big flat dots are
// split across threads), so the tile loop of kernels_pallas/tile_loop.py uses one core
// while a dense FFN uses all of them. These kernels spread the tiles of one grouped
// matmul over XLA's own intra-op thread pool (the FFI ThreadPool; the calling thread
// works too, so nothing waits on a busy pool).
//
// Layout (kernels_pallas/tiling.py): rows sorted by expert, each expert's rows padded to a
// multiple of `bm`; expert e owns tiles [tile_start[e], tile_end[e]), i.e. rows
// [tile_start[e]*bm, tile_end[e]*bm). Operands are float32 or bfloat16; products accumulate in float32.
//
//   moe_gmm:  out[R, N] = lhs[R, K] @ rhs[e, K, N] over each expert's rows
//             (rhs_transposed: rhs[e, N, K]); rows past the last expert are zero.
//   moe_gmm_sum: lhs @ rhs[e] + lhs2 @ rhs2[e] in one pass (same options).
//   moe_tgmm: out[E, K, N] = sum over the rows r of expert e of lhs[r, K]^T grad[r, N];
//             experts without rows get zeros.
//
// The right operand is packed per expert into float32 panels 64 columns wide; the inner
// kernel keeps a block of the output in vector registers (GCC/Clang vector extensions)
// sized to the target's register file: 6 x 64 in 24 of AVX-512's 32 registers of 16
// floats, 6 x 16 in 12 of AVX2's 16 registers of 8 floats, 6 x 16 in 24 of NEON's 32
// registers of 4 floats, 6 x 8 in 12 of SSE's 16. A vector wider than the target's
// registers is emulated and the block spills: on AVX2 the 6 x 64 block ran 45x slower.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kVecs = 4;  // floats per register; registers per block row
#elif defined(__AVX__)
constexpr int kLanes = 8, kVecs = 2;
#elif defined(__aarch64__) || defined(__ARM_NEON)
constexpr int kLanes = 4, kVecs = 4;
#else
constexpr int kLanes = 4, kVecs = 2;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef float vfloat_unaligned __attribute__((vector_size(4 * kLanes), aligned(4)));
constexpr int kRows = 6;                  // output rows per register block
constexpr int kBlockCols = kLanes * kVecs;  // output columns per register block
constexpr int kCols = 64;                 // columns per packed panel (and per job)
static_assert(kCols % kBlockCols == 0, "a panel holds whole register blocks");

inline float Load(const float* p) { return *p; }
inline float Load(const uint16_t* p) {  // bfloat16 -> float32: the high half of the bits
  uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void Store(float* p, float v) { *p = v; }
inline void Store(uint16_t* p, float v) {  // float32 -> bfloat16, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
    *p = static_cast<uint16_t>((bits >> 16) | 0x40);
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *p = static_cast<uint16_t>(bits >> 16);
}

// Runs fn(job) for job in [0, num_jobs) on the pool and the calling thread. Workers claim
// jobs from one counter; the caller returns once every job has finished. A task that
// starts after all jobs are claimed only touches the shared state, kept alive by its
// shared_ptr.
template <typename Fn>
void ParallelFor(ffi::ThreadPool* pool, int64_t num_jobs, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, num_jobs, &fn] {
    for (int64_t j; (j = state->next.fetch_add(1)) < num_jobs;) {
      fn(j);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = pool ? std::min<int64_t>(pool->num_threads(), num_jobs - 1) : 0;
  for (int64_t t = 0; t < helpers; ++t) {
    // `fn` lives on this frame: a helper only calls it for a claimed job, and this frame
    // waits below until every claimed job is done.
    pool->Schedule([work] { work(); });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < num_jobs) std::this_thread::yield();
}

// c[i, :cols] (i < MR, cols <= NV vectors) = sum_k a(i, k) * panel[k, :] + sum_k a2(i, k) *
// panel[depth + k, :], written through Store. a(i, k) = a[i * a_i + k * a_k], a2 alike
// (depth2 = 0: no second term); panel and panel2 rows are kCols floats apart.
template <int MR, int NV, typename A, typename O>
inline void Block(const A* a, const A* a2, int64_t a_i, int64_t a_k, const float* panel,
                  const float* panel2,
                  int64_t depth, int64_t depth2, O* c, int64_t ldc, int64_t cols) {
  vfloat acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = vfloat{};
  // One loop per term (no per-k branch), unrolled: the loop's own instructions otherwise
  // rival the FMAs on 2-vector blocks.
  auto accumulate = [&](const A* src, const float* pan, int64_t n) {
#pragma GCC unroll 4
    for (int64_t k = 0; k < n; ++k) {
      const vfloat_unaligned* b = reinterpret_cast<const vfloat_unaligned*>(pan + k * kCols);
      vfloat bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = b[v];
      for (int i = 0; i < MR; ++i) {
        const float s = Load(src + i * a_i + k * a_k);
        for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
      }
    }
  };
  accumulate(a, panel, depth);
  if (depth2) accumulate(a2, panel2, depth2);
  for (int i = 0; i < MR; ++i) {
    const float* row = reinterpret_cast<const float*>(acc[i]);
    for (int64_t n = 0; n < cols; ++n) Store(c + i * ldc + n, row[n]);
  }
}

// Output rows [0, rows) x columns [0, cols <= kCols) from a packed panel. Where a panel
// holds several register blocks across (kBlockCols < kCols), each block of kRows rows of
// the left operand is first packed to float32, k-major, into `packed` (kRows * (depth +
// depth2) floats), so the register blocks across read it as broadcasts from memory instead
// of converting every element again (AVX2, 6 x 16 blocks: gmm 8.1-8.9 -> 5.3-6.0 ms).
template <typename A, typename O>
void Panel(const A* a, const A* a2, int64_t a_i, int64_t a_k, int64_t rows, const float* panel,
           int64_t depth, int64_t depth2, O* c, int64_t ldc, int64_t cols, float* packed) {
  auto block = [&](auto mr, const auto* ai, const auto* a2i, int64_t ai_i, int64_t ai_k,
                   int64_t i) {
    constexpr int MR = decltype(mr)::value;
    for (int64_t j = 0; j < cols; j += kBlockCols) {
      const int64_t bc = std::min<int64_t>(kBlockCols, cols - j);
      const int nv = static_cast<int>((bc + kLanes - 1) / kLanes);
      O* ci = c + i * ldc + j;
      const float* p = panel + j;  // the second term's panel follows the first's
      const float* p2 = panel + kCols * depth + j;
      switch (nv) {  // kVecs <= 4
        case 4: Block<MR, (kVecs >= 4 ? 4 : 1)>(ai, a2i, ai_i, ai_k, p, p2, depth, depth2, ci, ldc, bc); break;
        case 3: Block<MR, (kVecs >= 3 ? 3 : 1)>(ai, a2i, ai_i, ai_k, p, p2, depth, depth2, ci, ldc, bc); break;
        case 2: Block<MR, 2>(ai, a2i, ai_i, ai_k, p, p2, depth, depth2, ci, ldc, bc); break;
        default: Block<MR, 1>(ai, a2i, ai_i, ai_k, p, p2, depth, depth2, ci, ldc, bc);
      }
    }
  };
  auto rows_at = [&](auto mr, int64_t i) {
    constexpr int MR = decltype(mr)::value;
    const A* ai = a + i * a_i;
    const A* a2i = a2 ? a2 + i * a_i : nullptr;
    if constexpr (kBlockCols < kCols) {
      auto pack = [&](const A* src, int64_t n, float* dst) {  // dst[k][MR]
        for (int64_t k = 0; k < n; ++k)
          for (int r = 0; r < MR; ++r) dst[k * MR + r] = Load(src + r * a_i + k * a_k);
      };
      pack(ai, depth, packed);
      if (a2) pack(a2i, depth2, packed + depth * MR);  // a2's rows follow
      block(mr, packed, a2 ? packed + depth * MR : nullptr, int64_t{1}, int64_t{MR}, i);
    } else {
      block(mr, ai, a2i, a_i, a_k, i);
    }
  };
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows) rows_at(std::integral_constant<int, kRows>{}, i);
  for (; i < rows; ++i) rows_at(std::integral_constant<int, 1>{}, i);
}

// panel[k, n] = src[k * s_k + n * s_n] for k < depth, n < cols (zero beyond cols).
template <typename B>
void Pack(const B* src, int64_t s_k, int64_t s_n, int64_t depth, int64_t cols, float* panel) {
  for (int64_t k = 0; k < depth; ++k) {
    float* row = panel + k * kCols;
    for (int64_t n = 0; n < cols; ++n) row[n] = Load(src + k * s_k + n * s_n);
    for (int64_t n = cols; n < kCols; ++n) row[n] = 0.f;
  }
}

template <typename O>
void ZeroRows(O* c, int64_t ldc, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) std::memset(c + i * ldc, 0, cols * sizeof(O));
}

// Float scratch per thread (slot 0: the right operand's panel, 1: packed left rows),
// 64-byte aligned, reused across calls.
float* Scratch(int64_t floats, int slot) {
  struct Buffer {
    float* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer bufs[2];
  Buffer& buf = bufs[slot];
  if (buf.size < floats) {
    std::free(buf.data);
    const int64_t bytes = (floats * 4 + 63) / 64 * 64;
    buf.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    buf.size = buf.data ? floats : 0;
  }
  return buf.data;
}

// One job per (expert, 64-column block): the expert's weight panel is packed once and
// serves all its rows; one more job zeroes the rows past the last expert. With lhs2 and
// rhs2 (same shapes) the job adds their product into the same accumulators.
template <typename A, typename B, typename O>
bool Gmm(ffi::ThreadPool* pool, const A* lhs, const B* rhs, const A* lhs2, const B* rhs2,
         const int32_t* tile_start, const int32_t* tile_end, O* out, int64_t E, int64_t R,
         int64_t K, int64_t N, int64_t bm, bool rhs_transposed) {
  const int64_t col_blocks = (N + kCols - 1) / kCols, K2 = lhs2 ? K : 0;
  std::atomic<bool> ok{true};
  ParallelFor(pool, E * col_blocks + 1, [&](int64_t job) {
    if (job == E * col_blocks) {
      const int64_t used = E ? int64_t{tile_end[E - 1]} * bm : 0;
      return ZeroRows(out + used * N, N, R - used, N);
    }
    const int64_t e = job / col_blocks, n0 = (job % col_blocks) * kCols;
    const int64_t cols = std::min<int64_t>(kCols, N - n0);
    const int64_t r0 = int64_t{tile_start[e]} * bm;
    const int64_t rows = (int64_t{tile_end[e]} - tile_start[e]) * bm;
    if (rows <= 0) return;
    float* panel = Scratch((K + K2) * kCols, 0);
    float* packed = Scratch(kRows * (K + K2), 1);
    if (!panel || !packed) return ok.store(false);
    for (int t = 0; t < (lhs2 ? 2 : 1); ++t) {
      const B* w = (t ? rhs2 : rhs) + e * K * N;
      float* p = panel + t * K * kCols;
      if (rhs_transposed) {
        Pack(w + n0 * K, 1, K, K, cols, p);  // w[n, k]
      } else {
        Pack(w + n0, N, 1, K, cols, p);  // w[k, n]
      }
    }
    Panel(lhs + r0 * K, lhs2 ? lhs2 + r0 * K : nullptr, K, 1, rows, panel, K, K2,
          out + r0 * N + n0, N, cols, packed);
  });
  return ok.load();
}

template <typename A, typename B, typename O>
bool Tgmm(ffi::ThreadPool* pool, const A* lhs, const B* grad, const int32_t* tile_start,
          const int32_t* tile_end, O* out, int64_t E, int64_t K, int64_t N, int64_t bm) {
  const int64_t col_blocks = (N + kCols - 1) / kCols;
  std::atomic<bool> ok{true};
  ParallelFor(pool, E * col_blocks, [&](int64_t job) {
    const int64_t e = job / col_blocks, n0 = (job % col_blocks) * kCols;
    const int64_t cols = std::min<int64_t>(kCols, N - n0);
    O* c = out + e * K * N + n0;
    const int64_t r0 = int64_t{tile_start[e]} * bm;
    const int64_t rows = (int64_t{tile_end[e]} - tile_start[e]) * bm;
    if (rows <= 0) return ZeroRows(c, N, K, cols);
    float* panel = Scratch(rows * kCols, 0);
    float* packed = Scratch(kRows * rows, 1);
    if (!panel || !packed) return ok.store(false);
    Pack(grad + r0 * N + n0, N, 1, rows, cols, panel);  // grad rows of expert e
    // out[k, n] = sum_r lhs[r0 + r, k] * grad[r0 + r, n]: a(k, r) = lhs[(r0 + r) * K + k].
    Panel<A, O>(lhs + r0 * K, nullptr, 1, K, K, panel, rows, 0, c, N, cols, packed);
  });
  return ok.load();
}

ffi::Error Done(bool ok) {
  if (ok) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    "moe_jax CPU kernels: out of memory for a weight panel");
}

bool IsF32(ffi::DataType t) { return t == ffi::DataType::F32; }
bool IsBF16(ffi::DataType t) { return t == ffi::DataType::BF16; }

// Calls fn(T*) with the buffer's data as float* or uint16_t* (bfloat16 bits).
template <typename Fn>
ffi::Error WithData(ffi::AnyBuffer b, Fn&& fn) {
  if (IsF32(b.element_type())) return fn(reinterpret_cast<float*>(b.untyped_data()));
  if (IsBF16(b.element_type())) return fn(reinterpret_cast<uint16_t*>(b.untyped_data()));
  return ffi::Error::InvalidArgument("moe_jax CPU kernels take float32 or bfloat16");
}

template <typename Fn>
ffi::Error WithOut(ffi::Result<ffi::AnyBuffer> b, Fn&& fn) {
  if (IsF32(b->element_type())) return fn(reinterpret_cast<float*>(b->untyped_data()));
  if (IsBF16(b->element_type())) return fn(reinterpret_cast<uint16_t*>(b->untyped_data()));
  return ffi::Error::InvalidArgument("moe_jax CPU kernels write float32 or bfloat16");
}

bool SameDims(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
  const auto x = a.dimensions(), y = b.dimensions();
  return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
}

// The kernels write each expert's rows [start, end) and zero the rows past the last
// expert, so the ranges must tile [0, end of last) back to back inside the R rows: a
// layout that does not (hand-built, or from inconsistent router counts) would leave rows
// unwritten or reach past the buffers. One pass over E, before any work.
ffi::Error CheckLayout(const char* op, ffi::Buffer<ffi::S32> tile_start,
                       ffi::Buffer<ffi::S32> tile_end, int64_t E, int64_t R, int64_t bm) {
  if (static_cast<int64_t>(tile_start.element_count()) != E ||
      static_cast<int64_t>(tile_end.element_count()) != E || bm <= 0 || R % bm)
    return ffi::Error::InvalidArgument(std::string(op) +
                                       ": shapes do not match the tile layout");
  const int32_t *ts = tile_start.typed_data(), *te = tile_end.typed_data();
  for (int64_t e = 0; e < E; ++e) {
    if (ts[e] != (e ? te[e - 1] : 0) || te[e] < ts[e] || int64_t{te[e]} * bm > R)
      return ffi::Error::InvalidArgument(
          std::string(op) + ": expert tile ranges must run back to back from 0 within the "
          "rows (expert " + std::to_string(e) + ": [" + std::to_string(ts[e]) + ", " +
          std::to_string(te[e]) + ") tiles of " + std::to_string(bm) + " rows, " +
          std::to_string(R) + " rows)");
  }
  return ffi::Error::Success();
}

ffi::Error CheckGmm(const char* op, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                    ffi::Buffer<ffi::S32> tile_start, ffi::Buffer<ffi::S32> tile_end,
                    const ffi::AnyBuffer::Dimensions& od, int64_t bm, bool rhs_transposed) {
  const auto ld = lhs.dimensions(), rd = rhs.dimensions();
  if (ld.size() != 2 || rd.size() != 3 || od.size() != 2 ||
      (rhs_transposed ? rd[2] : rd[1]) != ld[1] || od[0] != ld[0] ||
      od[1] != (rhs_transposed ? rd[1] : rd[2]))
    return ffi::Error::InvalidArgument(std::string(op) + ": shapes do not match");
  return CheckLayout(op, tile_start, tile_end, rd[0], ld[0], bm);
}

ffi::Error GmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                   ffi::Buffer<ffi::S32> tile_start, ffi::Buffer<ffi::S32> tile_end,
                   ffi::Result<ffi::AnyBuffer> out, int64_t bm, bool rhs_transposed) {
  if (auto err = CheckGmm("moe_gmm", lhs, rhs, tile_start, tile_end, out->dimensions(), bm,
                          rhs_transposed);
      err.failure())
    return err;
  const auto ld = lhs.dimensions(), rd = rhs.dimensions();
  const int64_t N = rhs_transposed ? rd[1] : rd[2];
  const int32_t *ts = tile_start.typed_data(), *tend = tile_end.typed_data();
  return WithData(lhs, [&](auto* a) {
    return WithData(rhs, [&](auto* b) {
      return WithOut(out, [&](auto* c) {
        using A = std::remove_pointer_t<decltype(a)>;
        using B = std::remove_pointer_t<decltype(b)>;
        return Done(Gmm<A, B>(&pool, a, b, nullptr, nullptr, ts, tend, c, rd[0], ld[0], ld[1],
                              N, bm, rhs_transposed));
      });
    });
  });
}

// out = lhs @ rhs[e]^T + lhs2 @ rhs2[e]^T: the backward's d x of the SwiGLU FFN in one
// pass (d gate @ w_gate^T + d up @ w_up^T), without a second [R, D] buffer and an add.
ffi::Error GmmSumImpl(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer rhs,
                      ffi::AnyBuffer lhs2, ffi::AnyBuffer rhs2, ffi::Buffer<ffi::S32> tile_start,
                      ffi::Buffer<ffi::S32> tile_end, ffi::Result<ffi::AnyBuffer> out,
                      int64_t bm, bool rhs_transposed) {
  if (auto err = CheckGmm("moe_gmm_sum", lhs, rhs, tile_start, tile_end, out->dimensions(), bm,
                          rhs_transposed);
      err.failure())
    return err;
  if (lhs2.element_type() != lhs.element_type() || rhs2.element_type() != rhs.element_type() ||
      !SameDims(lhs2, lhs) || !SameDims(rhs2, rhs))
    return ffi::Error::InvalidArgument("moe_gmm_sum: the two products differ in shape or dtype");
  const auto ld = lhs.dimensions(), rd = rhs.dimensions();
  const int64_t N = rhs_transposed ? rd[1] : rd[2];
  const int32_t *ts = tile_start.typed_data(), *tend = tile_end.typed_data();
  return WithData(lhs, [&](auto* a) {
    return WithData(rhs, [&](auto* b) {
      return WithOut(out, [&](auto* c) {
        using A = std::remove_pointer_t<decltype(a)>;
        using B = std::remove_pointer_t<decltype(b)>;
        return Done(Gmm<A, B>(&pool, a, b, static_cast<const A*>(lhs2.untyped_data()),
                              static_cast<const B*>(rhs2.untyped_data()), ts, tend, c, rd[0],
                              ld[0], ld[1], N, bm, rhs_transposed));
      });
    });
  });
}

ffi::Error TgmmImpl(ffi::ThreadPool pool, ffi::AnyBuffer lhs, ffi::AnyBuffer grad,
                    ffi::Buffer<ffi::S32> tile_start, ffi::Buffer<ffi::S32> tile_end,
                    ffi::Result<ffi::AnyBuffer> out, int64_t bm) {
  const auto ld = lhs.dimensions(), gd = grad.dimensions(), od = out->dimensions();
  if (ld.size() != 2 || gd.size() != 2 || od.size() != 3 || ld[0] != gd[0] || od[1] != ld[1] ||
      od[2] != gd[1])
    return ffi::Error::InvalidArgument("moe_tgmm: shapes do not match");
  if (auto err = CheckLayout("moe_tgmm", tile_start, tile_end, od[0], ld[0], bm); err.failure())
    return err;
  const int32_t *ts = tile_start.typed_data(), *tend = tile_end.typed_data();
  return WithData(lhs, [&](auto* a) {
    return WithData(grad, [&](auto* g) {
      return WithOut(out, [&](auto* c) {
        return Done(Tgmm(&pool, a, g, ts, tend, c, od[0], od[1], od[2], bm));
      });
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeGmm, GmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bm")
                                  .Attr<bool>("rhs_transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeGmmSum, GmmSumImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bm")
                                  .Attr<bool>("rhs_transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeTgmm, TgmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("bm"));
