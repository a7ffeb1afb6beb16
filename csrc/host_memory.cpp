#include "host_memory.h"

#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define MOEPP_HOST_MMAP 1
#endif

namespace moepp {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

struct BlockCache {
  std::mutex mutex;
  std::multimap<size_t, void*> free_blocks;  // by size, so a request finds the smallest fit
  size_t bytes = 0;
  size_t limit = size_t(2) << 30;
};

// Never destroyed: blocks owned by Python objects may die after static destructors run.
BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache;
  return *cache;
}

void* map_block(size_t bytes) {
#if defined(MOEPP_HOST_MMAP)
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  advise_huge_pages(reinterpret_cast<uintptr_t>(p), static_cast<int64_t>(bytes));
  return p;
#else
  return ::operator new(bytes, std::align_val_t(kHugePage));
#endif
}

void unmap_block(void* data, size_t bytes) {
#if defined(MOEPP_HOST_MMAP)
  munmap(data, bytes);
#else
  (void)bytes;
  ::operator delete(data, std::align_val_t(kHugePage));
#endif
}

// Takes blocks out of the cache until it holds at most `keep` bytes (caller holds the lock).
std::vector<std::pair<size_t, void*>> trim_locked(BlockCache& cache, size_t keep) {
  std::vector<std::pair<size_t, void*>> evicted;
  while (cache.bytes > keep && !cache.free_blocks.empty()) {
    auto largest = std::prev(cache.free_blocks.end());
    evicted.emplace_back(largest->first, largest->second);
    cache.bytes -= largest->first;
    cache.free_blocks.erase(largest);
  }
  return evicted;
}

void unmap_all(const std::vector<std::pair<size_t, void*>>& blocks) {
  for (const auto& [bytes, data] : blocks) unmap_block(data, bytes);
}

}  // namespace

int64_t advise_huge_pages(uintptr_t data, int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("bytes: must be >= 0, got " + std::to_string(bytes));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t begin = (data + kHugePage - 1) & ~uintptr_t(kHugePage - 1);
  const uintptr_t end = (data + static_cast<uintptr_t>(bytes)) & ~uintptr_t(kHugePage - 1);
  if (data == 0 || end <= begin) return 0;
  if (madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) != 0) return 0;
  return static_cast<int64_t>(end - begin);
#else
  (void)data;
  return 0;
#endif
}

HostBlock::~HostBlock() {
  BlockCache& cache = block_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.bytes + bytes_ <= cache.limit) {
      cache.free_blocks.emplace(bytes_, data_);
      cache.bytes += bytes_;
      return;
    }
  }
  unmap_block(data_, bytes_);
}

std::unique_ptr<HostBlock> acquire_host_block(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("bytes: must be > 0, got " + std::to_string(bytes));
  const size_t size = (static_cast<size_t>(bytes) + kHugePage - 1) / kHugePage * kHugePage;
  BlockCache& cache = block_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto fit = cache.free_blocks.lower_bound(size);
    if (fit != cache.free_blocks.end() && fit->first <= size + size / 4) {
      auto block = std::make_unique<HostBlock>(fit->second, fit->first);
      cache.bytes -= fit->first;
      cache.free_blocks.erase(fit);
      return block;
    }
  }
  return std::make_unique<HostBlock>(map_block(size), size);
}

void set_host_cache_limit(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("bytes: must be >= 0, got " + std::to_string(bytes));
  BlockCache& cache = block_cache();
  std::vector<std::pair<size_t, void*>> evicted;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.limit = static_cast<size_t>(bytes);
    evicted = trim_locked(cache, cache.limit);
  }
  unmap_all(evicted);
}

int64_t host_cache_limit() {
  std::lock_guard<std::mutex> lock(block_cache().mutex);
  return static_cast<int64_t>(block_cache().limit);
}

int64_t host_cache_bytes() {
  std::lock_guard<std::mutex> lock(block_cache().mutex);
  return static_cast<int64_t>(block_cache().bytes);
}

void empty_host_cache() {
  BlockCache& cache = block_cache();
  std::vector<std::pair<size_t, void*>> evicted;
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    evicted = trim_locked(cache, 0);
  }
  unmap_all(evicted);
}

}  // namespace moepp
