// Host buffers the CPU twins write first: large ones on transparent huge pages, and
// a cache that hands a freed large buffer's pages to the next buffer of its size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace moepp {

// Asks the kernel to back the whole 2 MiB pages inside [data, data + bytes) with
// transparent huge pages (madvise MADV_HUGEPAGE), before they are first written:
// glibc maps a buffer of over 32 MiB afresh on every allocation, and its first
// writes then fault once per 4 KiB page instead of once per 2 MiB. Returns the
// bytes advised: 0 where the range holds no whole huge page, the kernel refuses,
// or the platform is not Linux. Advice only: the memory's contents are unchanged.
int64_t advise_huge_pages(uintptr_t data, int64_t bytes);

// One host mapping of whole 2 MiB pages, uninitialised. When destroyed it goes
// back to the host block cache (or to the kernel where the cache is full), so a
// training step's next buffer of the same size reuses pages already faulted in
// instead of faulting in fresh, zeroed ones.
class HostBlock {
 public:
  HostBlock(void* data, size_t bytes) : data_(data), bytes_(bytes) {}
  ~HostBlock();
  HostBlock(const HostBlock&) = delete;
  HostBlock& operator=(const HostBlock&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }

 private:
  void* data_;
  size_t bytes_;
};

// A block of at least `bytes` (> 0): a cached one of the same size rounded up to
// whole huge pages (at most a quarter larger), else a new mapping advised onto
// huge pages. Throws std::invalid_argument for bytes <= 0, std::bad_alloc when
// the kernel has no memory.
std::unique_ptr<HostBlock> acquire_host_block(int64_t bytes);

// The most bytes the cache keeps in freed blocks (>= 0; 0 caches nothing). A freed
// block that does not fit under it is unmapped. Lowering it frees blocks now.
void set_host_cache_limit(int64_t bytes);
int64_t host_cache_limit();
int64_t host_cache_bytes();  // bytes held in freed blocks now
void empty_host_cache();     // unmaps every freed block

}  // namespace moepp
