// jmerge CPU kernel: histogram of small non-negative integers (radix-select digits).
//
// XLA FFI handler `JmergeHistogram`: for digits of shape (..., n) int32 and the attribute
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
// Threading: blocks are claimed from an atomic counter by the calling thread and by tasks
// scheduled on the pool. The caller only waits for blocks another thread has already
// claimed (and is running), so it never waits on a task still queued behind other work;
// tasks that start after every block is claimed return at once (the shared state is kept
// alive by a shared_ptr until the last of them has run).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
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

// Work item w covers row w / blocks_per_row, block w % blocks_per_row of that row, and counts
// into out (one block per row) or into scratch[w] (several, summed afterwards).
struct Job {
  const int32_t* digits = nullptr;
  int32_t* out = nullptr;
  int64_t n = 0, bins = 0, blocks_per_row = 1, block = 0, items = 0;
  std::vector<int32_t> scratch;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run(int64_t w) {
    const int64_t row = w / blocks_per_row, b = w % blocks_per_row;
    const int64_t lo = b * block, hi = std::min(n, lo + block);
    int32_t* h = blocks_per_row == 1 ? out + row * bins : scratch.data() + w * bins;
    CountInto(digits + row * n + lo, hi - lo, static_cast<uint32_t>(bins), h);
  }

  void Drain() {
    for (int64_t w; (w = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      Run(w);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

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

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto job = std::make_shared<Job>();
  job->digits = digits.typed_data();
  job->out = o;
  job->n = n;
  job->bins = bins;
  // Split a row only when the rows alone cannot keep the threads busy; a scratch histogram
  // per block costs `bins` counts, so blocks stay much longer than the histogram.
  const int64_t split = std::min<int64_t>(threads + 1, n / std::max(kMinBlock, 4 * bins));
  job->blocks_per_row = rows >= threads + 1 ? 1 : std::max<int64_t>(1, split);
  job->block = (n + job->blocks_per_row - 1) / job->blocks_per_row;
  job->items = rows * job->blocks_per_row;
  if (job->blocks_per_row > 1) job->scratch.assign(job->items * bins, 0);

  const int64_t helpers =
      rows * n < 2 * kMinBlock ? 0 : std::min<int64_t>(threads, job->items - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job] { job->Drain(); });
  job->Drain();
  while (job->done.load(std::memory_order_acquire) < job->items) std::this_thread::yield();

  if (job->blocks_per_row > 1) {
    for (int64_t w = 0; w < job->items; ++w) {
      const int32_t* src = job->scratch.data() + w * bins;
      int32_t* dst = o + (w / job->blocks_per_row) * bins;
      for (int64_t j = 0; j < bins; ++j) dst[j] += src[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmergeHistogram, HistogramImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bins"));
