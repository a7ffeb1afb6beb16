// Test-only: the CUDA router's per-token execution, run on the CPU. LANES threads
// route one token together as the lanes of a warp slice do in router_cuda.cu:
// element j belongs to member j % LANES, the row is staged in scratch the team
// shares (the kernel's shared memory), reductions go through ButterflyGroup with a
// shuffle made of a shared slot array and a barrier (so sums add in the GPU's
// butterfly order), and g.sync() is a barrier. An ownership or barrier mistake in
// router_math.h then shows up here as a wrong result, or as a timeout.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "router.h"
#include "router_launch.h"

namespace moepp::router {

namespace {

// A barrier for the team, with a timeout: members that stop meeting (one of them
// skipped a collective the others entered) fail the call instead of hanging it.
class Team {
 public:
  explicit Team(int size) : size_(size), slots_(2 * static_cast<size_t>(size)) {}

  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (broken_) throw std::runtime_error("router lane team: a member failed");
    const uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      woken_.notify_all();
      return;
    }
    if (!woken_.wait_for(lock, std::chrono::seconds(30), [&] { return generation_ != generation || broken_; }) ||
        broken_) {
      broken_ = true;
      woken_.notify_all();
      throw std::runtime_error("router lane team: members did not meet at a barrier (a collective was skipped)");
    }
  }

  void fail() {
    std::lock_guard<std::mutex> lock(mutex_);
    broken_ = true;
    woken_.notify_all();
  }

  // One shuffle: publish v, meet, read the partner's value. Alternating between two
  // slot arrays makes one barrier per shuffle enough: nobody publishes into an
  // array again before everybody has passed the next barrier, which each member
  // reaches only after reading.
  template <typename T>
  T exchange(int lane, int phase, T v, int partner) {
    static_assert(sizeof(T) <= sizeof(Slot), "shuffled values are at most 8 bytes");
    std::memcpy(slots_[phase * size_ + lane].bytes, &v, sizeof(T));
    barrier();
    T other;
    std::memcpy(&other, slots_[phase * size_ + partner].bytes, sizeof(T));
    return other;
  }

 private:
  struct Slot {
    unsigned char bytes[8];
  };
  const int size_;
  std::vector<Slot> slots_;
  std::mutex mutex_;
  std::condition_variable woken_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  bool broken_ = false;
};

// The Exchange of ButterflyGroup for one member of a Team (__shfl_xor_sync's width
// is the team size, as LANES is the kernel's).
struct TeamExchange {
  Team* team;
  int lane;
  mutable int shuffles = 0;

  int rank() const { return lane; }
  template <typename T>
  T shfl_xor(T v, int offset) const {
    return team->exchange(lane, shuffles++ & 1, v, lane ^ offset);
  }
  void sync() const { team->barrier(); }
};

template <int LANES>
using TeamGroup = ButterflyGroup<LANES, TeamExchange>;

// Runs member(lane) on LANES threads and rethrows the first failure.
template <typename F>
void run_team(int lanes, F&& member) {
  Team team(lanes);
  std::vector<std::exception_ptr> errors(lanes);
  std::vector<std::thread> threads;
  threads.reserve(lanes);
  for (int lane = 0; lane < lanes; ++lane) {
    threads.emplace_back([&, lane] {
      try {
        member(team, lane);
      } catch (...) {
        errors[lane] = std::current_exception();
        team.fail();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// forward_kernel's token loop for one group (router_cuda.cu), on the team.
template <int LANES, typename T>
void forward_member(Team& team, int lane, const RouterOptions& opt, const ForwardArgs<T>& a, T* val, T* sel) {
  const TeamGroup<LANES> g{TeamExchange{&team, lane}};
  const int n = opt.num_experts;
  const int k = opt.top_k;
  for (int64_t t = 0; t < a.tokens; ++t) {
    g.sync();
    if (a.G != nullptr) {
      for (int j = g.rank(); j < n; j += LANES) sel[j] = a.prev[t * n + j];
      g.sync();
    }
    for (int j = g.rank(); j < n; j += LANES) val[j] = a.logits[t * n + j];
    g.sync();
    int32_t ids[kMaxTopK];
    T gates[kMaxTopK];
    T* out = a.logits_out != nullptr ? a.logits_out + t * n : nullptr;
    route_token(g, opt, val, a.G, n, a.bias, out, val, sel, a.prob_partials, ids, gates);
    // Slots of one token have distinct experts, and tokens are separated by barriers:
    // the owners' count updates never meet.
    for_each_slot(k, [&](int s) {
      if (s % LANES != g.rank()) return;
      a.ids[t * k + s] = ids[s];
      a.weights[t * k + s] = gates[s];
      ++a.counts[ids[s]];
    });
  }
}

// backward_kernel's token loop for one group.
template <int LANES, typename T>
void backward_member(Team& team, int lane, const RouterOptions& opt, const BackwardArgs<T>& a, T* val, T* buf) {
  const TeamGroup<LANES> g{TeamExchange{&team, lane}};
  const int n = opt.num_experts;
  const int k = opt.top_k;
  for (int64_t t = 0; t < a.tokens; ++t) {
    g.sync();
    for (int j = g.rank(); j < n; j += LANES) val[j] = a.routed[t * n + j];
    g.sync();
    route_token_backward(g, opt, a.ids + t * k, a.grad_weights ? a.grad_weights + t * k : nullptr,
                         a.grad_logits_out ? a.grad_logits_out + t * n : nullptr, a.grad_prob_sum, a.G, n,
                         a.grad_logits + t * n, a.grad_prev ? a.grad_prev + t * n : nullptr, val, buf);
  }
}

void check_lanes(int lanes) {
  if (lanes < 1 || lanes > 32 || (lanes & (lanes - 1)) != 0) {
    throw_invalid("lanes", "must be 1, 2, 4, 8, 16 or 32, got " + std::to_string(lanes));
  }
}

}  // namespace

template <typename T>
void forward_lanes(int lanes, const RouterOptions& opt, const ForwardArgs<T>& a) {
  check_lanes(lanes);
  const int n = opt.num_experts;
  std::fill(a.counts, a.counts + n, 0);
  if (a.prob_partials != nullptr) std::fill(a.prob_partials, a.prob_partials + n, T(0));
  std::vector<T> val(n), sel(n);
  with_lanes(lanes, [&](auto lanes_c) {
    constexpr int L = decltype(lanes_c)::value;
    run_team(L, [&](Team& team, int lane) { forward_member<L, T>(team, lane, opt, a, val.data(), sel.data()); });
  });
}

template <typename T>
void backward_lanes(int lanes, const RouterOptions& opt, const BackwardArgs<T>& a) {
  check_lanes(lanes);
  std::vector<T> val(opt.num_experts), buf(opt.num_experts);
  with_lanes(lanes, [&](auto lanes_c) {
    constexpr int L = decltype(lanes_c)::value;
    run_team(L, [&](Team& team, int lane) { backward_member<L, T>(team, lane, opt, a, val.data(), buf.data()); });
  });
}

template void forward_lanes<float>(int, const RouterOptions&, const ForwardArgs<float>&);
template void forward_lanes<double>(int, const RouterOptions&, const ForwardArgs<double>&);
template void backward_lanes<float>(int, const RouterOptions&, const BackwardArgs<float>&);
template void backward_lanes<double>(int, const RouterOptions&, const BackwardArgs<double>&);

}  // namespace moepp::router
