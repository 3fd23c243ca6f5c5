// Stress test of the gradient queue from C++ threads. Exits non-zero when any
// record is lost, duplicated, reordered within a producer, returned stale, or the
// queue's counters disagree, or when a phase hangs (exit 3, see kPhaseLimit);
// under -fsanitize=thread a data race also fails it, under address/undefined any
// memory error or undefined behaviour.
//
// usage: stress [records_per_producer]   (default 1000000)
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "ringmaster/harness.hpp"

namespace {

struct Phase {
  const char* name;
  ringmaster::StressConfig config;
  // The phase runs records_per_producer / divisor records per producer: a one-cell
  // ring hands over every record through a sleep and a wake-up.
  std::uint64_t divisor = 1;
};

// A phase that has not finished after this many seconds is a hang (a one-cell ring
// once made every pop spin forever): the run fails with a message instead of never
// ending. STRESS_PHASE_LIMIT_S overrides it.
long phase_limit_s() {
  const char* env = std::getenv("STRESS_PHASE_LIMIT_S");
  const long limit = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
  return limit > 0 ? limit : 600;
}

// Ends the process with exit code 3 unless destroyed within phase_limit_s().
class Watchdog {
 public:
  explicit Watchdog(const char* phase)
      : thread_([this, phase] {
          const long limit = phase_limit_s();
          std::unique_lock<std::mutex> lock(mutex_);
          if (!cv_.wait_for(lock, std::chrono::seconds(limit), [this] { return done_; })) {
            std::fprintf(stderr, "%s: HANG, not finished after %ld s\n", phase, limit);
            std::fflush(stderr);
            std::_Exit(3);
          }
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      done_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t records = 1000000;
  if (argc > 1) {
    char* end = nullptr;
    records = std::strtoull(argv[1], &end, 10);
    if (end == argv[1] || *end != '\0' || records == 0) {
      std::fprintf(stderr, "records_per_producer must be a positive integer, got '%s'\n", argv[1]);
      return 2;
    }
  }
  // A ring smaller than the slot pool makes producers block on a full ring as well
  // as on an empty pool, so every wait path runs.
  Phase phases[5];
  phases[0] = {"8 producers -> 1 consumer, pop", {}};
  phases[0].config.producers = 8;
  phases[0].config.capacity = 64;
  phases[0].config.num_slots = 128;
  phases[1] = {"4 producers -> 2 consumers, pop_many(32)", {}};
  phases[1].config.producers = 4;
  phases[1].config.consumers = 2;
  phases[1].config.batch = 32;
  phases[1].config.capacity = 256;
  phases[1].config.num_slots = 64;
  phases[2] = {"4 producers -> 1 consumer, pop_fresh(3)", {}};
  phases[2].config.producers = 4;
  phases[2].config.max_delay = 3;
  phases[2].config.capacity = 64;
  phases[2].config.num_slots = 32;
  // One-cell rings: a consumed cell must not look published to the next producer
  // (with more slots than cells it once did: records overwritten, pops spinning).
  phases[3] = {"2 producers -> 1 consumer, capacity 1", {}};
  phases[3].config.producers = 2;
  phases[3].config.capacity = 1;
  phases[3].config.num_slots = 8;
  phases[3].divisor = 50;
  phases[4] = {"3 producers -> 2 consumers, capacity 1, pop_many", {}};
  phases[4].config.producers = 3;
  phases[4].config.consumers = 2;
  phases[4].config.batch = 4;
  phases[4].config.capacity = 1;
  phases[4].config.num_slots = 4;
  phases[4].divisor = 50;

  int failures = 0;
  for (Phase& phase : phases) {
    phase.config.records_per_producer = std::max<std::uint64_t>(1, records / phase.divisor);
    const Watchdog watchdog(phase.name);
    try {
      const ringmaster::StressResult r = ringmaster::run_stress(phase.config);
      std::printf("%-50s %s  %.2f s  %.2f M records/s  %s\n", phase.name, r.ok() ? "ok  " : "FAIL",
                  r.seconds, double(r.received + r.discarded) / r.seconds / 1e6, r.summary().c_str());
      failures += r.ok() ? 0 : 1;
    } catch (const std::exception& e) {
      std::printf("%-50s FAIL  %s\n", phase.name, e.what());
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}
