// A minimal fork-join loop for the CPU twins: splits [0, total) into `workers`
// contiguous chunks (chunk w is always the same range for the same arguments,
// so per-worker partial results reduce deterministically).
//
// Built with OpenMP, the chunks run on an OpenMP thread pool. Where torch's wheel
// ships its libgomp as libgomp.so.1 (2.13 and 2.14 do; 2.5 renames it) and was
// imported first, the loader binds this module to that same runtime: the kernels
// then share torch's worker threads instead of competing with them while they
// spin between torch ops. Otherwise the pools are separate, as std::threads would
// be. Without OpenMP each chunk gets a std::thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace moepp {

// Workers worth starting for `total` items of roughly `grain` items each.
inline int choose_workers(int64_t total, int max_threads, int64_t grain) {
  const int64_t wanted = (total + grain - 1) / grain;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(max_threads, 1), wanted)));
}

template <typename F>
void parallel_for(int64_t total, int workers, F&& body) {
  auto chunk = [&](int w) {
    const int64_t begin = total * w / workers;
    const int64_t end = total * (w + 1) / workers;
    body(w, begin, end);
  };
  if (workers <= 1) {
    chunk(0);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for num_threads(workers) schedule(static, 1)
  for (int w = 0; w < workers; ++w) chunk(w);
#else
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) threads.emplace_back(chunk, w);
  chunk(0);
  for (auto& t : threads) t.join();
#endif
}

}  // namespace moepp
