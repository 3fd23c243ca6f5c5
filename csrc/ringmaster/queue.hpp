// Versioned gradient queue: a bounded multi-producer multi-consumer ring of small
// records (slot, worker, version), a second ring of free slot indices, and an
// atomic model-version counter. Header-only, C++17, no Python or torch dependency.
//
// Rings follow the ticket/sequence-number design (Vyukov bounded MPMC): every cell
// carries a sequence number that tells producers and consumers whose turn it is, so
// the fast path of a push or a pop is one CAS on the shared position plus one store
// to the cell. Cells and positions sit on their own cache lines. The sequence counts
// half-turns (see Ring), so that a ring of one cell works as well.
//
// A batched pop (pop_many) claims every ready record with a single CAS.
//
// Every slot carries a state byte (free, in use, queued) that turns the slot
// misuses a caller can make into InvalidArgument: pushing a free slot or one whose
// record is still queued, releasing a free slot or one still queued. Correct use
// hands a slot from thread to thread through the rings, so the transitions of one
// slot never race and plain relaxed loads and stores suffice (no extra RMW on the
// fast path); concurrent misuse of one slot is caught only on a best-effort basis.
// The state bytes are laid out so that neighbouring slots sit on different cache
// lines (see state_of).
//
// Blocking calls spin briefly, yield a few times, then sleep on a condition
// variable. Sleepers announce themselves in an atomic counter; the hot path only
// pays a load of that counter (after a sequentially-consistent publish) and touches
// the mutex only when somebody is actually asleep. Stats are per-worker relaxed
// counters on cache lines of their own.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ringmaster {

inline constexpr std::size_t kCacheLine = 64;

// One gradient announcement: the gradient itself lives in slot `slot` of a pool
// owned by the consumer; `version` is the model version the worker computed it at.
struct Record {
  std::uint32_t slot;
  std::uint32_t worker;
  std::uint64_t version;
};

// Thrown by producers after close(), and by consumers once a closed queue is empty.
class QueueClosed : public std::runtime_error {
 public:
  QueueClosed() : std::runtime_error("gradient queue is closed") {}
};

// Bad argument; the message starts with the argument's name. (Maps to ValueError.)
class InvalidArgument : public std::invalid_argument {
 public:
  InvalidArgument(const std::string& argument, const std::string& problem)
      : std::invalid_argument(argument + ": " + problem) {}
};

// An allocation sized by an argument failed; the message names it. (Maps to MemoryError.)
class OutOfMemory : public std::runtime_error {
 public:
  OutOfMemory(const std::string& argument, const std::string& problem)
      : std::runtime_error(argument + ": " + problem) {}
};

// Bytes of physical memory (0 if unknown).
inline std::uint64_t physical_memory_bytes() noexcept {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page_size = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? std::uint64_t(pages) * std::uint64_t(page_size) : 0;
}

// "2**k" for powers of two, "2**k - 1" just below one, else the decimal value:
// ranges up to 2**64 - 1 read better that way than as 20 digits.
inline std::string bound_text(std::uint64_t v) {
  for (unsigned k = 10; k < 64; ++k) {
    if (v == std::uint64_t{1} << k) return "2**" + std::to_string(k);
    if (v == (std::uint64_t{1} << k) - 1) return "2**" + std::to_string(k) + " - 1";
  }
  if (v == ~std::uint64_t{0}) return "2**64 - 1";
  return std::to_string(v);
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

using Clock = std::chrono::steady_clock;

// When a blocking call gives up. `never()` waits forever, `now()` tries once
// (without reading the clock: that read would cost as much as the attempt).
class Deadline {
 public:
  static Deadline never() noexcept { return Deadline(Clock::time_point::max()); }
  static Deadline now() noexcept { return Deadline(Clock::time_point::min()); }
  static Deadline after(double seconds) {
    if (!(seconds >= 0.0)) throw InvalidArgument("timeout", "must be a number >= 0");
    // Beyond ~100 years the arithmetic would overflow; treat it as forever.
    if (seconds > 3.0e9) return never();
    return Deadline(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                       std::chrono::duration<double>(seconds)));
  }
  bool forever() const noexcept { return at_ == Clock::time_point::max(); }
  bool expired() const noexcept {
    return at_ == Clock::time_point::min() || (!forever() && Clock::now() >= at_);
  }
  Clock::time_point at() const noexcept { return at_; }
  Deadline earliest(Deadline other) const noexcept { return at_ <= other.at_ ? *this : other; }

 private:
  explicit Deadline(Clock::time_point at) noexcept : at_(at) {}
  Clock::time_point at_;
};

// Event count. A sleeper registers and takes a ticket (the epoch) before its last
// check of the condition, and sleeps only while the epoch is unchanged. A notifier
// that publishes its change with a seq_cst store (or a release store and a seq_cst
// fence) and then reads `waiters_` with a seq_cst load cannot miss a sleeper that
// registered (seq_cst) before re-checking: the store/load (Dekker) pairing under
// the single total order of seq_cst.
//
// A notify wakes every registered sleeper and zeroes the count, so a burst of
// notifies costs one wake-up per round of sleepers, not one system call each.
// Every sleeper woken re-checks its condition: a wake-one scheme with anonymous
// counts lets one thread take the wake-up another one needed (a lost wake-up this
// code once had), and the spin-and-yield phase of wait_for keeps herds rare.
class Waiter {
 public:
  std::uint64_t prepare_wait() {
    std::lock_guard<std::mutex> lock(mutex_);
    waiters_.fetch_add(1, std::memory_order_seq_cst);
    return epoch_;
  }
  void cancel_wait(std::uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mutex_);
    unregister(ticket);
  }
  // Sleeps until a notify after `ticket`, or the deadline; the caller re-checks.
  void wait(std::uint64_t ticket, Deadline deadline) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (deadline.forever()) {
      cv_.wait(lock, [&] { return epoch_ != ticket; });
    } else {
      cv_.wait_until(lock, deadline.at(), [&] { return epoch_ != ticket; });
    }
    unregister(ticket);
  }
  void notify_all() {
    if (waiters_.load(std::memory_order_seq_cst) == 0) return;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (waiters_.load(std::memory_order_relaxed) == 0) return;
      waiters_.store(0, std::memory_order_relaxed);
      ++epoch_;
    }
    cv_.notify_all();
  }

 private:
  // Under mutex_: a registration not yet cleared by a notify is withdrawn.
  void unregister(std::uint64_t ticket) {
    if (epoch_ == ticket) waiters_.fetch_sub(1, std::memory_order_relaxed);
  }

  alignas(kCacheLine) std::atomic<std::uint64_t> waiters_{0};
  alignas(kCacheLine) std::mutex mutex_;
  std::condition_variable cv_;
  std::uint64_t epoch_ = 0;
};

// Before a blocking call sleeps it spins briefly (catches a partner a few hundred
// nanoseconds behind), then yields the CPU a few times: with more threads than
// cores the partner may be waiting for this very core, and a yield hands it over
// without the system calls of a sleep and a wake-up.
inline constexpr int kSpinIterations = 64;
inline constexpr int kYieldIterations = 16;

// Runs `attempt` (returns true when done; may throw) until it succeeds or the
// deadline passes: once, then a short spin, a few yields, then sleeps on
// `waiter` between tries.
template <class Attempt>
bool wait_for(Waiter& waiter, Deadline deadline, Attempt&& attempt) {
  if (attempt()) return true;
  if (deadline.expired()) return false;
  for (int i = 0; i < kSpinIterations; ++i) {
    cpu_relax();
    if (attempt()) return true;
  }
  for (int i = 0; i < kYieldIterations; ++i) {
    std::this_thread::yield();
    if (attempt()) return true;
    if (deadline.expired()) return false;
  }
  for (;;) {
    if (deadline.expired()) return false;
    const std::uint64_t ticket = waiter.prepare_wait();
    bool done;
    try {
      done = attempt();
    } catch (...) {
      waiter.cancel_wait(ticket);
      throw;
    }
    if (done) {
      waiter.cancel_wait(ticket);
      return true;
    }
    waiter.wait(ticket, deadline);
  }
}

inline bool is_power_of_two(std::uint64_t x) noexcept { return x != 0 && (x & (x - 1)) == 0; }

// Bounded MPMC ring (Vyukov). The top bit of the enqueue position is the "closed"
// flag, so closing and claiming a position are ordered by the same atomic word:
// after close() no push can succeed, and a consumer that finds the ring empty with
// head == tail knows that nothing is in flight.
//
// A cell's sequence is 2 * pos when it is free for the producer of position pos and
// 2 * pos + 1 once that producer published. Vyukov's original uses pos and pos + 1,
// and a consumed cell is then free for pos + capacity: with one cell that equals
// "published at pos", so a second push overwrote the first record and every pop
// spun on a cell that could never match (with the GIL held, freezing Python).
// Doubling keeps the two states apart for every capacity, at the cost of a shift.
template <class T>
class Ring {
 public:
  enum class Status { kOk, kEmpty, kFull, kClosed };

  static constexpr std::uint64_t kMaxCapacity = std::uint64_t{1} << 40;
  static constexpr std::uint64_t kCellBytes = kCacheLine;

  // `argument` names the user's argument the capacity comes from, for messages.
  Ring(std::uint64_t capacity, const char* argument)
      : mask_(checked(capacity) - 1), cells_(allocate(capacity, argument)) {
    for (std::uint64_t i = 0; i < capacity; ++i) cells_[i].seq.store(free_at(i), std::memory_order_relaxed);
  }

  std::uint64_t capacity() const noexcept { return mask_ + 1; }

  Status try_push(const T& value) noexcept {
    // seq_cst loads pair with Waiter (see there); they cost nothing extra on x86.
    std::uint64_t pos = tail_.load(std::memory_order_seq_cst);
    for (;;) {
      if (pos & kClosedBit) return Status::kClosed;
      Cell& cell = cells_[pos & mask_];
      const std::uint64_t seq = cell.seq.load(std::memory_order_seq_cst);
      const auto dif = static_cast<std::int64_t>(seq - free_at(pos));
      if (dif == 0) {
        if (tail_.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
          cell.value = value;
          // seq_cst, not release: pairs with Waiter (see there).
          cell.seq.store(published_at(pos), std::memory_order_seq_cst);
          return Status::kOk;
        }
      } else if (dif < 0) {
        // The cell still holds the value from one lap ago: full. Re-read the tail
        // so that a close() racing with a full ring is reported as closed.
        const std::uint64_t now = tail_.load(std::memory_order_seq_cst);
        if (now == pos) return Status::kFull;
        pos = now;
      } else {
        pos = tail_.load(std::memory_order_seq_cst);
      }
    }
  }

  // Takes up to max_n (>= 1) consecutive published values with a single CAS on the
  // head, so a batched drain pays one contended RMW per batch, not per value.
  // `taken` is how many were written to `out`.
  Status try_pop(T* out, std::size_t max_n, std::size_t& taken) noexcept {
    taken = 0;
    std::uint64_t pos = head_.load(std::memory_order_relaxed);
    for (;;) {
      // seq_cst loads pair with Waiter (see there); they cost nothing extra on x86.
      const std::uint64_t seq = cells_[pos & mask_].seq.load(std::memory_order_seq_cst);
      const auto dif = static_cast<std::int64_t>(seq - published_at(pos));
      if (dif == 0) {
        // A lap later the cell would read published_at(pos + capacity), never
        // published_at(pos + k) for k < capacity, so the scan stops within one lap.
        std::size_t ready = 1;
        while (ready < max_n && cells_[(pos + ready) & mask_].seq.load(std::memory_order_seq_cst) ==
                                    published_at(pos + ready)) {
          ++ready;
        }
        if (head_.compare_exchange_weak(pos, pos + ready, std::memory_order_relaxed)) {
          for (std::size_t i = 0; i < ready; ++i) {
            Cell& cell = cells_[(pos + i) & mask_];
            out[i] = cell.value;
            cell.seq.store(free_at(pos + i + mask_ + 1), std::memory_order_release);
          }
          // Orders the stores above before the caller's check for producers asleep
          // on a full ring (Waiter's store/load pairing, one fence per batch).
          std::atomic_thread_fence(std::memory_order_seq_cst);
          taken = ready;
          return Status::kOk;
        }
      } else if (dif < 0) {
        // Nothing published at `pos`. Closed-and-drained only if no producer has
        // claimed `pos` either; otherwise a record is on its way. The producers'
        // tail_ line is read only once closed_ is set: a consumer polling just
        // behind a producer would otherwise pull that line away from the producer
        // on every poll, and each of its next CASes would miss (1P1C runs in that
        // lock-step whenever the server is the faster side). closed_ serves the
        // Waiter pairing as well: close() sets it with a seq_cst store before it
        // notifies, so a sleeper that registered, then read false here, is seen
        // by that notify (the same store/load pairing as a published cell).
        if (closed_.load(std::memory_order_seq_cst)) {
          const std::uint64_t tail = tail_.load(std::memory_order_seq_cst);
          if ((tail & kClosedBit) && (tail & ~kClosedBit) == pos) return Status::kClosed;
        }
        const std::uint64_t now = head_.load(std::memory_order_relaxed);
        if (now == pos) return Status::kEmpty;
        pos = now;
      } else {
        pos = head_.load(std::memory_order_relaxed);
      }
    }
  }

  bool try_pop(T& out) noexcept {
    std::size_t taken = 0;
    return try_pop(&out, 1, taken) == Status::kOk;
  }

  // The bit in tail_ first, so that a reader who sees closed_ also sees the bit.
  void close() noexcept {
    tail_.fetch_or(kClosedBit, std::memory_order_seq_cst);
    closed_.store(true, std::memory_order_seq_cst);
  }
  bool closed() const noexcept { return tail_.load(std::memory_order_seq_cst) & kClosedBit; }

  // Records claimed by producers and not yet claimed by consumers (a snapshot).
  std::uint64_t size() const noexcept {
    const std::uint64_t head = head_.load(std::memory_order_acquire);
    const std::uint64_t tail = tail_.load(std::memory_order_acquire) & ~kClosedBit;
    return tail > head ? tail - head : 0;
  }

 private:
  static constexpr std::uint64_t kClosedBit = std::uint64_t{1} << 63;
  // Sequence values (see the class comment); they wrap like the positions, and only
  // their differences, well below 2**63, are compared.
  static constexpr std::uint64_t free_at(std::uint64_t pos) noexcept { return pos << 1; }
  static constexpr std::uint64_t published_at(std::uint64_t pos) noexcept { return (pos << 1) | 1; }
  static std::uint64_t checked(std::uint64_t capacity) {
    if (!is_power_of_two(capacity) || capacity > kMaxCapacity) {
      throw InvalidArgument("capacity", "must be a power of two in [1, 2**40], got " +
                                            std::to_string(capacity));
    }
    return capacity;
  }
  struct alignas(kCacheLine) Cell {
    std::atomic<std::uint64_t> seq;
    T value;
  };
  static_assert(sizeof(Cell) == kCellBytes, "a cell is one cache line");
  // The constructor writes every cell, so a ring larger than physical memory could
  // only end in swapping or the OOM killer: it is refused upfront, and a failed
  // allocation below that bound says which argument asked for it.
  static Cell* allocate(std::uint64_t capacity, const char* argument) {
    const std::uint64_t bytes = capacity * kCellBytes;
    const std::uint64_t memory = physical_memory_bytes();
    const std::string need = "a ring of " + bound_text(capacity) + " cells of " + std::to_string(kCellBytes) +
                             " B needs " + std::to_string(bytes >> 20) + " MiB";
    if (memory != 0 && bytes > memory) {
      throw InvalidArgument(argument, need + ", more than this machine's " + std::to_string(memory >> 20) +
                                          " MiB of memory");
    }
    try {
      return new Cell[capacity];
    } catch (const std::bad_alloc&) {
      throw OutOfMemory(argument, need + " and that allocation failed");
    }
  }
  const std::uint64_t mask_;
  std::unique_ptr<Cell[]> cells_;
  alignas(kCacheLine) std::atomic<std::uint64_t> tail_{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> head_{0};
  // Written once, by close(); read by consumers that find the ring empty.
  // alignas also rounds sizeof(Ring) up, so the next member starts on a fresh line.
  alignas(kCacheLine) std::atomic<bool> closed_{false};
};

struct WorkerStats {
  std::uint64_t pushed = 0;
  std::uint64_t popped = 0;
  std::uint64_t discarded = 0;
};

struct QueueStats {
  std::uint64_t pushed = 0;     // records accepted by push/try_push
  std::uint64_t popped = 0;     // records handed to a consumer
  std::uint64_t discarded = 0;  // stale records recycled by pop_fresh
  std::vector<WorkerStats> per_worker;
};

// The gradient queue. Workers: acquire_slot -> fill the slot -> push(record).
// Server: pop / pop_fresh / pop_many -> read the slot -> release_slot.
//
// Invariant when quiescent: pushed == popped + discarded + size().
class GradientQueue {
 public:
  static constexpr std::uint64_t kMaxCapacity = Ring<Record>::kMaxCapacity;
  static constexpr std::uint64_t kMaxSlots = std::uint64_t{1} << 31;
  static constexpr std::uint64_t kMaxWorkers = std::uint64_t{1} << 20;
  static constexpr std::uint64_t kMaxVersion = ~std::uint64_t{0};

  GradientQueue(std::uint64_t capacity, std::uint64_t num_slots, std::uint64_t num_workers)
      : records_(capacity, "capacity"),
        free_(free_capacity(num_slots), "num_slots"),
        num_slots_(static_cast<std::uint32_t>(num_slots)),
        state_shift_(state_line_shift(num_slots)),
        slot_state_(new std::atomic<std::uint8_t>[kCacheLine << state_shift_]),
        num_workers_(checked_workers(num_workers)),
        pushed_(new PaddedCounter[num_workers]),
        consumed_(new ConsumerCounters[num_workers]) {
    for (std::uint32_t s = 0; s < num_slots_; ++s) {
      state_of(s).store(kFree, std::memory_order_relaxed);
      free_.try_push(s);
    }
  }

  GradientQueue(const GradientQueue&) = delete;
  GradientQueue& operator=(const GradientQueue&) = delete;

  std::uint64_t capacity() const noexcept { return records_.capacity(); }
  std::uint32_t num_slots() const noexcept { return num_slots_; }
  std::uint32_t num_workers() const noexcept { return num_workers_; }
  std::uint64_t size() const noexcept { return records_.size(); }
  std::uint64_t free_slots() const noexcept { return free_.size(); }

  // ---- slot pool -------------------------------------------------------------

  // A free slot, now owned by the caller; nullopt when none came before the deadline.
  std::optional<std::uint32_t> acquire_slot(Deadline deadline) {
    std::uint32_t slot = 0;
    const bool got = wait_for(slots_waiter_, deadline, [&] {
      if (closed()) throw QueueClosed();
      return free_.try_pop(slot);
    });
    if (!got) return std::nullopt;
    state_of(slot).store(kInUse, std::memory_order_relaxed);
    return slot;
  }

  // Gives a slot back to the pool: one that was acquired and not pushed, or whose
  // record was popped. Allowed after close(), so a draining server can recycle what
  // it pops.
  void release_slot(std::uint32_t slot) {
    begin_release(slot);
    while (!try_finish_release(slot)) std::this_thread::yield();
  }

  // release_slot in two halves, for callers that must not wait long in the second
  // (the Python bindings hold the GIL in the first try). begin_release checks the
  // slot and marks it free, or throws; then try_finish_release is called until it
  // returns true.
  void begin_release(std::uint32_t slot) {
    check_slot(slot);
    std::uint8_t state = kInUse;
    if (!state_of(slot).compare_exchange_strong(state, kFree, std::memory_order_acq_rel)) {
      throw InvalidArgument("slot", "slot " + std::to_string(slot) +
                                        (state == kFree ? " is free: it was never acquired, or was already released"
                                                        : " is still queued: pop its record before releasing it"));
    }
  }
  // Each slot is in the free ring at most once and the ring holds num_slots, so
  // "full" only means that an acquire_slot() one lap behind has claimed this cell
  // and not yet handed it back; it will within a few instructions unless its
  // thread was preempted. Hence a short spin here, and the caller yields (or lets
  // go of the GIL) between calls.
  bool try_finish_release(std::uint32_t slot) noexcept {
    for (int i = 0; i < kSpinIterations; ++i) {
      if (free_.try_push(slot) == Ring<std::uint32_t>::Status::kOk) {
        slots_waiter_.notify_all();
        return true;
      }
      cpu_relax();
    }
    return false;
  }

  // ---- producers -------------------------------------------------------------

  // Publishes a record. False when the ring stayed full until the deadline.
  bool push(const Record& record, Deadline deadline) {
    check_record(record);
    std::atomic<std::uint8_t>& state = state_of(record.slot);
    const bool done = wait_for(space_waiter_, deadline, [&] {
      // Marked before the record is published: the consumer that pops it marks the
      // slot in use again, and that store must come after this one.
      state.store(kQueued, std::memory_order_relaxed);
      const auto status = records_.try_push(record);
      if (status == Ring<Record>::Status::kOk) return true;
      state.store(kInUse, std::memory_order_relaxed);
      if (status == Ring<Record>::Status::kClosed) throw QueueClosed();
      return false;
    });
    if (done) {
      pushed_[record.worker].value.fetch_add(1, std::memory_order_relaxed);
      records_waiter_.notify_all();
    }
    return done;
  }

  // ---- consumers -------------------------------------------------------------

  // The next record; nullopt on timeout. Throws QueueClosed once closed and empty.
  std::optional<Record> pop(Deadline deadline) {
    Record record{};
    if (!wait_for(records_waiter_, deadline, [&] { return take(&record, 1) > 0; })) return std::nullopt;
    count_popped(&record, 1);
    return record;
  }

  // The next record whose delay (version() - record.version) is below max_delay.
  // Stale records on the way are released to the slot pool and counted as
  // discarded. The deadline bounds the whole call.
  std::optional<Record> pop_fresh(std::uint64_t max_delay, Deadline deadline) {
    if (max_delay == 0) throw InvalidArgument("max_delay", "must be >= 1 (0 would discard every record)");
    for (;;) {
      Record record{};
      if (!wait_for(records_waiter_, deadline, [&] { return take(&record, 1) > 0; })) return std::nullopt;
      if (delay_of(record) < max_delay) {
        count_popped(&record, 1);
        return record;
      }
      consumed_[record.worker].discarded.fetch_add(1, std::memory_order_relaxed);
      release_slot(record.slot);
    }
  }

  // Waits (until the deadline) for one record and takes, in the same attempt, up
  // to max_n that are ready. Returns how many were written to `out` (0: timeout).
  // Throws QueueClosed once closed and empty.
  std::size_t pop_many(Record* out, std::size_t max_n, Deadline deadline) {
    if (max_n == 0) throw InvalidArgument("max_n", "must be >= 1");
    std::size_t n = 0;
    if (!wait_for(records_waiter_, deadline, [&] { return (n = take(out, max_n)) > 0; })) return 0;
    count_popped(out, n);
    return n;
  }

  // ---- model version ---------------------------------------------------------

  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }
  // Refuses to wrap: after 2**64 - 1 every record would look like one from the future.
  std::uint64_t bump_version() {
    std::uint64_t v = version_.load(std::memory_order_relaxed);
    do {
      if (v == kMaxVersion) {
        throw InvalidArgument("version", "is 2**64 - 1 and bump_version() would wrap it to 0; "
                                         "set_version() to a smaller one first");
      }
    } while (!version_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_relaxed));
    return v + 1;
  }
  void set_version(std::uint64_t v) noexcept { version_.store(v, std::memory_order_release); }
  // Records from the future (after set_version went backwards) count as delay 0.
  std::uint64_t delay_of(const Record& record) const noexcept {
    const std::uint64_t now = version();
    return now > record.version ? now - record.version : 0;
  }

  // ---- shutdown and accounting ----------------------------------------------

  void close() {
    records_.close();
    records_waiter_.notify_all();
    space_waiter_.notify_all();
    slots_waiter_.notify_all();
  }
  bool closed() const noexcept { return records_.closed(); }

  // A snapshot; exact when no thread is pushing or popping.
  QueueStats stats() const {
    QueueStats s;
    s.per_worker.resize(num_workers_);
    for (std::uint32_t w = 0; w < num_workers_; ++w) {
      WorkerStats& ws = s.per_worker[w];
      ws.pushed = pushed_[w].value.load(std::memory_order_relaxed);
      ws.popped = consumed_[w].popped.load(std::memory_order_relaxed);
      ws.discarded = consumed_[w].discarded.load(std::memory_order_relaxed);
      s.pushed += ws.pushed;
      s.popped += ws.popped;
      s.discarded += ws.discarded;
    }
    return s;
  }

 private:
  // Slot states. In use: held by a worker between acquire and push, or by a consumer
  // between pop and release. Queued: its record is in the ring.
  static constexpr std::uint8_t kFree = 0;
  static constexpr std::uint8_t kInUse = 1;
  static constexpr std::uint8_t kQueued = 2;

  struct alignas(kCacheLine) PaddedCounter {
    std::atomic<std::uint64_t> value{0};
  };
  // Written by consumers only, so kept off the producers' lines.
  struct alignas(kCacheLine) ConsumerCounters {
    std::atomic<std::uint64_t> popped{0};
    std::atomic<std::uint64_t> discarded{0};
  };

  static std::uint64_t free_capacity(std::uint64_t num_slots) {
    if (num_slots == 0 || num_slots > kMaxSlots) {
      throw InvalidArgument("num_slots", "must be in [1, 2**31], got " + std::to_string(num_slots));
    }
    std::uint64_t c = 1;
    while (c < num_slots) c <<= 1;
    return c;
  }
  // log2 of the number of cache lines holding the slot states: a power of two, at
  // least ceil(num_slots / 64) so every slot has a byte, and at least 16 (or
  // num_slots, if fewer) so that slots close together in the free ring's FIFO
  // order are on different lines. (num_slots is checked by free_capacity.)
  static unsigned state_line_shift(std::uint64_t num_slots) {
    const std::uint64_t lines = std::max((num_slots + kCacheLine - 1) / kCacheLine,
                                         std::min<std::uint64_t>(num_slots, 16));
    unsigned shift = 0;
    while ((std::uint64_t{1} << shift) < lines) ++shift;
    return shift;
  }
  // Slot s lives on line s mod lines, at byte s / lines. The free ring hands slots
  // out in turn, so in a one-producer hand-off the server marks slot s - 1 while
  // the worker marks slot s: side by side, their bytes would bounce one line
  // between the two cores on every record, which slowed 1P1C markedly.
  // Now a line is shared only by slots `lines` apart. A bijection onto
  // [0, 64 * lines): s / lines < 64 because num_slots <= 64 * lines.
  std::atomic<std::uint8_t>& state_of(std::uint64_t slot) const noexcept {
    const std::uint64_t mask = (std::uint64_t{1} << state_shift_) - 1;
    return slot_state_[(slot & mask) * kCacheLine + (slot >> state_shift_)];
  }
  static std::uint32_t checked_workers(std::uint64_t num_workers) {
    if (num_workers == 0 || num_workers > kMaxWorkers) {
      throw InvalidArgument("num_workers", "must be in [1, 2**20], got " + std::to_string(num_workers));
    }
    return static_cast<std::uint32_t>(num_workers);
  }
  void check_slot(std::uint64_t slot) const {
    if (slot >= num_slots_) {
      throw InvalidArgument("slot", "must be in [0, " + std::to_string(num_slots_) + "), got " +
                                        std::to_string(slot));
    }
  }
  void check_record(const Record& record) const {
    check_slot(record.slot);
    if (record.worker >= num_workers_) {
      throw InvalidArgument("worker", "must be in [0, " + std::to_string(num_workers_) + "), got " +
                                          std::to_string(record.worker));
    }
    switch (state_of(record.slot).load(std::memory_order_relaxed)) {
      case kInUse:
        return;
      case kFree:
        throw InvalidArgument("slot", "slot " + std::to_string(record.slot) +
                                          " is free: acquire it with acquire_slot() before pushing");
      default:
        throw InvalidArgument("slot", "slot " + std::to_string(record.slot) +
                                          " is already queued: each acquired slot is pushed once");
    }
  }

  // One non-blocking attempt to take up to max_n records; their slots pass to the
  // consumer; wakes producers waiting for space. Returns how many were taken; throws
  // QueueClosed once closed and empty.
  std::size_t take(Record* out, std::size_t max_n) {
    std::size_t n = 0;
    switch (records_.try_pop(out, max_n, n)) {
      case Ring<Record>::Status::kOk:
        for (std::size_t i = 0; i < n; ++i) state_of(out[i].slot).store(kInUse, std::memory_order_relaxed);
        space_waiter_.notify_all();
        return n;
      case Ring<Record>::Status::kClosed:
        throw QueueClosed();
      default:
        return 0;
    }
  }

  // One counter update per run of records from the same worker.
  void count_popped(const Record* records, std::size_t n) {
    for (std::size_t i = 0; i < n;) {
      std::size_t j = i + 1;
      while (j < n && records[j].worker == records[i].worker) ++j;
      consumed_[records[i].worker].popped.fetch_add(j - i, std::memory_order_relaxed);
      i = j;
    }
  }

  Ring<Record> records_;
  Ring<std::uint32_t> free_;
  const std::uint32_t num_slots_;
  const unsigned state_shift_;
  std::unique_ptr<std::atomic<std::uint8_t>[]> slot_state_;  // see state_of
  const std::uint32_t num_workers_;
  std::unique_ptr<PaddedCounter[]> pushed_;
  std::unique_ptr<ConsumerCounters[]> consumed_;
  alignas(kCacheLine) std::atomic<std::uint64_t> version_{0};
  Waiter records_waiter_;  // consumers waiting for a record
  Waiter space_waiter_;    // producers waiting for room in the ring
  Waiter slots_waiter_;    // producers waiting for a free slot
};

}  // namespace ringmaster
