"""The C++ of the kernels' thread pool (the first part of ``source.KERNEL_SOURCE``).

Work sharing that never waits for a thread that has not started: the caller claims tiles
too, from one atomic counter tagged with a job number, and afterwards waits only for tiles
a worker actually claimed. A descheduled worker on a loaded machine therefore costs nothing
(the caller does all the tiles) instead of a scheduler time slice per call, which is what
an OpenMP barrier costs there. Idle workers spin ~0.2 ms, then sleep on a condition variable.
"""

POOL_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace {

constexpr int64_t NB = 16;  // weight rows per sub-tile (their codes stay in L1 across M tiles)

// ------------------------------------------------------------------------- thread pool
//
// Work sharing that never waits for a thread that has not started: the caller claims tiles
// too, from one atomic counter tagged with a job number, and afterwards waits only for tiles
// a worker actually claimed. On a loaded machine a descheduled worker therefore costs
// nothing (the caller does all the tiles) instead of a scheduler time slice per call, which
// is what an OpenMP barrier costs there. Idle workers spin ~0.2 ms, then sleep.

class Pool {
 public:
  using Fn = void (*)(void*, int64_t);

  ~Pool() {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      sleep_cv_.notify_all();
    }
    for (auto& t : threads_) t.join();
  }

  void run(int64_t tiles, Fn fn, void* ctx, int threads) {
    if (threads <= 1 || tiles <= 1 || !busy_.try_lock()) {
      for (int64_t t = 0; t < tiles; ++t) fn(ctx, t);
      return;
    }
    while ((int)threads_.size() < threads - 1) threads_.emplace_back([this] { work(); });
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    tiles_.store(tiles, std::memory_order_release);  // after the last job's close (below)
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = ++job_;
    next_.store(job << 32);  // publishes the fields above (seq_cst, pairs with sleepers_)
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mu_);
      sleep_cv_.notify_all();
    }
    int64_t mine = 0;
    for (int64_t t; (t = claim(job)) >= 0; ++mine) fn(ctx, t);
    while (done_.load(std::memory_order_acquire) != tiles - mine) _mm_pause();
    // Close the job before the next one changes tiles_: a worker still in claim() with this
    // job's exhausted counter and the next job's larger tile count would otherwise claim a
    // tile that does not exist (running a finished job's function, and counting it towards
    // the next job's done_, whose wait then never ends). Its compare-exchange now fails.
    next_.store((job << 32) | 0xffffffffu);
    busy_.unlock();
  }

 private:
  // The next tile of `job`, or -1 once the job changed or has no tiles left.
  int64_t claim(uint64_t job) {
    uint64_t v = next_.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 32) != job) return -1;
      const int64_t t = (int64_t)(v & 0xffffffffu);
      if (t >= tiles_.load(std::memory_order_acquire)) return -1;
      if (next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) return t;
    }
  }

  void work() {
    uint64_t seen = next_.load() >> 32;
    for (;;) {
      uint64_t job;
      auto since = std::chrono::steady_clock::now();
      for (int spin = 0; (job = next_.load(std::memory_order_acquire) >> 32) == seen; ++spin) {
        if (stop_.load(std::memory_order_relaxed)) return;
        _mm_pause();
        if ((spin & 63) != 63) continue;
        if (std::chrono::steady_clock::now() - since < std::chrono::microseconds(200)) continue;
        std::unique_lock<std::mutex> lock(sleep_mu_);
        sleepers_.fetch_add(1);  // seq_cst with run()'s store of next_ then load of sleepers_
        sleep_cv_.wait(lock, [&] { return (next_.load() >> 32) != seen || stop_.load(); });
        sleepers_.fetch_sub(1);
        since = std::chrono::steady_clock::now();
      }
      seen = job;
      // Fields read here may belong to a later job; a claim only succeeds while `job` is
      // current and unfinished, and then they are the ones published with it.
      const Fn fn = fn_.load(std::memory_order_relaxed);
      void* const ctx = ctx_.load(std::memory_order_relaxed);
      for (int64_t t; (t = claim(job)) >= 0;) {
        fn(ctx, t);
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  std::mutex busy_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> next_{0};  // job << 32 | next tile
  std::atomic<Fn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> tiles_{0}, done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mu_;
  std::condition_variable sleep_cv_;
  std::atomic<bool> stop_{false};
  uint64_t job_ = 0;
};

Pool& pool() {
  static Pool p;
  return p;
}

// Run tile(n0, n1) over [0, N) in row ranges of a multiple of `step` (NB unless given), on
// up to `threads` threads.
template <class F>
void over_rows(int64_t N, int threads, F tile, int64_t step = NB) {
  // ~16 ranges per thread: balance without a claim per 16 rows on a 50k-row matrix
  const int64_t per =
      threads > 1 ? ((N + 16 * threads - 1) / (16 * threads) + step - 1) / step * step : N;
  const int64_t tiles = (N + per - 1) / per;
  auto body = [&](int64_t t) { tile(t * per, t * per + per < N ? t * per + per : N); };
  using Body = decltype(body);
  pool().run(tiles, [](void* c, int64_t t) { (*(Body*)c)(t); }, &body, threads);
}

"""
