// jmerge CPU kernels for exact order statistics (jmerge.merges._select), as XLA FFI handlers.
//
// 1. `JmergeHistogram`: for digits of shape (..., n) int32 and the attribute
// `bins`, the int32 counts (..., bins) of each value 0..bins-1 along the last axis; values
// outside [0, bins) are dropped (jmerge marks entries excluded from a pass with `bins`).
// Equal to a scatter-add of ones into zeros((..., bins)) with out-of-range indices dropped,
// which is what jmerge.merges._select._histogram computes on other platforms.
//
// Why: XLA:CPU lowers scatter-add to a serial loop that costs 2.5-3.5 ns per entry on the
// project's CPU; this loop costs about 0.9 ns per entry per core and splits a long row into
// blocks counted in parallel on XLA's intra-op thread pool (one scratch histogram per block,
// summed at the end). Counts are exact; a row must have fewer than 2^31 entries.
//
// 2. `JmergeKthAbsDiff`: for pairs (a_i, b_i), a_i (T, n_i) and b_i (n_i,) (all float32, or
// all bfloat16 widened to float32), the k-th largest of |a_it - b_i| over the entries of all
// pairs, for every t: (T,) float32. One pair is TIES's per-tensor threshold, all the leaves
// of a model its global one. The arithmetic is XLA:CPU's (denormal inputs read as zero,
// denormal differences flushed to zero), so the value equals lax.top_k of the concatenated
// |a - b| computed by XLA, bit for bit. One pass over the data: a sample of each row (16384
// entries, one per stratum) brackets the k-th value, the pass counts the entries above the
// bracket and collects those inside it, and the k-th is selected among the collected ones
// (std::nth_element). If the bracket misses (the count says the k-th lies outside it, or more
// entries fell inside than the buffer allows) the row is done again by radix select (two
// histogram passes over 16-bit digits of the float's bits): exact always, one pass almost
// always.
//
// Threading: blocks are claimed from an atomic counter by the calling thread and by tasks
// scheduled on the pool. The caller only waits for blocks another thread has already
// claimed (and is running), so it never waits on a task still queued behind other work;
// tasks that start after every block is claimed return at once (the shared state is kept
// alive by a shared_ptr until the last of them has run).

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinBlock = int64_t{1} << 20;  // entries per parallel block, at least

void CountInto(const int32_t* d, int64_t n, uint32_t bins, int32_t* h) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = static_cast<uint32_t>(d[i]);  // negative values wrap past `bins`
    if (v < bins) ++h[v];
  }
}

// Runs fn(w) for w in [0, items) on the calling thread and up to `helpers` pool tasks.
// Items are claimed from an atomic counter; the caller waits only for items already claimed
// by a running thread, and late tasks find nothing left (the state outlives the call).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t helpers, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    int64_t items = 0;
    Fn fn;
    explicit State(Fn f) : fn(std::move(f)) {}
    void Drain() {
      for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
        fn(w);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>(std::move(fn));
  state->items = items;
  helpers = std::min<int64_t>(helpers, items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state] { state->Drain(); });
  state->Drain();
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

ffi::Error HistogramImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> digits,
                         ffi::ResultBuffer<ffi::S32> out, int64_t bins) {
  const auto dims = digits.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("histogram: digits must have an axis");
  if (bins < 1) return ffi::Error::InvalidArgument("histogram: bins must be >= 1");
  const int64_t n = dims.back();
  if (n >= (int64_t{1} << 31))
    return ffi::Error::InvalidArgument("histogram: a row of >= 2^31 entries overflows int32");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  int32_t* o = out->typed_data();
  std::memset(o, 0, sizeof(int32_t) * rows * bins);
  if (rows == 0 || n == 0) return ffi::Error::Success();

  const int64_t threads = Threads(pool);
  // Split a row only when the rows alone cannot keep the threads busy; a scratch histogram
  // per block costs `bins` counts, so blocks stay much longer than the histogram.
  const int64_t split = std::min<int64_t>(threads + 1, n / std::max(kMinBlock, 4 * bins));
  const int64_t per_row = rows >= threads + 1 ? 1 : std::max<int64_t>(1, split);
  const int64_t block = (n + per_row - 1) / per_row;
  const int64_t items = rows * per_row;
  std::vector<int32_t> scratch(per_row > 1 ? items * bins : 0, 0);
  const int32_t* d = digits.typed_data();
  const int64_t helpers = rows * n < 2 * kMinBlock ? 0 : threads;
  ParallelFor(pool, items, helpers, [&, d, o](int64_t w) {
    const int64_t row = w / per_row, b = w % per_row;
    const int64_t lo = b * block, hi = std::min(n, lo + block);
    int32_t* h = per_row == 1 ? o + row * bins : scratch.data() + w * bins;
    CountInto(d + row * n + lo, hi - lo, static_cast<uint32_t>(bins), h);
  });
  if (per_row > 1) {
    for (int64_t w = 0; w < items; ++w) {
      const int32_t* src = scratch.data() + w * bins;
      int32_t* dst = o + (w / per_row) * bins;
      for (int64_t j = 0; j < bins; ++j) dst[j] += src[j];
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// k-th largest |a_t - b|

// XLA:CPU's float32 subtraction: denormal inputs read as zero, a denormal result is zero.
inline float FlushDenormal(float x) { return std::fabs(x) < FLT_MIN ? 0.0f : x; }

inline float Widen(float x) { return x; }
inline float Widen(uint16_t bf16) {
  uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The order key of |a - b|: the bits of a non-negative float (their integer order is the
// float order; +0 is the smallest).
template <typename T>
inline uint32_t AbsDiffKey(T a, T b) {
  float d = FlushDenormal(FlushDenormal(Widen(a)) - FlushDenormal(Widen(b)));
  d = std::fabs(d);
  uint32_t bits;
  std::memcpy(&bits, &d, 4);
  return bits;
}

inline uint64_t Mix64(uint64_t x) {  // splitmix64's finaliser: sample offsets
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

constexpr int64_t kSample = 16384;

// One leaf of the selection: rows of a (T, n) against b (n,).
template <typename T>
struct Leaf {
  const T* a;
  const T* b;
  int64_t n;
};

// The leaves as one row of N = sum n_i entries: leaf and offset of global index g.
template <typename T>
struct Concat {
  std::vector<Leaf<T>> leaves;
  std::vector<int64_t> start;  // start[i] = sum of n_j for j < i; start.back() = N
  int64_t total() const { return start.back(); }
  uint32_t Key(int64_t row, int64_t g) const {
    const int64_t i = std::upper_bound(start.begin(), start.end(), g) - start.begin() - 1;
    const Leaf<T>& l = leaves[i];
    const int64_t off = g - start[i];
    return AbsDiffKey(l.a[row * l.n + off], l.b[off]);
  }
};

// The bracket [lo, hi] of keys that holds the k-th largest of a row with high probability,
// from kSample entries (one per stratum of N / kSample, at a hashed offset inside it), and
// the expected share of the row inside it. hi = UINT32_MAX / lo = 0 when the bracket reaches
// the top / bottom of the sample.
template <typename T>
double Bracket(const Concat<T>& c, int64_t row, int64_t k, uint32_t* lo, uint32_t* hi) {
  const int64_t n = c.total();
  const int64_t s = std::min<int64_t>(kSample, n);
  std::vector<uint32_t> sample(s);
  for (int64_t j = 0; j < s; ++j) {
    const int64_t begin = j * n / s, width = (j + 1) * n / s - begin;
    const int64_t g = begin + static_cast<int64_t>(Mix64(static_cast<uint64_t>(j)) % width);
    sample[j] = c.Key(row, g);
  }
  // Rank of the target from the top in the sample and a margin of 5 standard deviations of
  // its binomial count (plus 16 for small samples and repeated values).
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double r = q * s;
  const double margin = 5.0 * std::sqrt(s * q * (1.0 - q)) + 16.0;
  const int64_t top = static_cast<int64_t>(std::floor(r - margin));   // rank of hi (0-based)
  const int64_t bottom = static_cast<int64_t>(std::ceil(r + margin));  // rank of lo
  auto kth_desc = [&](int64_t rank) {  // the rank-th largest sample key, 0-based
    std::nth_element(sample.begin(), sample.begin() + (s - 1 - rank), sample.end());
    return sample[s - 1 - rank];
  };
  *hi = top <= 0 ? UINT32_MAX : kth_desc(top);
  *lo = bottom >= s - 1 ? 0 : kth_desc(bottom);
  const int64_t first = top <= 0 ? 0 : top, last = bottom >= s - 1 ? s - 1 : bottom;
  return static_cast<double>(last - first + 1) / static_cast<double>(s);
}

// Exact k-th largest key of a row by radix select: two histogram passes over 16-bit digits.
template <typename T>
uint32_t RadixKth(const Concat<T>& c, int64_t row, int64_t k) {
  std::vector<int64_t> hist(1 << 16);
  for (const Leaf<T>& l : c.leaves) {
    const T* a = l.a + row * l.n;
    for (int64_t i = 0; i < l.n; ++i) ++hist[AbsDiffKey(a[i], l.b[i]) >> 16];
  }
  int64_t above = 0;
  uint32_t top = 0xFFFF;
  for (;; --top) {
    if (above + hist[top] >= k) break;
    above += hist[top];
  }
  std::fill(hist.begin(), hist.end(), 0);
  for (const Leaf<T>& l : c.leaves) {
    const T* a = l.a + row * l.n;
    for (int64_t i = 0; i < l.n; ++i) {
      const uint32_t key = AbsDiffKey(a[i], l.b[i]);
      if ((key >> 16) == top) ++hist[key & 0xFFFF];
    }
  }
  uint32_t low = 0xFFFF;
  for (;; --low) {
    if (above + hist[low] >= k) break;
    above += hist[low];
  }
  return (top << 16) | low;
}

template <typename T>
ffi::Error KthAbsDiff(ffi::ThreadPool& pool, const Concat<T>& c, int64_t rows, int64_t k,
                      bool radix_only, float* out) {
  const int64_t threads = Threads(pool);
  const int64_t n = c.total();
  const int64_t helpers = rows * n < 2 * kMinBlock ? 0 : threads;
  if (radix_only) {  // the fallback alone (tests)
    ParallelFor(pool, rows, helpers, [&](int64_t r) {
      const uint32_t key = RadixKth(c, r, k);
      std::memcpy(&out[r], &key, 4);
    });
    return ffi::Error::Success();
  }
  std::vector<uint32_t> lo(rows), hi(rows);
  std::vector<double> share(rows);
  ParallelFor(pool, rows, helpers, [&](int64_t r) {
    share[r] = Bracket(c, r, k, &lo[r], &hi[r]);
  });
  // The pass: blocks of entries of one leaf, each block all rows (b's tile is read once
  // from memory and then from L1 for every row); per (block, row) the count above the
  // bracket and the keys inside it. Many blocks (of at least 2^18 entries), claimed
  // dynamically: three workers on two cores with one block each would idle a core.
  struct Block {
    int64_t leaf, begin, end;
  };
  std::vector<Block> blocks;
  const int64_t min_block = kMinBlock / 4;
  for (int64_t i = 0; i < static_cast<int64_t>(c.leaves.size()); ++i) {
    const int64_t ni = c.leaves[i].n;
    const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(8 * (threads + 1), ni / min_block));
    const int64_t len = (ni + nb - 1) / nb;
    for (int64_t lo_i = 0; lo_i < ni; lo_i += len) blocks.push_back({i, lo_i, std::min(ni, lo_i + len)});
  }
  const int64_t items = static_cast<int64_t>(blocks.size()) * rows;
  std::vector<int64_t> above(items, 0);
  std::vector<std::vector<uint32_t>> inside(items);
  std::vector<char> overflow(items, 0);
  ParallelFor(pool, static_cast<int64_t>(blocks.size()), helpers, [&](int64_t j) {
    const Block blk = blocks[j];
    const Leaf<T>& l = c.leaves[blk.leaf];
    std::vector<int32_t> h(rows);
    std::vector<int64_t> cap(rows);
    for (int64_t r = 0; r < rows; ++r) {
      // Keys of non-negative floats are below 2^31: a signed compare (which SSE2 has) counts
      // the keys above hi; hi = UINT32_MAX (no upper bound) becomes INT32_MAX.
      h[r] = static_cast<int32_t>(std::min<uint32_t>(hi[r], INT32_MAX));
      // Room for 3x the expected share inside the bracket (plus slack); more is a miss.
      cap[r] = static_cast<int64_t>(3.0 * share[r] * (blk.end - blk.begin)) + 4096;
      inside[j * rows + r].reserve(std::min<int64_t>(cap[r], blk.end - blk.begin));
    }
    // Tiles: a row's keys of a tile in one vectorisable loop (counting those above the
    // bracket), then a scan of the tile (in L1) for the few keys inside the bracket.
    constexpr int64_t kTile = 4096;
    alignas(64) uint32_t keys[kTile];
    for (int64_t t0 = blk.begin; t0 < blk.end; t0 += kTile) {
      const int64_t len = std::min(kTile, blk.end - t0);
      const T* bt = l.b + t0;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t w = j * rows + r;
        if (overflow[w]) continue;
        const T* at = l.a + r * l.n + t0;
        const int32_t hr = h[r];
        int32_t above_tile = 0;
        for (int64_t i = 0; i < len; ++i) {
          const uint32_t key = AbsDiffKey(at[i], bt[i]);
          keys[i] = key;
          above_tile += static_cast<int32_t>(key) > hr;
        }
        above[w] += above_tile;
        const uint32_t lr = lo[r], span = hi[r] - lo[r];
        std::vector<uint32_t>& keep = inside[w];
        for (int64_t i = 0; i < len; ++i) {
          if (keys[i] - lr <= span) {  // lo <= key <= hi (unsigned wrap-around)
            if (static_cast<int64_t>(keep.size()) == cap[r]) {
              overflow[w] = 1;
              break;
            }
            keep.push_back(keys[i]);
          }
        }
      }
    }
  });
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  std::vector<char> redo(rows, 0);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t count = 0, inside_n = 0;
    bool bad = false;
    for (int64_t j = 0; j < nblocks; ++j) {
      const int64_t w = j * rows + r;
      bad |= overflow[w] != 0;
      count += above[w];
      inside_n += static_cast<int64_t>(inside[w].size());
    }
    if (bad || count >= k || count + inside_n < k) {
      redo[r] = 1;
      continue;
    }
    std::vector<uint32_t> keys;
    keys.reserve(inside_n);
    for (int64_t j = 0; j < nblocks; ++j) {
      auto& v = inside[j * rows + r];
      keys.insert(keys.end(), v.begin(), v.end());
      std::vector<uint32_t>().swap(v);
    }
    const int64_t rank = k - count - 1;  // 0-based from the top among the inside keys
    std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<uint32_t>());
    const uint32_t key = keys[rank];
    std::memcpy(&out[r], &key, 4);
  }
  ParallelFor(pool, rows, helpers, [&](int64_t r) {
    if (!redo[r]) return;
    const uint32_t key = RadixKth(c, r, k);
    std::memcpy(&out[r], &key, 4);
  });
  return ffi::Error::Success();
}

template <typename T>
ffi::Error KthAbsDiffTyped(ffi::ThreadPool& pool, const ffi::RemainingArgs& args, int64_t rows,
                           int64_t k, bool radix_only, float* out) {
  Concat<T> c;
  c.start.push_back(0);
  for (size_t i = 0; i < args.size(); i += 2) {
    auto a = args.get<ffi::AnyBuffer>(i);
    auto b = args.get<ffi::AnyBuffer>(i + 1);
    if (!a.has_value() || !b.has_value())
      return ffi::Error::InvalidArgument("kth_abs_diff: bad operand");
    const int64_t n = static_cast<int64_t>(b->element_count());
    c.leaves.push_back({reinterpret_cast<const T*>(a->untyped_data()),
                        reinterpret_cast<const T*>(b->untyped_data()), n});
    c.start.push_back(c.start.back() + n);
  }
  if (k < 1 || k > c.total()) return ffi::Error::InvalidArgument("kth_abs_diff: k out of range");
  return KthAbsDiff(pool, c, rows, k, radix_only, out);
}

// Operands: pairs (a_i, b_i), a_i (T, n_i) and b_i (n_i,), one dtype (float32 or bfloat16)
// for all; the k-th largest |a_t - b| over the entries of all pairs, per row t.
ffi::Error KthAbsDiffImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::ResultBuffer<ffi::F32> out, int64_t k, int64_t radix_only) {
  if (args.size() == 0 || args.size() % 2)
    return ffi::Error::InvalidArgument("kth_abs_diff: expected pairs (a_i, b_i)");
  auto first = args.get<ffi::AnyBuffer>(0);
  if (!first.has_value()) return ffi::Error::InvalidArgument("kth_abs_diff: bad operand");
  const ffi::DataType dtype = first->element_type();
  const auto d0 = first->dimensions();
  if (d0.size() != 2) return ffi::Error::InvalidArgument("kth_abs_diff: a_i must be (T, n_i)");
  const int64_t rows = d0[0];
  for (size_t i = 0; i < args.size(); i += 2) {
    auto a = args.get<ffi::AnyBuffer>(i);
    auto b = args.get<ffi::AnyBuffer>(i + 1);
    if (!a.has_value() || !b.has_value())
      return ffi::Error::InvalidArgument("kth_abs_diff: bad operand");
    const auto da = a->dimensions(), db = b->dimensions();
    if (da.size() != 2 || db.size() != 1 || da[0] != rows || da[1] != db[0])
      return ffi::Error::InvalidArgument("kth_abs_diff: expected a_i (T, n_i), b_i (n_i,)");
    if (a->element_type() != dtype || b->element_type() != dtype)
      return ffi::Error::InvalidArgument("kth_abs_diff: all operands must share a dtype");
  }
  float* o = out->typed_data();
  switch (dtype) {
    case ffi::DataType::F32:
      return KthAbsDiffTyped<float>(pool, args, rows, k, radix_only != 0, o);
    case ffi::DataType::BF16:
      return KthAbsDiffTyped<uint16_t>(pool, args, rows, k, radix_only != 0, o);
    default:
      return ffi::Error::InvalidArgument("kth_abs_diff: float32 or bfloat16 inputs only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmergeHistogram, HistogramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bins"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmergeKthAbsDiff, KthAbsDiffImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("radix_only"));
