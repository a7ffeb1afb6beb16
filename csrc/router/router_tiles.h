// The CPU router's forward for few experts (router_tiles.cpp): tokens in tiles of
// kTileTokens, one vector lane per token, so that every loop over the experts is
// vertical (no reductions across a vector, no row tails) and its sums add the
// experts in order from 0, as SerialGroup's softmax_stats does.
#pragma once

#include <cstdint>

#include "router.h"
#include "router_residual.h"

namespace moepp::router {

constexpr int kTileTokens = 8;
constexpr int kTileMaxExperts = 64;

// Routes tokens [begin, end) of `a`, the residual over g. counts: [N] the thread's slot counts; prob_lanes:
// [N, kTileTokens] the thread's sums of p per expert and lane, or null.
template <typename T>
void forward_tiles(const RouterOptions& opt, const ForwardArgs<T>& a, const ResidualRows<T>& g, int64_t begin,
                   int64_t end, int64_t* counts, T* prob_lanes);

}  // namespace moepp::router
