// Stress test of the gradient queue from C++ threads. Exits non-zero when any
// record is lost, duplicated, reordered within a producer, returned stale, or the
// queue's counters disagree; under -fsanitize=thread a data race also fails it.
//
// usage: stress [records_per_producer]   (default 1000000)
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "ringmaster/harness.hpp"

namespace {

struct Phase {
  const char* name;
  ringmaster::StressConfig config;
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
  Phase phases[3];
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

  int failures = 0;
  for (Phase& phase : phases) {
    phase.config.records_per_producer = records;
    try {
      const ringmaster::StressResult r = ringmaster::run_stress(phase.config);
      std::printf("%-45s %s  %.2f s  %.2f M records/s  %s\n", phase.name, r.ok() ? "ok  " : "FAIL",
                  r.seconds, double(r.received + r.discarded) / r.seconds / 1e6, r.summary().c_str());
      failures += r.ok() ? 0 : 1;
    } catch (const std::exception& e) {
      std::printf("%-45s FAIL  %s\n", phase.name, e.what());
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}
