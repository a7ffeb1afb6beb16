// Host buffers the CPU twins write first: large ones on transparent huge pages.
#pragma once

#include <cstdint>

namespace moepp {

// Asks the kernel to back the whole 2 MiB pages inside [data, data + bytes) with
// transparent huge pages (madvise MADV_HUGEPAGE), before they are first written:
// glibc maps a buffer of over 32 MiB afresh on every allocation, and its first
// writes then fault once per 4 KiB page instead of once per 2 MiB. Returns the
// bytes advised: 0 where the range holds no whole huge page, the kernel refuses,
// or the platform is not Linux. Advice only: the memory's contents are unchanged.
int64_t advise_huge_pages(uintptr_t data, int64_t bytes);

}  // namespace moepp
